"""CompreSSM Mamba: transformers' Mamba (S6) language model with one state size per layer.

Parameter names and shapes are exactly those of `transformers.MambaForCausalLM`
(`backbone.embeddings`, `backbone.layers.i.norm`, `backbone.layers.i.mixer.{A_log, D, conv1d, in_proj,
x_proj, dt_proj, out_proj}`, `backbone.norm_f`, tied `lm_head`); only `A_log` (`[d_inner, N_i]`) and
`x_proj.weight` (`[R + 2 N_i, d_inner]`, rows `dt | B | C`) depend on the layer's state size `N_i`.
So a stock `mamba` checkpoint loads unchanged, and a model whose layers all have one size exports
back to a stock checkpoint (:func:`export_to_mamba`).

The mixer implements the CompreSSM reduction protocol (see `docs/architecture.md`): while
``collect_statistics`` is on and the module is training, every forward accumulates the statistics of
an averaged LTI surrogate (:meth:`CompreSSMMambaMixer.lti_system`); :meth:`~CompreSSMMambaMixer.reduce_`
keeps a shared subset of the diagonal states (modal truncation, kernel compatible);
:meth:`~CompreSSMMambaMixer.resize_` reshapes a layer, and loading a state dict with another state size
resizes the layer first.

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch,
transformers and same-folder modules (never ``compressm_hf``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MambaConfig, MambaForCausalLM
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaMixer,
    MambaModel,
    MambaPreTrainedModel,
    MambaRMSNorm,
)
from transformers.utils import logging

from .checkpoint_keys import (
    compressed_adapter_mismatch,
    drop_tied_missing_keys,
    refuse_adapter_wrapped_checkpoint,
)
from .configuration_compressm_mamba import CompreSSMMambaConfig
from .modeling_common import (
    Conv1dAdapterGuard,
    MissingStatisticsError,
    NonUniformStateSizesError,
    ParamSwap,
    ReducibleMixersMixin,
    ShardedSaveMixin,
    UnsupportedAdapterError,
    _accept_both_cache_names,
    _checked_keep,
    _is_plain,
    _make_lti_system,
    _one_cache,
    _refuse_adapters,
    _save_as_stock,
)
from .scan_mamba import ScanMoments, selective_scan

try:  # private helpers of transformers' Mamba (5.20-5.24); they may dispatch to hub kernels
    from transformers.models.mamba.modeling_mamba import (
        apply_mask_to_padding_states,
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_selective_state_update,
    )
except ImportError:  # moved or renamed in a later transformers: same semantics in plain torch
    from .ops_mamba import (
        apply_mask_to_padding_states,
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_selective_state_update,
    )
from . import ops_mamba as _plain_ops
from .ops_mamba import plain_off_cuda as _plain_off_cuda

causal_conv1d_fn = _plain_off_cuda(causal_conv1d_fn, _plain_ops.causal_conv1d_fn)
causal_conv1d_update = _plain_off_cuda(causal_conv1d_update, _plain_ops.causal_conv1d_update)
mamba_selective_state_update = _plain_off_cuda(
    mamba_selective_state_update, _plain_ops.mamba_selective_state_update
)

logger = logging.get_logger(__name__)

# Largest modulus reported for the averaged decay: keeps the surrogate strictly stable even when
# exp(dt * A) rounds to 1 for a nearly-zero A (a state with very long memory scores very high anyway).
_MAX_SURROGATE_MODULUS = 1.0 - 1e-9

SUPPORTED_ADAPTER_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj", "embeddings")


def _state_rows(time_step_rank: int, n: int, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_proj.weight`` (``dt | B | C``) that survive keeping states ``keep`` of ``n``."""
    keep = keep.to(torch.long)
    return torch.cat([torch.arange(time_step_rank), time_step_rank + keep, time_step_rank + n + keep])


def _resize_rows(w: torch.Tensor, time_step_rank: int, n: int, new_n: int) -> torch.Tensor:
    """``x_proj`` rows for ``new_n`` states: the leading states are kept, new B/C rows are zero."""
    R = time_step_rank
    if new_n <= n:
        return w[_state_rows(R, n, torch.arange(new_n)).to(w.device)].clone()
    pad = w.new_zeros((new_n - n, *w.shape[1:]))
    return torch.cat([w[:R], w[R : R + n], pad, w[R + n : R + 2 * n], pad], dim=0)


def _resize_columns(a_log: torch.Tensor, new_n: int) -> torch.Tensor:
    """``A_log`` for ``new_n`` states: leading columns kept, new columns 0 (``A = -1``, stable)."""
    n = a_log.shape[1]
    if new_n <= n:
        return a_log[:, :new_n].clone()
    return torch.cat([a_log, a_log.new_zeros(a_log.shape[0], new_n - n)], dim=1)


def _token_weights(attention_mask, batch: int, length: int) -> torch.Tensor | None:
    """``(batch, length)`` float32 token weights from a padding mask of that shape, else None (all 1)."""
    if attention_mask is not None and tuple(attention_mask.shape) == (batch, length):
        return attention_mask.to(torch.float32)
    return None


class CompreSSMMambaMixer(Conv1dAdapterGuard, MambaMixer):
    """Mamba (S6) mixer with its own state size and the CompreSSM reduction protocol.

    A reimplementation of `transformers.MambaMixer` (and an instance of it, so transformers' weight
    init and tooling apply) that reads its state size from ``config.state_sizes[layer_idx]``.

    Paths:
        * full sequence (training, prefill): :func:`selective_scan` from ``scan_mamba`` (mamba_ssm's
          CUDA kernel, a compiled CPU kernel or a chunked torch scan). The fused ``mamba_inner_fn`` is
          never used, so ``in_proj``, ``x_proj``, ``dt_proj`` and ``out_proj`` always run as modules
          and adapters on them train on every device.
        * cached decoding (one token): the recurrent step (``selective_state_update``).
        * ``conv1d``'s weight is passed to the causal-conv kernel directly, so an adapter on it would be
          silently ignored: wrapping it (e.g. LoRA ``target_modules=["conv1d"]``) raises
          :class:`UnsupportedAdapterError` at injection time (and in forward, as a backstop). peft's
          ``modules_to_save=["conv1d"]`` is allowed: its wrapper forwards ``.weight`` to the trainable copy.

    Attributes:
        layer_idx: index into ``config.state_sizes``.
        state_size: current number of states ``N`` (also ``ssm_state_size``).
        collect_statistics: when True and the module is training, every full-sequence forward
            accumulates the surrogate statistics (see :meth:`lti_system`).
    """

    supported_adapter_targets = SUPPORTED_ADAPTER_TARGETS
    adapter_targets_note = " (lm_head is tied to embeddings)"

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int, initialize_mixer_weights: bool = False):
        nn.Module.__init__(self)
        self.config = config  # the model's (shared) config: reduce_/resize_ update config.state_sizes
        self.hidden_size = config.hidden_size
        sizes = getattr(config, "state_sizes", None)
        self.ssm_state_size = int(sizes[layer_idx]) if sizes is not None else int(config.state_size)
        self.conv_kernel_size = config.conv_kernel
        self.intermediate_size = config.intermediate_size
        self.time_step_rank = int(config.time_step_rank)
        self.layer_idx = layer_idx
        self.use_conv_bias = config.use_conv_bias
        self.conv1d = nn.Conv1d(
            in_channels=self.intermediate_size,
            out_channels=self.intermediate_size,
            bias=config.use_conv_bias,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
        )
        self.activation = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        self.use_mambapy = config.use_mambapy
        self.use_associative_scan = config.use_associative_scan
        self.in_proj = nn.Linear(self.hidden_size, self.intermediate_size * 2, bias=config.use_bias)
        self.x_proj = nn.Linear(
            self.intermediate_size, self.time_step_rank + self.ssm_state_size * 2, bias=False
        )
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        if initialize_mixer_weights and self.dt_proj.weight.device.type != "meta":
            self.init_mamba_weights()
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.use_bias = config.use_bias
        self.layer_type = "linear_attention"
        self.collect_statistics = False
        self._stats: dict | None = None

    # ------------------------------------------------------------------ protocol attributes

    @property
    def state_size(self) -> int:
        """Current number of states ``N`` of this layer."""
        return self.ssm_state_size

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, state_size={self.ssm_state_size}"

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.LongTensor | None = None,
        cache_params=None,
        **kwargs,
    ):
        """``hidden_states`` ``(batch, length, hidden_size)`` -> same shape.

        ``cache`` (transformers >= 5.24's name; ``cache_params`` before) holds this layer's conv and
        recurrent state: read for a one-token decoding step, written after a full sequence.
        """
        self._check_conv1d(self.conv1d)
        cache_params = _one_cache(cache, cache_params)
        seq_len = hidden_states.shape[1]
        dtype = hidden_states.dtype
        if cache_params is not None:
            conv_state = cache_params.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache_params.get_recurrent_state(self.layer_idx, state_idx=0)
        else:
            conv_state, recurrent_state = None, None

        # 1. input projection
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected_states = self.in_proj(hidden_states).transpose(1, 2)
        x, gate = projected_states.chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())

        # 2. causal depthwise convolution
        if conv_state is not None and seq_len == 1 and not cache_params.is_recording_past(self.layer_idx):
            x = causal_conv1d_update(
                x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation
            )
        else:
            if cache_params is not None:
                x = cache_params.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            if cache_params is None and not x.is_cuda:
                # one layout (b, L, d) through conv, x_proj and scan: fused conv + SiLU, no transposed copies
                x = _plain_ops.causal_conv1d_channels_last(
                    x.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation
                ).transpose(1, 2)
            else:
                x = causal_conv1d_fn(
                    x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation
                )
            if cache_params is not None:
                x = x[:, :, -seq_len:]

        # 3. input-dependent dt, B, C
        x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # (b, L, d)
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        if _is_plain(self.dt_proj, nn.Linear):
            # as transformers/mamba_ssm: the bias is added in float32 inside the scan
            # (b, L, d) viewed as (b, d, L): channels innermost, as the fused scan reads it
            dt = nn.functional.linear(time_step, self.dt_proj.weight).transpose(1, 2)
            dt_bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
        else:
            # an adapter (e.g. LoRA) wraps dt_proj: run it as a module so that it takes part
            dt = self.dt_proj(time_step).transpose(1, 2)
            dt_bias = None

        # 4. selective scan
        if recurrent_state is not None and seq_len == 1:
            scan_output = mamba_selective_state_update(
                recurrent_state,
                x.transpose(1, 2)[..., 0],
                dt[..., 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                z=gate[..., 0],
                dt_bias=dt_bias,
                dt_softplus=True,
            ).unsqueeze(-1)
        else:
            u = x.transpose(1, 2)
            moments = None
            if self.collect_statistics and self.training:
                moments = ScanMoments(_token_weights(attention_mask, u.shape[0], u.shape[2]))
            output_final_state = cache_params is not None
            scan_result = selective_scan(
                u,
                dt,
                A,
                B.transpose(1, 2),
                C.transpose(1, 2),
                D=self.D.float(),
                z=gate,
                delta_bias=dt_bias,
                delta_softplus=True,
                return_last_state=output_final_state,
                moments=moments,
            )
            if moments is not None:
                self._accumulate_statistics(moments, C)
            if output_final_state:
                scan_output, final_state = scan_result
                cache_params.update_recurrent_state(final_state, self.layer_idx)
            else:
                scan_output = scan_result

        # 5. output projection
        return self.out_proj(scan_output.transpose(1, 2).to(dtype))

    # ------------------------------------------------------------------ statistics (averaged LTI surrogate)

    @torch.no_grad()
    def _accumulate_statistics(self, moments: ScanMoments, C: torch.Tensor) -> None:
        """Add one batch to the surrogate statistics (float64 accumulators, no grad).

        ``moments``: filled by this forward's :func:`selective_scan` (``one_minus_decay`` and
        ``input_energy``, ``(d, n)`` float64 sums over tokens; fused into the C++ scan on CPU);
        ``C``: ``(b, L, n)``.
        """
        one_minus_decay, input_energy = moments.one_minus_decay, moments.input_energy
        d, n = one_minus_decay.shape
        device = one_minus_decay.device
        C2 = C.float() * C.float()
        w = moments.weights
        if w is not None:
            C2 = C2 * w.to(torch.float32)[..., None]
            tokens = w.to(torch.float64).sum()  # a tensor: no host sync while training
        else:
            tokens = float(C.shape[0] * C.shape[1])
        output_energy = C2.sum(dim=(0, 1)).double()

        s = self._stats
        if s is not None and s["one_minus_decay"].device != device:  # the model moved: keep the statistics
            s = self._stats = {k: v.to(device) if torch.is_tensor(v) else v for k, v in s.items()}
        if s is None or s["one_minus_decay"].shape != (d, n):
            s = self._stats = {
                "one_minus_decay": torch.zeros(d, n, dtype=torch.float64, device=device),
                "input_energy": torch.zeros(d, n, dtype=torch.float64, device=device),
                "output_energy": torch.zeros(n, dtype=torch.float64, device=device),
                "tokens": torch.zeros((), dtype=torch.float64, device=device),
                "batches": 0,
            }
        s["one_minus_decay"] += one_minus_decay
        s["input_energy"] += input_energy
        s["output_energy"] += output_energy
        s["tokens"] += tokens
        s["batches"] += 1

    @property
    def statistics_tokens(self) -> int:
        """Number of (non-padding) tokens the current statistics were collected over."""
        return 0 if self._stats is None else int(round(float(self._stats["tokens"])))

    def reset_statistics(self) -> None:
        """Forget the collected surrogate statistics."""
        self._stats = None

    @torch.no_grad()
    def lti_system(self):
        """The averaged LTI surrogate of this selective layer: one diagonal SISO system per channel.

        With ``delta = softplus(dt_proj(x_proj(u)_dt))`` the per-token step, ``u`` the scan input,
        ``A = -exp(A_log)`` and the expectations taken over every (non-padding) token the layer saw
        while collecting (batch and time):

        * ``A_bar[d, n] = E[exp(delta[d] * A[d, n])]`` -- mean discretized decay, in ``[0, 1)``;
        * ``B_bar[d, n] = sqrt(E[(delta[d] * B[n] * u[d])^2])`` -- RMS of the actual drive of state ``n``
          of channel ``d`` (second moment: means of signed projections cancel);
        * ``C_bar[d, n] = sqrt(E[C[n]^2])`` -- RMS of the shared read-out of state ``n``.

        For this diagonal system driven by unit white noise, ``P_ii = B_bar^2 / (1 - A_bar^2)`` is the
        stationary energy of state ``i`` and ``sqrt(P_ii Q_ii) = B_bar C_bar / (1 - A_bar^2)`` its modal
        importance; the planner sums it over channels to pick one shared keep-set per layer.

        Returns:
            ``LTISystem``-compatible record (``compressm_hf.LTISystem`` when importable): ``A``
            ``(d_inner, n)`` float64, ``B`` ``(d_inner, n, 1)``, ``C`` ``(d_inner, 1, n)``,
            ``diagonal=True``, ``reduction="modal"``, ``surrogate`` describing the statistics.

        Raises:
            MissingStatisticsError: (a ``ValueError``) if no statistics were collected.
        """
        s = self._stats
        if s is None or float(s["tokens"]) <= 0:
            raise MissingStatisticsError(
                f"Mamba layer {self.layer_idx} has no surrogate statistics (0 tokens collected): set "
                f"`mixer.collect_statistics = True` and run forward passes in training mode (model.train()) "
                f"before calling lti_system()."
            )
        if s["one_minus_decay"].shape[1] != self.ssm_state_size:
            raise MissingStatisticsError(
                f"Mamba layer {self.layer_idx}: the statistics were collected with "
                f"{s['one_minus_decay'].shape[1]} states but the layer now has {self.ssm_state_size}; "
                f"call reset_statistics() and collect again."
            )
        tokens = float(s["tokens"])
        A_bar = (1.0 - s["one_minus_decay"].cpu() / tokens).clamp(min=0.0, max=_MAX_SURROGATE_MODULUS)
        B_bar = (s["input_energy"].cpu() / tokens).clamp(min=0.0).sqrt().unsqueeze(-1)
        C_row = (s["output_energy"].cpu() / tokens).clamp(min=0.0).sqrt()
        C_bar = C_row.expand(self.intermediate_size, self.ssm_state_size).unsqueeze(1).clone()
        surrogate = (
            f"averaged LTI surrogate per channel: A=E[exp(dt*A)], B=sqrt(E[(dt*B_n*u)^2]), "
            f"C=sqrt(E[C_n^2]) over {round(tokens)} tokens ({s['batches']} forward passes)"
        )
        return _make_lti_system(A_bar, B_bar, C_bar, surrogate)

    # ------------------------------------------------------------------ reduction

    def _state_row_params(self) -> tuple[list[tuple[nn.Module, str]], list[nn.Module]]:
        """Every ``(module, attribute)`` of ``x_proj`` whose dim 0 is ``R + 2N`` and the modules whose
        ``out_features`` follows; raises :class:`UnsupportedAdapterError` for wrappers it cannot slice."""
        xp = self.x_proj
        if _is_plain(xp, nn.Linear):
            params = [(xp, "weight")] + ([(xp, "bias")] if xp.bias is not None else [])
            return params, [xp]
        base = getattr(xp, "base_layer", None)
        lora_B = getattr(xp, "lora_B", None)
        variants = getattr(xp, "lora_variant", {}) or {}
        magnitude = getattr(xp, "lora_magnitude_vector", {}) or {}
        extra = [
            name
            for name in (
                "lora_embedding_B",
                "ia3_l",
                "hada_w1_a",
                "lokr_w1",
                "oft_R",
                "boft_R",
                "vera_lambda_b",
            )
            if len(getattr(xp, name, {}) or {}) > 0
        ]
        if (
            base is None
            or not _is_plain(base, nn.Linear)
            or not isinstance(lora_B, nn.ModuleDict)
            or len(variants) > 0
            or len(magnitude) > 0
            or extra
            or not all(_is_plain(m, nn.Linear) for m in lora_B.values())
        ):
            raise UnsupportedAdapterError(
                f"Cannot reduce Mamba layer {self.layer_idx}: its x_proj is wrapped by "
                f"{type(xp).__module__}.{type(xp).__name__}, which this layer cannot slice (supported: plain "
                f"LoRA on x_proj, without DoRA or other variants). Nothing was changed; remove the adapter from "
                f"x_proj (or merge it) before compressing, or target in_proj / dt_proj / out_proj instead."
            )
        params = [(base, "weight")] + ([(base, "bias")] if base.bias is not None else [])
        owners = [base, xp]
        for m in lora_B.values():
            params.append((m, "weight"))
            if m.bias is not None:
                params.append((m, "bias"))
            owners.append(m)
        return params, owners

    def _apply_state_change(self, new_n: int, a_log_fn, rows_fn) -> list[tuple[nn.Parameter, nn.Parameter]]:
        row_params, owners = self._state_row_params()  # validates before anything changes
        replaced = []
        old = self.A_log
        new = nn.Parameter(a_log_fn(old.detach()), requires_grad=old.requires_grad)
        self.A_log = new
        replaced.append((old, new))
        for module, attr in row_params:
            old = getattr(module, attr)
            new = nn.Parameter(rows_fn(old.detach()), requires_grad=old.requires_grad)
            setattr(module, attr, new)
            replaced.append((old, new))
        rows = self.time_step_rank + 2 * new_n
        for m in owners:
            m.out_features = rows
        self.ssm_state_size = int(new_n)
        sizes = getattr(self.config, "state_sizes", None)
        if sizes is not None:
            sizes[self.layer_idx] = int(new_n)
            self.config.state_size = max(sizes)
        self.reset_statistics()
        return replaced

    @torch.no_grad()
    def reduce_(self, plan) -> list[ParamSwap]:
        """Keep the diagonal states ``plan.keep`` (modal truncation), in place.

        ``A_log[:, keep]`` and the ``x_proj`` rows ``dt | B[keep] | C[keep]`` (also of a LoRA adapter's
        base layer and ``lora_B``) become new ``nn.Parameter`` objects; ``dt_proj``, ``D``, ``conv1d`` are
        untouched. Updates ``state_size`` and ``config.state_sizes[layer_idx]`` and resets the statistics.

        Args:
            plan: a ``ReductionPlan`` (duck-typed) with ``rule == "modal"``, ``n`` the current state
                size, ``rank`` and ``keep`` (``(rank,)`` distinct indices in ``[0, n)``).

        Returns:
            ``[(old, new, state_dim, keep)]``: ``A_log`` with ``state_dim=1`` and ``keep``; every
            ``x_proj`` row tensor with ``state_dim=0`` and the kept row indices.
        """
        n = self.ssm_state_size
        rule = getattr(plan, "rule", None)
        keep = getattr(plan, "keep", None)
        if rule != "modal" or keep is None:
            raise ValueError(
                f"Mamba layer {self.layer_idx} can only absorb modal plans with `keep` indices (kept diagonal "
                f"states); got rule={rule!r}, keep={'None' if keep is None else 'given'}."
            )
        if int(plan.n) != n:
            raise ValueError(f"plan.n={plan.n} but Mamba layer {self.layer_idx} has {n} states.")
        rank = int(plan.rank)
        keep = _checked_keep(keep, n, rank, f"Mamba layer {self.layer_idx}")
        rows = _state_rows(self.time_step_rank, n, keep)
        replaced = self._apply_state_change(
            rank,
            lambda a: a[:, keep.to(a.device)].clone(),
            lambda w: w[rows.to(w.device)].clone(),
        )
        swaps = [ParamSwap(replaced[0][0], replaced[0][1], 1, keep.clone())]
        swaps += [ParamSwap(old, new, 0, rows.clone()) for old, new in replaced[1:]]
        return swaps

    @torch.no_grad()
    def resize_(self, state_size: int) -> None:
        """Reshape this layer to ``state_size`` states (values of new entries unspecified: the leading
        states are kept, new ``A_log`` columns are 0 and new B/C rows of ``x_proj`` are 0).

        Used when loading a checkpoint written after a reduction into a model built at its original
        size (see :meth:`_load_from_state_dict`).
        """
        new_n = int(state_size)
        if new_n < 1:
            raise ValueError(f"state_size must be >= 1, got {state_size} (layer {self.layer_idx}).")
        n = self.ssm_state_size
        if new_n == n:
            return
        R = self.time_step_rank
        self._apply_state_change(
            new_n, lambda a: _resize_columns(a, new_n), lambda w: _resize_rows(w, R, n, new_n)
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        a_log = state_dict.get(prefix + "A_log")
        if (
            a_log is not None
            and a_log.dim() == 2
            and a_log.shape[0] == self.intermediate_size
            and a_log.shape[1] != self.ssm_state_size
        ):
            logger.info(
                f"Resizing Mamba layer {self.layer_idx} from {self.ssm_state_size} to {a_log.shape[1]} states "
                f"to load {prefix}A_log."
            )
            self.resize_(int(a_log.shape[1]))
        elif a_log is None:  # e.g. a peft adapter file: its x_proj rows must fit this layer's state size
            rows = self.time_step_rank + 2 * self.ssm_state_size
            for key in (k for k in state_dict if k.startswith(prefix + "x_proj.lora_B.")):
                value = state_dict[key]
                if value.dim() == 2 and value.shape[0] != rows:
                    raise compressed_adapter_mismatch(key, value.shape, (rows, value.shape[1]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CompreSSMMambaBlock(MambaBlock):
    """Pre-norm residual block around :class:`CompreSSMMambaMixer` (same names as `MambaBlock`)."""

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMambaMixer(config, layer_idx=layer_idx)


class CompreSSMMambaPreTrainedModel(ShardedSaveMixin, MambaPreTrainedModel):
    """Base class: weight init of transformers' Mamba, config class :class:`CompreSSMMambaConfig`."""

    config_class = CompreSSMMambaConfig
    config: CompreSSMMambaConfig
    _no_split_modules = ["CompreSSMMambaBlock", "CompreSSMMambaMixer"]

    def post_init(self):
        super().post_init()
        # a tied lm_head is never saved: `load_state_dict` (Trainer resume) must not report it missing
        self.register_load_state_dict_post_hook(drop_tied_missing_keys)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        super()._adjust_missing_and_unexpected_keys(loading_info)
        refuse_adapter_wrapped_checkpoint(
            self,
            loading_info.missing_keys,
            loading_info.unexpected_keys,
            source=self.name_or_path or "the checkpoint",
        )


class CompreSSMMambaModel(CompreSSMMambaPreTrainedModel, MambaModel):
    """The Mamba backbone with per-layer state sizes (`config.state_sizes`)."""

    def __init__(self, config: CompreSSMMambaConfig):
        CompreSSMMambaPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [CompreSSMMambaBlock(config, layer_idx=idx) for idx in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()

    forward = _accept_both_cache_names(MambaModel.forward)


class CompreSSMMambaForCausalLM(ReducibleMixersMixin, CompreSSMMambaPreTrainedModel, MambaForCausalLM):
    """Mamba language model (tied `lm_head`) with per-layer state sizes; loads stock `mamba` checkpoints."""

    def __init__(self, config: CompreSSMMambaConfig):
        CompreSSMMambaPreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = _accept_both_cache_names(MambaForCausalLM.forward)


# ---------------------------------------------------------------------- export


@torch.no_grad()
def export_to_mamba(
    model: CompreSSMMambaForCausalLM, save_directory, pad: bool = False, **save_kwargs
) -> MambaConfig:
    """Save ``model`` as a stock transformers ``mamba`` checkpoint (``MambaForCausalLM.from_pretrained``).

    Args:
        model: a :class:`CompreSSMMambaForCausalLM` without adapters (call peft's
            ``merge_and_unload()`` first).
        save_directory: output folder (``save_pretrained``).
        pad: if the layers have different state sizes, zero-pad every layer to the largest one. This
            is **exact but gives no speedup**: a padded state has zero B and C rows in ``x_proj`` (so it
            is never driven and never read) and ``A_log = 0`` (``A = -1``, stable). Without ``pad``, a
            non-uniform model raises :class:`NonUniformStateSizesError`.
        **save_kwargs: passed to ``save_pretrained`` (e.g. ``safe_serialization``).

    Returns:
        The ``MambaConfig`` written.
    """
    if not isinstance(model, CompreSSMMambaForCausalLM):
        raise TypeError(
            f"export_to_mamba expects a CompreSSMMambaForCausalLM, got {type(model).__name__} "
            f"(for a peft model call merge_and_unload() first)."
        )
    _refuse_adapters(model, "export_to_mamba")
    sizes = [m.state_size for m in model.mixers()]
    n = max(sizes)
    if len(set(sizes)) > 1 and not pad:
        raise NonUniformStateSizesError(
            f"Cannot export to a stock `mamba` checkpoint: the layers have different state sizes {sizes}, and "
            f"transformers' MambaConfig has one `state_size`. Pass pad=True to zero-pad every layer to {n} "
            f"states (exact, but no speedup), or keep the compressm_mamba format (trust_remote_code)."
        )
    state_dict = dict(model.state_dict())
    R = int(model.config.time_step_rank)
    for i, k in enumerate(sizes):
        if k != n:
            p = f"backbone.layers.{i}.mixer."
            state_dict[p + "A_log"] = _resize_columns(state_dict[p + "A_log"], n)
            state_dict[p + "x_proj.weight"] = _resize_rows(state_dict[p + "x_proj.weight"], R, k, n)
    # intermediate_size is derived from expand * hidden_size
    return _save_as_stock(
        model,
        state_dict,
        MambaForCausalLM,
        MambaConfig,
        n,
        save_directory,
        drop=("intermediate_size",),
        **save_kwargs,
    )


__all__ = [
    "CompreSSMMambaBlock",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaMixer",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
    "MissingStatisticsError",
    "NonUniformStateSizesError",
    "ParamSwap",
    "UnsupportedAdapterError",
    "export_to_mamba",
]
