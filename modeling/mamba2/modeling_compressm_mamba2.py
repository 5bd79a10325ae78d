"""CompreSSM Mamba-2: transformers' Mamba-2 (SSD) language model with one state size per layer.

Parameter names and shapes are exactly those of `transformers.Mamba2ForCausalLM` (`backbone.embeddings`,
`backbone.layers.i.norm`, `backbone.layers.i.mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}`,
`backbone.norm_f`, `lm_head`). Only two tensors depend on a layer's state size `N_i`, through its
`n_groups * N_i` B block and C block:

* `in_proj.weight` (and `.bias`): rows `z | x | B | C | dt` = `d_inner | d_inner | G N_i | G N_i | heads`;
* `conv1d.weight` / `.bias`: channels `x | B | C` = `d_inner | G N_i | G N_i`.

So a stock `mamba2` checkpoint loads unchanged, and a model whose layers all have one size exports back to a
stock checkpoint (:func:`export_to_mamba2`). Loading a state dict whose B/C blocks have another state size
resizes the layer first (:meth:`CompreSSMMamba2Mixer.resize_`), so a model built at its original size
resumes from a checkpoint written after a reduction.

The scan is the plain-torch chunked SSD of ``ssd_mamba2`` (same results as transformers' torch path, any
state size per layer); cached decoding uses its one-token recurrent step.

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch,
transformers and same-folder modules (never ``compressm_hf``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2Mixer,
    Mamba2Model,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
)
from transformers.utils import logging

from .configuration_compressm_mamba2 import CompreSSMMamba2Config
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
from .ssd_mamba2 import discretize_dt, scan_block, ssd_chunk_scan, ssd_state_update

try:  # private helpers of transformers' Mamba-2 (5.2x); they may dispatch to hub kernels
    from transformers.models.mamba2.modeling_mamba2 import (
        apply_mask_to_padding_states,
        causal_conv1d_fn,
        causal_conv1d_update,
    )
except ImportError:  # moved or renamed in a later transformers: same semantics in plain torch
    from .ops_mamba import apply_mask_to_padding_states, causal_conv1d_fn, causal_conv1d_update
from . import ops_mamba as _plain_ops

# off CUDA, never transformers' dispatchers (they warn "install causal_conv1d ... much slower" on a CPU)
causal_conv1d_fn = _plain_ops.plain_off_cuda(causal_conv1d_fn, _plain_ops.causal_conv1d_fn)
causal_conv1d_update = _plain_ops.plain_off_cuda(causal_conv1d_update, _plain_ops.causal_conv1d_update)

logger = logging.get_logger(__name__)

# Modules an adapter (e.g. LoRA) on trains: they run as modules. conv1d's weight goes to the kernel directly.
SUPPORTED_ADAPTER_TARGETS = ("in_proj", "out_proj", "embeddings", "lm_head")
# Largest decay reported for the averaged surrogate: keeps it strictly stable when exp(dt * A) rounds to 1.
_MAX_SURROGATE_MODULUS = 1.0 - 1e-9


class _LayerConfig:
    """``config`` as seen by one layer: every attribute of the model's config, but this layer's ``state_size``."""

    def __init__(self, config, state_size: int):
        self._config = config
        self.state_size = int(state_size)

    def __getattr__(self, name):
        return getattr(self._config, name)


def _bc_channel_map(d_inner: int, n_groups: int, n: int, new_n: int, keep: torch.Tensor):
    """Where the channels of a ``x | B | C`` block go when each group keeps states ``keep``.

    Args:
        d_inner: channels of ``x`` (unchanged).
        n_groups, n, new_n: groups, old and new state size per group.
        keep: ``(n_groups, k)`` int64 old state indices, ``k <= min(n, new_n)``; new state ``j < k`` of a group
            is its old state ``keep[g, j]``, new states ``j >= k`` are new (zero).

    Returns:
        ``(src, dst)`` int64 channel indices: ``new[dst] = old[src]`` (every other new channel is zero);
        ``src`` has ``d_inner + 2 * n_groups * k`` entries.
    """
    G = n_groups
    k = keep.shape[1]
    groups = torch.arange(G)[:, None]
    old_b = (d_inner + groups * n + keep).reshape(-1)
    new_b = (d_inner + groups * new_n + torch.arange(k)[None, :]).reshape(-1)
    x = torch.arange(d_inner)
    src = torch.cat([x, old_b, old_b + G * n])
    dst = torch.cat([x, new_b, new_b + G * new_n])
    return src, dst


def _remap(t: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, rows: int) -> torch.Tensor:
    """A new ``(rows, *t.shape[1:])`` tensor with ``out[dst] = t[src]`` and zeros elsewhere."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[dst.to(t.device)] = t[src.to(t.device)]
    return out


def _psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    """Symmetric square root ``S`` (``S S^T = M``) of symmetric positive semi-definite ``(..., n, n)`` matrices."""
    M = 0.5 * (M + M.transpose(-1, -2))
    eigenvalues, vectors = torch.linalg.eigh(M)
    return (vectors * eigenvalues.clamp(min=0.0).sqrt()[..., None, :]) @ vectors.transpose(-1, -2)


class CompreSSMMamba2Mixer(Conv1dAdapterGuard, Mamba2Mixer):
    """Mamba-2 (SSD) mixer with its own state size ``N = config.state_sizes[layer_idx]``.

    Built by transformers' `Mamba2Mixer.__init__` (so names, shapes, initialization and tooling are the
    stock ones) with this layer's state size. Its own forward runs the plain-torch SSD of ``ssd_mamba2``:

    * full sequence (training, prefill): :func:`ssd_chunk_scan` (``chunk_size`` tokens per chunk);
    * cached decoding (one token): :func:`ssd_state_update`.

    ``in_proj``, ``norm`` and ``out_proj`` run as modules (adapters on them train); transformers' fused
    ``mamba_split_conv1d_scan_combined`` is never used. ``conv1d``'s weight goes to the causal-conv kernel
    directly, so wrapping it with an adapter raises ``UnsupportedAdapterError`` (``Conv1dAdapterGuard``).

    It implements the CompreSSM reduction protocol: while ``collect_statistics`` is on and the module is
    training, every full-sequence forward accumulates the statistics of an averaged surrogate
    (:meth:`lti_system`); :meth:`reduce_` keeps a subset of every group's state channels.

    Attributes:
        layer_idx: index into ``config.state_sizes``.
        state_size: current state size ``N`` per group (also ``ssm_state_size``).
        config: the model's (shared) config; :meth:`resize_` and :meth:`reduce_` update
            ``config.state_sizes[layer_idx]``.
        collect_statistics: accumulate surrogate statistics in training-mode forwards.
    """

    supported_adapter_targets = SUPPORTED_ADAPTER_TARGETS

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int, initialize_mixer_weights: bool = False):
        sizes = getattr(config, "state_sizes", None)
        n = int(sizes[layer_idx]) if sizes is not None else int(config.state_size)
        super().__init__(
            _LayerConfig(config, n), layer_idx, initialize_mixer_weights=initialize_mixer_weights
        )
        self.config = config
        self.collect_statistics = False
        self._stats: dict | None = None

    @property
    def state_size(self) -> int:
        """Current state size ``N`` (per group) of this layer."""
        return self.ssm_state_size

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, state_size={self.ssm_state_size}, n_groups={self.n_groups}"

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        cache_params=None,
        **kwargs,
    ):
        """``hidden_states`` ``(batch, length, hidden_size)`` -> same shape and dtype.

        ``cache`` (transformers >= 5.24's name; ``cache_params`` before) holds this layer's conv and
        recurrent state ``(batch, heads, head_dim, N)``: read for a one-token step and as the initial state
        of a longer chunk, written after every call.
        """
        self._check_conv1d(self.conv1d)
        cache = _one_cache(cache, cache_params)
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)
        else:
            conv_state, recurrent_state = None, None
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size

        # 1. input projection: z | x B C | dt
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        gate, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, H], dim=-1)

        # 2. causal depthwise convolution over x | B | C
        weight = self.conv1d.weight.squeeze(1)
        if cache is None:  # channels last as in_proj writes it: the fused C++ conv + SiLU on CPU
            xBC = _plain_ops.causal_conv1d_channels_last(
                xBC, weight, self.conv1d.bias, activation=self.activation
            )
        else:
            xBC = xBC.transpose(1, 2)
            if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
                xBC = causal_conv1d_update(
                    xBC, conv_state, weight, self.conv1d.bias, activation=self.activation
                )
            else:
                xBC = cache.update_conv_state(xBC, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
                xBC = causal_conv1d_fn(xBC, weight, self.conv1d.bias, activation=self.activation)[
                    :, :, -seq_len:
                ]
            xBC = xBC.transpose(1, 2)
        xBC = apply_mask_to_padding_states(xBC, attention_mask)
        x, B, C = torch.split(xBC, [self.intermediate_size, G * N, G * N], dim=-1)

        # 3. SSD
        A = -torch.exp(self.A_log.float())
        dt = discretize_dt(dt, self.dt_bias, tuple(self.time_step_limit))
        if recurrent_state is not None and seq_len == 1:
            y = ssd_state_update(
                recurrent_state,
                x.view(batch, H, P),
                dt[:, 0],
                A,
                B.view(batch, G, N),
                C.view(batch, G, N),
                self.D,
            )
        else:
            if self.collect_statistics and self.training:
                self._accumulate_statistics(
                    x.view(batch, seq_len, H, P),
                    dt,
                    A,
                    B.view(batch, seq_len, G, N),
                    C.view(batch, seq_len, G, N),
                    attention_mask,
                )
            result = ssd_chunk_scan(
                x.view(batch, seq_len, H, P),
                dt,
                A,
                B.view(batch, seq_len, G, N),
                C.view(batch, seq_len, G, N),
                chunk_size=scan_block(self.chunk_size),
                D=self.D,
                initial_state=recurrent_state,
                return_final_state=cache is not None,
            )
            if cache is not None:
                y, final_state = result
                cache.update_recurrent_state(final_state, layer_idx=self.layer_idx)
            else:
                y = result
        y = y.reshape(batch, seq_len, -1)

        # 4. gated RMS norm and output projection
        y = self.norm(y, gate)
        return self.out_proj(y.to(dtype))

    # ------------------------------------------------------------------ statistics (averaged surrogate)

    @torch.no_grad()
    def _accumulate_statistics(self, x, dt, A, B, C, attention_mask) -> None:
        """Add one batch to the surrogate statistics (float64 accumulators, no grad).

        ``x`` ``(b, L, H, P)`` head inputs, ``dt`` ``(b, L, H)`` discretized steps, ``A`` ``(H,)``,
        ``B``, ``C`` ``(b, L, G, N)`` (after the convolution; padding positions already zero).
        """
        b, L, H, _ = x.shape
        G, N = B.shape[-2], B.shape[-1]
        R = H // G
        dt = dt.float()
        drive = (
            dt * dt * x.float().pow(2).sum(-1)
        )  # (dt ||x_h||)^2: the head's p channels together, (b, L, H)
        one_minus_decay = -torch.expm1(dt * A.float())  # (b, L, H)
        Bf, Cf = B.float(), C.float()
        if attention_mask is not None and tuple(attention_mask.shape) == (b, L):
            w = attention_mask.to(torch.float32)
            drive, one_minus_decay = drive * w[..., None], one_minus_decay * w[..., None]
            Cw = Cf * w[..., None, None]
            tokens = w.sum().double()
        else:
            Cw = Cf
            tokens = torch.tensor(float(b * L), dtype=torch.float64, device=x.device)
        update = {
            "one_minus_decay": one_minus_decay.sum(dim=(0, 1)).double(),  # (H,)
            "input_cov": torch.einsum("blgr,blgn,blgm->grnm", drive.view(b, L, G, R), Bf, Bf).double(),
            "output_cov": torch.einsum("blgn,blgm->gnm", Cw, Cf).double(),
            "tokens": tokens,
        }
        s = self._stats
        if s is not None and (s["input_cov"].shape[-1] != N or s["tokens"].device != x.device):
            s = None  # collected at another state size (or on another device): start again
        if s is None:
            s = self._stats = {k: torch.zeros_like(v) for k, v in update.items()}
            s["batches"] = 0
        for k, v in update.items():
            s[k] += v
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
        """The averaged LTI surrogate: one dense system per head over its group's ``N`` states.

        With ``dt`` the discretized step, ``x`` the head's input (``head_dim`` channels), ``B``, ``C`` the
        group's input/output vectors and expectations over every (non-padding) token seen while collecting:

        * ``A[g, r] = a I`` with ``a = E[exp(dt A_h)]`` -- the head's mean decay, one scalar for all its states;
        * ``B[g, r] = sqrtm(E[dt^2 ||x||^2 B B^T])`` -- a square root of the drive's second-moment matrix
          (second moments: means of signed projections cancel), so ``B B^T`` is that matrix;
        * ``C[g, r] = sqrtm(E[C C^T])`` -- of the read-out's second moment (shared by the group's heads).

        The Gramians are then ``P = E[dt^2 ||x||^2 B B^T] / (1 - a^2)`` and ``Q = E[C C^T] / (1 - a^2)``,
        dense: with a scalar decay the state directions are not decoupled.

        Returns:
            ``LTISystem``-compatible record (``compressm_hf.LTISystem`` when importable): ``A``, ``B``, ``C``
            ``(G, R, N, N)`` float64 (``G`` groups of ``R = heads / G`` heads), ``diagonal=False``,
            ``reduction="grouped"`` (planned by ``compressm_hf.grouped.plan_grouped_reduction``).

        Raises:
            MissingStatisticsError: (a ``ValueError``) no statistics, or collected at another state size.
        """
        s = self._stats
        if s is None or float(s["tokens"]) <= 0:
            raise MissingStatisticsError(
                f"Mamba-2 layer {self.layer_idx} has no surrogate statistics (0 tokens collected): set "
                f"`mixer.collect_statistics = True` and run forward passes in training mode (model.train()) "
                f"before calling lti_system()."
            )
        G, N = self.n_groups, self.ssm_state_size
        R = self.num_heads // G
        tokens = float(s["tokens"])
        a = (1.0 - s["one_minus_decay"].cpu() / tokens).clamp(min=0.0, max=_MAX_SURROGATE_MODULUS)
        A = a.view(G, R, 1, 1) * torch.eye(N, dtype=torch.float64)
        B = _psd_sqrt(s["input_cov"].cpu() / tokens)
        C = _psd_sqrt(s["output_cov"].cpu() / tokens)[:, None].expand(G, R, N, N).clone()
        surrogate = (
            f"averaged LTI surrogate per head: A=E[exp(dt*A)] I, B=sqrtm(E[dt^2 |x|^2 B B^T]), C=sqrtm(E[C C^T]) "
            f"over {round(tokens)} tokens ({s['batches']} forward passes)"
        )
        return _make_lti_system(A, B, C, surrogate, diagonal=False, reduction="grouped")

    # ------------------------------------------------------------------ reduction

    @torch.no_grad()
    def reduce_(self, plan) -> list[ParamSwap]:
        """Keep the state channels ``plan.keep`` of every group (a subset, no rotation), in place.

        The ``in_proj`` rows and ``conv1d`` channels (weight and bias) of the kept B and C states become new
        ``nn.Parameter`` objects; ``A_log``, ``D``, ``dt_bias``, ``norm`` and ``out_proj`` are untouched.
        Updates ``state_size`` and ``config.state_sizes[layer_idx]`` and resets the statistics.

        Args:
            plan: a ``ReductionPlan`` (duck-typed) with ``rule == "modal"``, ``n`` the current state size,
                ``rank`` and ``keep``: ``(n_groups, rank)`` distinct state indices per group, or ``(rank,)``
                for the same states in every group.

        Returns:
            ``[ParamSwap(old, new, state_dim=0, keep)]`` for each replaced tensor, ``keep`` the old rows
            (``in_proj``) or channels (``conv1d``) that the new ones copy, in order.

        Raises:
            ValueError: a plan that does not fit this layer; ``UnsupportedAdapterError`` when ``in_proj`` or
            ``conv1d`` is wrapped by an adapter (nothing is changed then).
        """
        n, G = self.ssm_state_size, self.n_groups
        rule, keep = getattr(plan, "rule", None), getattr(plan, "keep", None)
        if rule != "modal" or keep is None:
            raise ValueError(
                f"Mamba-2 layer {self.layer_idx} can only absorb plans that keep a subset of its states (rule "
                f"'modal' with `keep`); got rule={rule!r}, keep={'None' if keep is None else 'given'}."
            )
        if int(plan.n) != n:
            raise ValueError(f"plan.n={plan.n} but Mamba-2 layer {self.layer_idx} has {n} states.")
        rank = int(plan.rank)
        keep = _checked_keep(keep, n, rank, f"Mamba-2 layer {self.layer_idx}", groups=G)
        for name in ("in_proj", "conv1d"):
            if not _is_plain(getattr(self, name), nn.Linear if name == "in_proj" else nn.Conv1d):
                raise UnsupportedAdapterError(
                    f"Cannot reduce Mamba-2 layer {self.layer_idx}: its {name} is wrapped by "
                    f"{type(getattr(self, name)).__name__}, which this layer cannot slice. Nothing was changed; "
                    f"merge the adapter (peft: merge_and_unload()) before compressing."
                )
        replaced = self._apply_maps(rank, self._param_maps(rank, keep))
        self.reset_statistics()
        return [ParamSwap(old, new, 0, src.clone()) for old, new, src in replaced]

    # ------------------------------------------------------------------ resizing

    def _param_maps(self, new_n: int, keep: torch.Tensor) -> dict:
        """How every state-size-dependent tensor changes when each group keeps states ``keep`` of ``new_n``.

        Args:
            new_n: the new state size per group.
            keep: ``(n_groups, k)`` old state indices (``k <= min(N, new_n)``) placed at new states ``0..k-1``.

        Returns:
            ``{"in_proj.weight" | "in_proj.bias" | "conv1d.weight" | "conv1d.bias": (src, dst, rows)}``: the new
            tensor has ``rows`` rows (dim 0), ``new[dst] = old[src]`` and zeros elsewhere.
        """
        d, H = self.intermediate_size, self.num_heads
        src, dst = _bc_channel_map(d, self.n_groups, self.ssm_state_size, new_n, keep)
        new_conv_dim = d + 2 * self.n_groups * new_n
        z = torch.arange(d)
        rows_src = torch.cat([z, d + src, d + self.conv_dim + torch.arange(H)])
        rows_dst = torch.cat([z, d + dst, d + new_conv_dim + torch.arange(H)])
        in_proj = (rows_src, rows_dst, d + new_conv_dim + H)
        conv = (src, dst, new_conv_dim)
        return {
            "in_proj.weight": in_proj,
            "in_proj.bias": in_proj,
            "conv1d.weight": conv,
            "conv1d.bias": conv,
        }

    def _apply_maps(self, new_n: int, maps: dict) -> list:
        """Replace the state-size-dependent parameters by remapped copies; returns ``[(old, new, src)]``."""
        replaced = []
        for name, (src, dst, rows) in maps.items():
            module_name, attr = name.split(".")
            module = getattr(self, module_name)
            old = getattr(module, attr)
            if old is None:
                continue
            new = nn.Parameter(_remap(old.detach(), src, dst, rows), requires_grad=old.requires_grad)
            setattr(module, attr, new)
            replaced.append((old, new, src))
        self.in_proj.out_features = maps["in_proj.weight"][2]
        self.conv_dim = maps["conv1d.weight"][2]
        self.conv1d.in_channels = self.conv1d.out_channels = self.conv1d.groups = self.conv_dim
        self.ssm_state_size = int(new_n)
        sizes = getattr(self.config, "state_sizes", None)
        if sizes is not None:
            sizes[self.layer_idx] = int(new_n)
            self.config.state_size = max(sizes)
        return replaced

    @torch.no_grad()
    def resize_(self, state_size: int) -> None:
        """Reshape this layer to ``state_size`` states per group, in place.

        The leading states of every group are kept; new states get zero ``in_proj`` rows and zero
        ``conv1d`` weights and bias, so their B and C are ``silu(0) = 0``: they are never driven and never
        read. Used when loading a checkpoint written after a reduction into a model built at its
        original size (see :meth:`_load_from_state_dict`).

        Raises:
            ValueError: ``state_size < 1``.
        """
        new_n = int(state_size)
        if new_n < 1:
            raise ValueError(f"state_size must be >= 1, got {state_size} (Mamba-2 layer {self.layer_idx}).")
        n = self.ssm_state_size
        if new_n == n:
            return
        keep = torch.arange(min(n, new_n)).expand(self.n_groups, -1)
        self._apply_maps(new_n, self._param_maps(new_n, keep))
        self.reset_statistics()

    def _state_size_of(self, in_proj_rows: int) -> int | None:
        """The state size whose ``in_proj`` has ``in_proj_rows`` rows, or ``None`` if none fits."""
        rest = in_proj_rows - 2 * self.intermediate_size - self.num_heads
        if rest <= 0 or rest % (2 * self.n_groups):
            return None
        return rest // (2 * self.n_groups)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight = state_dict.get(prefix + "in_proj.weight")
        if weight is not None and weight.dim() == 2 and weight.shape[0] != self.in_proj.weight.shape[0]:
            n = self._state_size_of(int(weight.shape[0]))
            if n is not None:
                logger.info(
                    f"Resizing Mamba-2 layer {self.layer_idx} from {self.ssm_state_size} to {n} states to load "
                    f"{prefix}in_proj.weight."
                )
                self.resize_(n)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CompreSSMMamba2Block(Mamba2Block):
    """Pre-norm residual block around :class:`CompreSSMMamba2Mixer` (same names as `Mamba2Block`)."""

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMamba2Mixer(config, layer_idx=layer_idx)


class CompreSSMMamba2PreTrainedModel(ShardedSaveMixin, Mamba2PreTrainedModel):
    """Base class: weight init of transformers' Mamba-2, config class :class:`CompreSSMMamba2Config`."""

    config_class = CompreSSMMamba2Config
    config: CompreSSMMamba2Config
    _no_split_modules = ["CompreSSMMamba2Block"]


class CompreSSMMamba2Model(CompreSSMMamba2PreTrainedModel, Mamba2Model):
    """The Mamba-2 backbone with per-layer state sizes (`config.state_sizes`)."""

    def __init__(self, config: CompreSSMMamba2Config):
        CompreSSMMamba2PreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [CompreSSMMamba2Block(config, layer_idx=idx) for idx in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False
        self.norm_f = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()

    forward = _accept_both_cache_names(Mamba2Model.forward)


class CompreSSMMamba2ForCausalLM(ReducibleMixersMixin, CompreSSMMamba2PreTrainedModel, Mamba2ForCausalLM):
    """Mamba-2 language model with per-layer state sizes; loads stock `mamba2` checkpoints."""

    def __init__(self, config: CompreSSMMamba2Config):
        CompreSSMMamba2PreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = _accept_both_cache_names(Mamba2ForCausalLM.forward)


# ---------------------------------------------------------------------- export


@torch.no_grad()
def export_to_mamba2(
    model: CompreSSMMamba2ForCausalLM, save_directory, pad: bool = False, **save_kwargs
) -> Mamba2Config:
    """Save ``model`` as a stock transformers ``mamba2`` checkpoint (``Mamba2ForCausalLM.from_pretrained``).

    Args:
        model: a :class:`CompreSSMMamba2ForCausalLM` without adapters (call peft's ``merge_and_unload()``
            first).
        save_directory: output folder (``save_pretrained``).
        pad: if the layers have different state sizes, zero-pad every layer to the largest one. This is
            **exact but gives no speed-up**: a padded state has zero ``in_proj`` rows and zero ``conv1d``
            weights and bias, so its B and C are ``silu(0) = 0``. Without ``pad``, a non-uniform model
            raises :class:`NonUniformStateSizesError`.
        **save_kwargs: passed to ``save_pretrained``.

    Returns:
        The ``Mamba2Config`` written.
    """
    if not isinstance(model, CompreSSMMamba2ForCausalLM):
        raise TypeError(
            f"export_to_mamba2 expects a CompreSSMMamba2ForCausalLM, got {type(model).__name__} "
            f"(for a peft model call merge_and_unload() first)."
        )
    _refuse_adapters(model, "export_to_mamba2")
    sizes = [m.state_size for m in model.mixers()]
    n = max(sizes)
    if len(set(sizes)) > 1 and not pad:
        raise NonUniformStateSizesError(
            f"Cannot export to a stock `mamba2` checkpoint: the layers have different state sizes {sizes}, and "
            f"transformers' Mamba2Config has one `state_size`. Pass pad=True to zero-pad every layer to {n} "
            f"states (exact, but no speed-up), or keep the compressm_mamba2 format (trust_remote_code)."
        )
    state_dict = dict(model.state_dict())
    for i, mixer in enumerate(model.mixers()):
        k = mixer.state_size
        if k == n:
            continue
        keep = torch.arange(k).expand(mixer.n_groups, -1)
        p = f"backbone.layers.{i}.mixer."
        for name, (src, dst, rows) in mixer._param_maps(n, keep).items():
            if p + name in state_dict:
                state_dict[p + name] = _remap(state_dict[p + name], src, dst, rows)
    return _save_as_stock(
        model, state_dict, Mamba2ForCausalLM, Mamba2Config, n, save_directory, **save_kwargs
    )


__all__ = [
    "CompreSSMMamba2Block",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
    "export_to_mamba2",
]
