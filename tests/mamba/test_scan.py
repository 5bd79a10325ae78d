"""Mamba-1 selective scan: chunked torch and fused C++ against the float64 reference loop.

Values and every gradient (u, delta, A, B, C, D, z, delta_bias, and the last state's cotangent) are
compared with the reference run in float64; the fast scans run in float32 and must agree to ~1e-4
relative to the largest entry of each reference tensor. The C++ kernel is built once per session
(~20 s on 2 cores); if it cannot be built, its tests are skipped with the compiler's reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SCAN_FILE = Path(__file__).resolve().parents[2] / "modeling" / "mamba" / "scan_mamba.py"


def _load_scan_module():
    # load the file itself (it must work stand-alone next to a saved model: torch only)
    spec = importlib.util.spec_from_file_location("scan_mamba_under_test", _SCAN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scan = _load_scan_module()

RTOL = 1e-4
NAMES = ("y", "last", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module")
def cpp():
    from compressm_hf import kernels

    if not kernels.is_available():
        pytest.skip(f"C++ selective-scan kernel could not be built here: {kernels.build_error()}")
    return kernels


def make_inputs(batch, d, L, n, softplus, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=f64) * scale

    if softplus:
        delta = rn(batch, d, L, scale=1.0) - 1.5  # softplus(.) ~ 0.05 .. 1.5
        bias = rn(d, scale=0.5)
    else:  # dt used as is: keep it positive so exp(dt * A) stays bounded
        delta = torch.rand(batch, d, L, generator=g, dtype=f64) * 0.4 + 0.02
        bias = torch.rand(d, generator=g, dtype=f64) * 0.1
    return {
        "u": rn(batch, d, L),
        "delta": delta,
        "A": -torch.exp(rn(d, n, scale=0.7)),
        "B": rn(batch, n, L),
        "C": rn(batch, n, L),
        "D": rn(d),
        "z": rn(batch, d, L),
        "delta_bias": bias,
    }


def run(fn, inputs, dtype, *, use_D, use_z, use_bias, softplus, last, seed=1):
    """Forward + backward of a weighted sum of the outputs; returns {name: tensor (float64)}."""
    x = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    kwargs = {
        "D": x["D"] if use_D else None,
        "z": x["z"] if use_z else None,
        "delta_bias": x["delta_bias"] if use_bias else None,
        "delta_softplus": softplus,
        "return_last_state": last,
    }
    out = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], **kwargs)
    y, h = out if last else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if h is not None:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    res = {"y": y.detach().double()}
    if h is not None:
        res["last"] = h.detach().double()
    for k in ("u", "delta", "A", "B", "C"):
        res[k] = x[k].grad.double()
    for k, used in (("D", use_D), ("z", use_z), ("delta_bias", use_bias)):
        if used:
            res[k] = x[k].grad.double()
        else:
            assert x[k].grad is None, k
    return res


def assert_close(got, ref, label, rtol=RTOL):
    assert set(got) == set(ref), (label, set(got) ^ set(ref))
    for k in NAMES:
        if k not in ref:
            continue
        g, r = got[k], ref[k]
        assert g.shape == r.shape, (label, k, g.shape, r.shape)
        assert torch.isfinite(g).all(), (label, k)
        err = (g - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err < rtol, f"{label}: {k} relative error {err:.2e} >= {rtol:.0e}"


# shape (batch, d, L, n) and options (D, z, delta_bias, softplus, last). L=130/67 are not multiples of
# the chunk (64 in C++, adaptive in torch); d=20/35 are not multiples of the C++ kernel's 16 lanes.
CASES = [
    ((2, 16, 130, 16), (True, True, True, True, False)),
    ((2, 20, 67, 4), (True, True, True, True, True)),
    ((1, 35, 100, 33), (False, False, False, False, True)),
    ((2, 16, 64, 1), (True, False, True, True, False)),
    ((3, 32, 150, 16), (False, True, False, True, True)),
    ((2, 24, 70, 4), (True, False, False, False, False)),
    ((1, 16, 200, 33), (True, True, True, True, True)),
    ((2, 17, 1, 16), (True, True, True, True, True)),  # L = 1
]


def _case_id(case):
    (b, d, L, n), (D, z, bias, sp, last) = case
    flags = "".join(c for c, on in zip("DzbSl", (D, z, bias, sp, last)) if on)
    return f"b{b}d{d}L{L}n{n}-{flags or 'plain'}"


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(case):
        if case not in cache:
            shape, (D, z, bias, sp, last) = case
            inputs = make_inputs(*shape, softplus=sp)
            kw = {"use_D": D, "use_z": z, "use_bias": bias, "softplus": sp, "last": last}
            cache[case] = (inputs, kw, run(scan.selective_scan_ref, inputs, torch.float64, **kw))
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_chunked_matches_reference(case, references):
    inputs, kw, ref = references(case)
    assert_close(run(scan.selective_scan_chunked, inputs, torch.float32, **kw), ref, "chunked fp32")
    # in float64 the chunked scan is the same computation, to rounding
    assert_close(run(scan.selective_scan_chunked, inputs, torch.float64, **kw), ref, "chunked fp64", 1e-10)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_cpp_matches_reference(case, references, cpp):
    inputs, kw, ref = references(case)
    assert_close(run(cpp.selective_scan_cpu, inputs, torch.float32, **kw), ref, "cpp fp32")


def test_cpp_store_dA_off_and_groups(references, cpp, monkeypatch):
    """The recompute-exp variant and the split-dB/dC (batch 1 -> several channel groups) path."""
    case = ((1, 48, 130, 20), (True, True, True, True, True))
    inputs, kw, ref = references(case)

    def no_store(*a, **k):
        return cpp.selective_scan_cpu(*a, store_dA=False, **k)

    assert_close(run(no_store, inputs, torch.float32, **kw), ref, "cpp store_dA=False")
    monkeypatch.setattr(cpp.selective_scan, "_groups", lambda batch, nblk: nblk)
    assert_close(run(cpp.selective_scan_cpu, inputs, torch.float32, **kw), ref, "cpp groups=nblk")


def test_cpp_channels_last_views(references, cpp):
    """Mamba's mixer passes u and z as transposed views of (batch, L, d) tensors: strided fast path."""
    case = ((2, 32, 90, 16), (True, True, True, True, False))
    inputs, kw, ref = references(case)

    def as_views(fn):
        def wrapped(u, delta, A, B, C, **k):
            u2 = u.transpose(1, 2).contiguous().transpose(1, 2)
            z = k.pop("z")
            z2 = z.transpose(1, 2).contiguous().transpose(1, 2)
            B2 = B.transpose(1, 2).contiguous().transpose(1, 2)
            y = fn(u2, delta, A, B2, C, z=z2, **k)
            assert y.stride(1) == 1  # y laid out like u
            return y

        return wrapped

    assert_close(run(as_views(cpp.selective_scan_cpu), inputs, torch.float32, **kw), ref, "cpp views")


def test_gradcheck_chunked_small():
    inputs = make_inputs(1, 3, 11, 2, softplus=True, seed=3)
    x = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def f(u, delta, A, B, C, D, z, bias):
        y, h = scan.selective_scan_chunked(
            u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True
        )
        return y, h

    assert torch.autograd.gradcheck(f, x, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reference_small():
    inputs = make_inputs(1, 2, 6, 3, softplus=False, seed=4)
    x = [inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    assert torch.autograd.gradcheck(lambda *a: scan.selective_scan_ref(*a), x, eps=1e-6, atol=1e-7)


def test_reference_is_the_plain_recurrence():
    """Independent check of the reference against the formula, element by element."""
    inputs = make_inputs(1, 2, 5, 3, softplus=True, seed=5)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    y = scan.selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    dt = torch.nn.functional.softplus(delta + bias[:, None])
    for d in range(2):
        h = torch.zeros(3, dtype=torch.float64)
        for t in range(5):
            h = torch.exp(dt[0, d, t] * A[d]) * h + dt[0, d, t] * B[0, :, t] * u[0, d, t]
            expect = (C[0, :, t] @ h + D[d] * u[0, d, t]) * torch.nn.functional.silu(z[0, d, t])
            assert torch.allclose(y[0, d, t], expect, rtol=1e-12, atol=1e-12)


def test_cpp_half_precision_inputs(cpp):
    """bf16 in, bf16 out (computed in float32), gradients in the inputs' dtypes."""
    x = make_inputs(2, 16, 40, 8, softplus=True)
    xs = {k: v.to(torch.bfloat16).requires_grad_() for k, v in x.items()}
    y = cpp.selective_scan_cpu(
        xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"], xs["delta_bias"], True
    )
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(v.grad.dtype == torch.bfloat16 for v in xs.values())
    ref = scan.selective_scan_ref(
        *(xs[k].detach().double() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
        delta_softplus=True,
    )
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_no_grad_forward_matches(cpp):
    x = make_inputs(2, 16, 70, 16, softplus=True)
    args = [x[k].float() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with torch.no_grad():
        y0, h0 = cpp.selective_scan_cpu(*args, delta_softplus=True, return_last_state=True)
    y1, h1 = scan.selective_scan_chunked(*args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y0, y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h0, h1, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------------
def test_dispatch_auto_prefers_cpp_on_cpu(cpp, monkeypatch):
    monkeypatch.delenv("COMPRESSM_SCAN_IMPL", raising=False)
    assert scan.scan_implementation("cpu", torch.float32) == "cpp"
    assert scan.scan_implementation("cpu", torch.float64) == "chunked"  # float64 keeps its precision


@pytest.mark.parametrize("impl", ["ref", "chunked", "cpp"])
def test_dispatch_forced(impl, monkeypatch, cpp):
    x = make_inputs(1, 16, 20, 4, softplus=True)
    args = [x[k].float() for k in ("u", "delta", "A", "B", "C")]
    monkeypatch.setenv("COMPRESSM_SCAN_IMPL", impl)
    assert scan.scan_implementation("cpu", torch.float32) == impl
    y_env = scan.selective_scan(*args, delta_softplus=True)
    monkeypatch.setenv("COMPRESSM_SCAN_IMPL", "auto")
    y_arg = scan.selective_scan(*args, delta_softplus=True, impl=impl)
    torch.testing.assert_close(y_env, y_arg)
    ref = scan.selective_scan_ref(*(a.double() for a in args), delta_softplus=True)
    torch.testing.assert_close(y_arg.double(), ref, rtol=1e-4, atol=1e-5)


def test_dispatch_rejects_unknown(monkeypatch):
    monkeypatch.setenv("COMPRESSM_SCAN_IMPL", "fastest")
    with pytest.raises(ValueError, match="COMPRESSM_SCAN_IMPL='fastest'"):
        scan.scan_implementation("cpu")
    with pytest.raises(ValueError, match="impl='nope'"):
        scan.scan_implementation("cpu", impl="nope")


def test_disabled_kernel_falls_back(monkeypatch):
    """COMPRESSM_DISABLE_CPP_KERNEL=1: is_available() is False, one warning, auto -> chunked."""
    import logging

    from compressm_hf import kernels

    monkeypatch.setenv("COMPRESSM_DISABLE_CPP_KERNEL", "1")
    monkeypatch.setattr(kernels.loader, "_state", {"tried": False, "ok": False, "error": None})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    kernels.logger.addHandler(handler)
    try:
        assert kernels.is_available() is False
        assert kernels.is_available() is False
    finally:
        kernels.logger.removeHandler(handler)
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1
    assert "COMPRESSM_DISABLE_CPP_KERNEL" in kernels.build_error()
    monkeypatch.delenv("COMPRESSM_SCAN_IMPL", raising=False)
    assert scan.scan_implementation("cpu", torch.float32) == "chunked"
    with pytest.raises(RuntimeError, match="cpp"):
        scan.scan_implementation("cpu", impl="cpp")


def test_importing_compressm_hf_does_not_build(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, compressm_hf, compressm_hf.kernels as k; "
        "assert not k.loader._state['tried']; "
        "assert 'torch.utils.cpp_extension' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
