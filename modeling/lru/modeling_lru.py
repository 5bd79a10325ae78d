# Copyright 2026 The compressm-hf developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""PyTorch Linear Recurrent Unit (LRU) models, compressible in training by CompreSSM (arXiv 2510.02823).

The LRU (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences") is the diagonal
complex linear recurrence

    x[k] = diag(lambda) x[k-1] + diag(gamma) (B_re + i B_im) u[k],      y[k] = Re((C_re + i C_im) x[k]) + D * u[k]

with ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` and ``gamma = exp(gamma_log)``. Its mixer
(:class:`LRUMixer`) implements the reduction protocol of ``compressm_hf`` (``lti_system`` / ``reduce_`` /
``resize_``) by duck typing: this file imports only torch, transformers and its own folder, because it is
copied next to saved models for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .checkpoint_keys import drop_tied_missing_keys, refuse_adapter_wrapped_checkpoint
from .configuration_lru import LRUConfig
from .modeling_common import ParamSwap, ShardedSaveMixin, _checked_keep, _make_lti_system
from .scan_lru import lru_scan_chunked, lru_scan_sequential

logger = logging.get_logger(__name__)

# Names of the state-dependent parameters of an LRU mixer and the axis that indexes states.
_STATE_PARAMS = {
    "nu_log": 0,
    "theta_log": 0,
    "gamma_log": 0,
    "B_re": 0,
    "B_im": 0,
    "C_re": 1,
    "C_im": 1,
}


# The field a model output holds its cache in: `cache` from transformers 5.24 on, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(*given: LRUCache | None) -> LRUCache | None:
    """The cache passed under any of its names (``cache``, ``past_key_values``, ``cache_params``)."""
    caches = {id(c): c for c in given if c is not None}
    if len(caches) > 1:
        raise ValueError(
            "Pass the recurrent cache once, as `cache` (older names: `past_key_values`, `cache_params`)."
        )
    return next(iter(caches.values()), None)


# the name this file gave the record before it moved to modeling_common.py (the same class)
LRUParamSwap = ParamSwap


class LRUCacheLayer(LinearAttentionLayer):
    """Recurrent state of one LRU layer: ``(batch, n_layer)`` complex, allocated from the first state written.

    Unlike the stock linear-attention layer (whose ``has_previous_state`` is only set by a conv-state update),
    writing the recurrent state marks the layer as holding a previous state.
    """

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs
    ) -> torch.Tensor:
        if self.device is None:
            self.device, self.dtype = recurrent_states.device, recurrent_states.dtype
        states = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        self.has_previous_state[state_idx] = True
        return states


class LRUCache(Cache):
    """Cache of an LRU stack for recurrent decoding: one complex state per layer, O(1) per generated token.

    Each layer's state has its own size (``config.state_sizes``); the shapes are taken from the states written,
    so the cache never reads the config's sizes. ``get_seq_length`` counts the tokens consumed so far.
    """

    def __init__(self, config: LRUConfig | None = None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("LRUCache needs a `config` or `num_layers`.")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[LRUCacheLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


# Copied from transformers.models.mamba.modeling_mamba.MambaRMSNorm with Mamba->LRU
class LRURMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        """
        LRURMSNorm is equivalent to T5LayerNorm and LlamaRMSNorm
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class LRUBatchNorm(nn.BatchNorm1d):
    """BatchNorm without affine parameters over ``(batch, seq_len, H)`` inputs, as in the paper's LRU block.

    Training mode: each of the ``H`` channels is normalized with the mean and (biased) variance over the batch
    *and* time, computed over the real positions only when an ``attention_mask`` is given (padding positions
    come out as 0), and the running statistics (buffers ``running_mean``, ``running_var``, of shape ``(H,)``,
    float32) are updated with ``momentum``. Evaluation mode: the running statistics, position by position, so
    the output at a position depends on that position only. (Under gradient checkpointing the recomputed
    forward updates the running statistics a second time with the same batch.)
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(hidden_size, eps=eps, momentum=momentum, affine=False, track_running_stats=True)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(batch, seq_len, H) -> (batch, seq_len, H)``; ``attention_mask`` ``(batch, >= seq_len)``, 1 = real."""
        hidden = hidden_states.shape[-1]
        if not self.training:
            return self._normalize(hidden_states.reshape(-1, hidden)).reshape(hidden_states.shape)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -hidden_states.shape[1] :] != 0
            if bool(mask.all()):
                mask = None
        rows = hidden_states.reshape(-1, hidden) if mask is None else hidden_states[mask]
        if rows.shape[0] < 2:
            raise ValueError(
                f"BatchNorm (config.norm_type='batchnorm') needs at least 2 real positions per training batch to "
                f"compute its statistics, got {rows.shape[0]} (batch {hidden_states.shape[0]} x seq_len "
                f"{hidden_states.shape[1]}, padding excluded); use larger batches or norm_type 'layernorm'."
            )
        self.num_batches_tracked.add_(1)
        normalized = self._normalize(rows)
        if mask is None:
            return normalized.reshape(hidden_states.shape)
        return torch.zeros_like(hidden_states).masked_scatter(mask[..., None], normalized)

    def _normalize(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows, H)``: batch statistics (and a running-statistics update) in training, running ones in eval."""
        return F.batch_norm(
            rows,
            self.running_mean,
            self.running_var,
            weight=None,
            bias=None,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )


def _make_norm(config: LRUConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return LRURMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    if config.norm_type == "batchnorm":
        return LRUBatchNorm(
            config.hidden_size, eps=config.layer_norm_epsilon, momentum=config.batch_norm_momentum
        )
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def _apply_norm(
    norm: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Apply a block or final norm; only BatchNorm reads the mask (its statistics skip padding)."""
    if isinstance(norm, LRUBatchNorm):
        return norm(hidden_states, attention_mask)
    return norm(hidden_states)


class LRUMixer(nn.Module):
    """The LRU layer (paper §1.1) and the CompreSSM reduction protocol.

    Parameters (``n`` = ``config.state_sizes[layer_idx]``, ``H`` = ``hidden_size``): ``nu_log``, ``theta_log``,
    ``gamma_log`` ``(n,)``; ``B_re``, ``B_im`` ``(n, H)``; ``C_re``, ``C_im`` ``(H, n)``; ``D`` ``(H,)``.
    The recurrence runs in float32 (complex64), or float64 when the parameters are, also under autocast.
    """

    def __init__(self, config: LRUConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        n, hidden = config.state_sizes[layer_idx], config.hidden_size
        self.nu_log = nn.Parameter(torch.empty(n))
        self.theta_log = nn.Parameter(torch.empty(n))
        self.gamma_log = nn.Parameter(torch.empty(n))
        self.B_re = nn.Parameter(torch.empty(n, hidden))
        self.B_im = nn.Parameter(torch.empty(n, hidden))
        self.C_re = nn.Parameter(torch.empty(hidden, n))
        self.C_im = nn.Parameter(torch.empty(hidden, n))
        self.D = nn.Parameter(torch.empty(hidden))

    @property
    def state_size(self) -> int:
        """Current number of complex states ``n`` (read from the parameter shapes)."""
        return int(self.nu_log.shape[0])

    def init_lru_weights(self, state_params_only: bool = False) -> None:
        """Ring initialization: ``|lambda|`` uniform on ``[r_min, r_max]`` (in squared modulus, as in the LRU
        paper), phase uniform on ``[0, max_phase)``, ``gamma = sqrt(1 - |lambda|^2)``, ``B ~ N(0, 1/(2H))``,
        ``C ~ N(0, 1/n)``, ``D ~ N(0, 1)``."""
        n, hidden = self.state_size, self.hidden_size
        device = self.nu_log.device
        r_min, r_max, max_phase = self.config.r_min, self.config.r_max, self.config.max_phase
        u1 = torch.rand(n, device=device, dtype=torch.float64)
        u2 = torch.rand(n, device=device, dtype=torch.float64).clamp(min=1e-6)
        nu = -0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)
        init.copy_(self.nu_log, torch.log(nu))
        init.copy_(self.theta_log, torch.log(max_phase * u2))
        init.copy_(self.gamma_log, 0.5 * torch.log(-torch.expm1(-2.0 * nu)))  # log sqrt(1 - |lambda|^2)
        init.normal_(self.B_re, std=1.0 / math.sqrt(2 * hidden))
        init.normal_(self.B_im, std=1.0 / math.sqrt(2 * hidden))
        init.normal_(self.C_re, std=1.0 / math.sqrt(n))
        init.normal_(self.C_im, std=1.0 / math.sqrt(n))
        if not state_params_only:
            init.normal_(self.D, std=1.0)

    def _log_lambda(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.complex(-torch.exp(self.nu_log.to(dtype)), torch.exp(self.theta_log.to(dtype)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: LRUCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(batch, seq_len, H) -> (batch, seq_len, H)``. Padding positions (``attention_mask == 0``) feed
        zeros into the recurrence, so left padding leaves the state untouched."""
        input_dtype = hidden_states.dtype
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, -hidden_states.shape[1] :, None].to(input_dtype)
        compute_dtype = torch.promote_types(self.nu_log.dtype, torch.float32)
        initial_state = None
        if cache is not None:
            initial_state = cache.get_recurrent_state(self.layer_idx)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            u = hidden_states.to(compute_dtype)
            gamma = torch.exp(self.gamma_log.to(compute_dtype))[:, None, None]
            # one real matmul with interleaved (re, im) rows, read as complex without a copy
            B = torch.stack([self.B_re.to(compute_dtype), self.B_im.to(compute_dtype)], dim=1) * gamma
            projected = F.linear(u, B.reshape(-1, self.hidden_size))  # (batch, seq_len, 2 n)
            inputs = torch.view_as_complex(projected.unflatten(-1, (-1, 2)))  # (batch, seq_len, n)
            log_lambda = self._log_lambda(compute_dtype)
            if initial_state is not None:
                initial_state = initial_state.to(inputs.dtype)
            if self.config.scan_implementation == "sequential" or inputs.shape[1] == 1:
                states, last_state = lru_scan_sequential(log_lambda, inputs, initial_state)
            else:
                states, last_state = lru_scan_chunked(
                    log_lambda, inputs, initial_state, chunk_size=self.config.scan_chunk_size
                )
            # Re(C x) = C_re x_re - C_im x_im, as one real matmul over the interleaved (re, im) view
            C = torch.stack([self.C_re.to(compute_dtype), -self.C_im.to(compute_dtype)], dim=-1)
            output = F.linear(torch.view_as_real(states).flatten(-2), C.flatten(-2))
            output = output + u * self.D.to(compute_dtype)
        if cache is not None:
            cache.update_recurrent_state(last_state.detach(), self.layer_idx)
        return output.to(input_dtype)

    # ----------------------------------------------------------------------------------------------------------
    # CompreSSM reduction protocol (duck-typed; see compressm_hf.protocol)
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def lti_system(self):
        """The layer's system ``(A, B, C)`` in complex128 with no grad: ``A = lambda`` ``(n,)`` (diagonal),
        ``B = diag(gamma)(B_re + i B_im)`` ``(n, H)``, ``C = C_re + i C_im`` ``(H, n)``; ``reduction="balanced"``
        (the layer re-diagonalizes any reduced system). ``D`` is a feedthrough and is not part of it."""
        lam = torch.exp(self._log_lambda(torch.float64))
        gamma = torch.exp(self.gamma_log.detach().to(torch.float64))[:, None]
        B = gamma * torch.complex(self.B_re.detach().to(torch.float64), self.B_im.detach().to(torch.float64))
        C = torch.complex(self.C_re.detach().to(torch.float64), self.C_im.detach().to(torch.float64))
        return _make_lti_system(lam.detach(), B, C, None, diagonal=True, reduction="balanced")

    def _set_state_size_in_config(self, state_size: int) -> None:
        sizes = list(self.config.state_sizes)
        sizes[self.layer_idx] = int(state_size)
        self.config.state_sizes = sizes

    def _swap_state_params(
        self, values: dict[str, torch.Tensor], keep: torch.Tensor | None
    ) -> list[ParamSwap]:
        swaps = []
        for name, state_dim in _STATE_PARAMS.items():
            old = getattr(self, name)
            new = nn.Parameter(
                values[name].detach().to(device=old.device, dtype=old.dtype).contiguous(),
                requires_grad=old.requires_grad,
            )
            setattr(self, name, new)
            swaps.append(ParamSwap(old=old, new=new, state_dim=state_dim, keep=keep))
        return swaps

    @torch.no_grad()
    def reduce_(self, plan) -> list[ParamSwap]:
        """Shrink in place to ``plan.rank`` states and return every parameter replaced.

        * ``plan.keep`` given (modal plans, and balanced plans with the ``random`` selection, whose
          ``plan.diagonal`` is then the kept subset of this layer's own states): the kept states are sliced,
          so every new entry is an exact copy of an old one (also ``gamma_log`` and ``B``, whose split a
          re-mapping would reset); the swaps carry ``keep``.
        * otherwise ``plan.diagonal`` (balanced truncation, re-diagonalized): its eigenvalues ``l`` become
          ``nu_log = log(-log|l|)``, ``theta_log = log(arg l)`` (``arg`` taken in ``(0, 2*pi)``; a phase of
          exactly 0 is moved to 1e-7 rad), ``gamma = sqrt(1 - |l|^2)``, ``B_re/B_im = Re/Im(B')/gamma``,
          ``C_re/C_im = Re/Im(C')``. The state coordinates change, so the swaps carry ``keep=None``.

        ``D`` is unchanged. The new parameters are new ``nn.Parameter`` objects (same dtype, device and
        ``requires_grad``); ``config.state_sizes[layer_idx]`` is updated.
        """
        rank = int(plan.rank)
        n, hidden = self.state_size, self.hidden_size
        if not 1 <= rank <= n:
            raise ValueError(
                f"LRUMixer.reduce_ (layer {self.layer_idx}): plan.rank must be in [1, {n}], got {rank}."
            )
        diagonal = getattr(plan, "diagonal", None)
        keep = getattr(plan, "keep", None)
        if keep is None and diagonal is not None:
            values = self._params_from_diagonal(diagonal, rank, hidden)
            swaps = self._swap_state_params(values, keep=None)
        elif keep is not None:
            keep = _checked_keep(keep, n, rank, f"LRUMixer.reduce_ (layer {self.layer_idx})")
            at = keep.to(self.nu_log.device)
            values = {name: getattr(self, name).index_select(dim, at) for name, dim in _STATE_PARAMS.items()}
            swaps = self._swap_state_params(values, keep=keep)
        else:
            raise ValueError(
                f"LRUMixer.reduce_ (layer {self.layer_idx}): the plan has neither `diagonal` (a reduced system) "
                "nor `keep` (indices of the states to keep)."
            )
        self._set_state_size_in_config(rank)
        return swaps

    def _params_from_diagonal(self, diagonal, rank: int, hidden: int) -> dict[str, torch.Tensor]:
        lam = torch.as_tensor(diagonal.A).to(torch.complex128).cpu()
        B = torch.as_tensor(diagonal.B).to(torch.complex128).cpu()
        C = torch.as_tensor(diagonal.C).to(torch.complex128).cpu()
        where = f"LRUMixer.reduce_ (layer {self.layer_idx})"
        if lam.shape != (rank,) or B.shape != (rank, hidden) or C.shape != (hidden, rank):
            raise ValueError(
                f"{where}: plan.diagonal must have A ({rank},), B ({rank}, {hidden}), C ({hidden}, {rank}); got "
                f"A {tuple(lam.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}."
            )
        for name, value in (("A", lam), ("B", B), ("C", C)):
            if not torch.isfinite(torch.view_as_real(value)).all():
                raise ValueError(f"{where}: plan.diagonal.{name} has non-finite entries.")
        modulus = lam.abs()
        if bool((modulus >= 1).any()):
            raise ValueError(
                f"{where}: plan.diagonal.A must have |lambda| < 1 (stable), got max |lambda| = {modulus.max().item()}."
            )
        modulus = modulus.clamp(min=1e-30)
        phase = torch.remainder(torch.angle(lam), 2 * math.pi).clamp(min=1e-7)
        gamma = torch.sqrt(-torch.expm1(2.0 * torch.log(modulus)))  # sqrt(1 - |l|^2)
        return {
            "nu_log": torch.log(-torch.log(modulus)),
            "theta_log": torch.log(phase),
            "gamma_log": torch.log(gamma),
            "B_re": B.real / gamma[:, None],
            "B_im": B.imag / gamma[:, None],
            "C_re": C.real,
            "C_im": C.imag,
        }

    @torch.no_grad()
    def resize_(self, state_size: int) -> None:
        """Reallocate the state-dependent parameters at ``state_size`` states (ring-initialized values, meant to
        be overwritten, e.g. when loading a checkpoint written after a reduction) and update the config."""
        state_size = int(state_size)
        if state_size < 1:
            raise ValueError(
                f"LRUMixer.resize_ (layer {self.layer_idx}): state_size must be >= 1, got {state_size}."
            )
        if state_size != self.state_size:
            hidden = self.hidden_size
            shapes = {
                "nu_log": (state_size,),
                "theta_log": (state_size,),
                "gamma_log": (state_size,),
                "B_re": (state_size, hidden),
                "B_im": (state_size, hidden),
                "C_re": (hidden, state_size),
                "C_im": (hidden, state_size),
            }
            for name, shape in shapes.items():
                old = getattr(self, name)
                setattr(
                    self,
                    name,
                    nn.Parameter(
                        torch.empty(shape, dtype=old.dtype, device=old.device),
                        requires_grad=old.requires_grad,
                    ),
                )
            if self.nu_log.device.type != "meta":
                self.init_lru_weights(state_params_only=True)
        self._set_state_size_in_config(state_size)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint written after a reduction has fewer states: take its size before loading.
        stored = state_dict.get(prefix + "nu_log")
        if stored is not None and stored.dim() == 1 and stored.shape[0] != self.state_size:
            self.resize_(stored.shape[0])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, hidden_size={self.hidden_size}, state_size={self.state_size}"


class LRUGLU(nn.Module):
    """Gated linear unit ``W1 x * sigmoid(W2 x)`` (projected back to ``hidden_size`` when wider)."""

    def __init__(self, config: LRUConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.out_proj = (
            nn.Linear(config.intermediate_size, config.hidden_size)
            if config.intermediate_size != config.hidden_size
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
        hidden_states = value * torch.sigmoid(gate)
        if self.out_proj is not None:
            hidden_states = self.out_proj(hidden_states)
        return hidden_states


class LRUBlock(GradientCheckpointingLayer):
    """``x + dropout(GLU(dropout(GELU(LRU(norm(x))))))`` (pre-norm residual block)."""

    def __init__(self, config: LRUConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = _make_norm(config)
        self.mixer = LRUMixer(config, layer_idx=layer_idx)
        self.glu = LRUGLU(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: LRUCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.mixer(
            _apply_norm(self.norm, hidden_states, attention_mask), cache=cache, attention_mask=attention_mask
        )
        hidden_states = self.dropout(F.gelu(hidden_states))
        hidden_states = self.dropout(self.glu(hidden_states))
        return residual + hidden_states


class LRUPreTrainedModel(ShardedSaveMixin, PreTrainedModel):
    config_class = LRUConfig
    config: LRUConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LRUBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    def post_init(self):
        super().post_init()
        # a tied lm_head is never saved: `load_state_dict` (Trainer resume) must not report it missing
        self.register_load_state_dict_post_hook(drop_tied_missing_keys)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        super()._adjust_missing_and_unexpected_keys(loading_info)
        source = self.name_or_path or "the checkpoint"
        refuse_adapter_wrapped_checkpoint(
            self, loading_info.missing_keys, loading_info.unexpected_keys, source
        )

    @torch.no_grad()
    def _init_weights(self, module):
        """Linear/embedding layers: ``normal(0, initializer_range)`` (biases 0), or with
        ``config.initializer == "fan_in_uniform"`` linear weights and biases ``U(+-1/sqrt(fan_in))`` and embeddings
        ``N(0, 1)``; norms: ones/zeros (BatchNorm running statistics: mean 0, variance 1); LRU mixers: ring init."""
        if self.config.initializer == "fan_in_uniform" and isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
            return
        if self.config.initializer == "fan_in_uniform" and isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
            return
        super()._init_weights(module)
        if isinstance(module, LRUMixer):
            module.init_lru_weights()
        elif isinstance(module, LRURMSNorm):
            init.ones_(module.weight)


class LRUModel(LRUPreTrainedModel):
    """The bare LRU stack: input encoder (embedding, or a linear layer for continuous features), blocks and a
    final norm (if ``config.final_norm``). Returns ``BaseModelOutputWithPast`` whose cache (field ``cache`` from
    transformers 5.24 on, ``past_key_values`` before) is an :class:`LRUCache`."""

    def __init__(self, config: LRUConfig):
        super().__init__(config)
        if config.input_size is None:
            self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.encoder = None
        else:
            self.embeddings = None
            self.encoder = nn.Linear(config.input_size, config.hidden_size)
        self.layers = nn.ModuleList([LRUBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = _make_norm(config) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        if self.config.input_size is not None:
            if inputs_embeds is None:
                raise ValueError(
                    f"This LRU model reads continuous features (config.input_size={self.config.input_size}): pass "
                    f"them as `inputs_embeds` of shape (batch, seq_len, {self.config.input_size}), not input_ids."
                )
            if inputs_embeds.dim() == 2 and self.config.input_size == 1:
                inputs_embeds = inputs_embeds[..., None]
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.input_size:
                raise ValueError(
                    f"`inputs_embeds` must have shape (batch, seq_len, {self.config.input_size}) "
                    f"(config.input_size), got {tuple(inputs_embeds.shape)}."
                )
            return self.encoder(inputs_embeds.to(self.encoder.weight.dtype))
        if inputs_embeds is None:
            return self.embeddings(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq_len, {self.config.hidden_size}) (config.hidden_size), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: LRUCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: LRUCache | None = None,
        cache_params: LRUCache | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids (when `config.input_size` is `None`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding. Padding positions feed zeros into the recurrences (so left
                padding does not change the states) and are left out of pooling.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size or input_size)`, *optional*):
                Embedded tokens, or the continuous features when `config.input_size` is set.
            cache (`LRUCache`, *optional*):
                Recurrent states from a previous call; the new inputs continue from them. `past_key_values`
                and `cache_params` are accepted as older names of the same argument.
            use_cache (`bool`, *optional*):
                Return an `LRUCache` holding the states after the last position. Defaults to `config.use_cache`
                in evaluation mode and to `False` in training mode.
            output_hidden_states (`bool`, *optional*):
                Return the output of every block (the last entry is after the final norm).
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutputWithPast` instead of a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        hidden_states = self._embed(input_ids, inputs_embeds)
        cache = _one_cache(cache, past_key_values, cache_params)
        if cache is not None and not isinstance(cache, LRUCache):
            raise ValueError(
                f"LRU models keep their recurrent states in an `LRUCache`, got {type(cache).__name__}."
            )
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = LRUCache(self.config)
        if cache is not None and self.training and self.config.norm_type == "batchnorm":
            raise ValueError(
                "A recurrent cache cannot be used in training mode with config.norm_type='batchnorm': BatchNorm "
                "then normalizes each call with that call's own batch statistics, so decoding token by token "
                "would not match the full forward. Call model.eval() (running statistics) or pass use_cache=False."
            )

        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, cache=cache, attention_mask=attention_mask)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = _apply_norm(self.norm_f, hidden_states, attention_mask)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if cache is not None:
            cache.seen_tokens += hidden_states.shape[1]

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{_CACHE_FIELD: cache}
        )


class LRUForCausalLM(LRUPreTrainedModel, GenerationMixin):
    """LRU stack with a language-modeling head (tied to the embedding by default). ``generate`` decodes
    recurrently: after the prompt, each token costs one step of every layer (an :class:`LRUCache`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: LRUConfig):
        super().__init__(config)
        if config.input_size is not None:
            raise ValueError(
                f"LRUForCausalLM predicts tokens and needs token inputs: config.input_size must be None, got "
                f"{config.input_size}."
            )
        if config.norm_type == "batchnorm":
            raise ValueError(
                "LRUForCausalLM cannot use config.norm_type='batchnorm': in training BatchNorm takes its statistics "
                "over the whole sequence, so the prediction at a position would depend on later tokens. Use "
                "'layernorm' or 'rmsnorm' for language modelling (BatchNorm is meant for sequence classification)."
            )
        self.model = LRUModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.model.set_input_embeddings(new_embeddings)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model allocates its own LRUCache on the first forward.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: LRUCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        use_cache: bool | None = None,
        past_key_values: LRUCache | None = None,
        **kwargs,
    ):
        # generate() passes the cache as `cache` (transformers >= 5.24) or `past_key_values` (before)
        if inputs_embeds is not None and is_first_iteration:
            model_inputs = {"input_ids": None, "inputs_embeds": inputs_embeds}
            if next_sequence_length is not None:
                model_inputs["inputs_embeds"] = inputs_embeds[:, -next_sequence_length:]
            length = model_inputs["inputs_embeds"].shape[1]
        else:
            if next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            model_inputs = {"input_ids": input_ids.contiguous()}
            length = input_ids.shape[1]
        model_inputs["cache"] = _one_cache(cache, past_key_values, kwargs.pop("cache_params", None))
        model_inputs["use_cache"] = use_cache
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask[:, -length:]
        for key, value in kwargs.items():
            if key not in model_inputs and key not in (
                "labels",
                "position_ids",
                "cache_position",
                "token_type_ids",
            ):
                model_inputs[key] = value
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: LRUCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LRUCache | None = None,
        cache_params: LRUCache | None = None,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Next-token targets; they **are shifted** inside the model (`labels = input_ids` works). `-100`
                is ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.

            The other arguments are those of [`LRUModel.forward`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=_one_cache(cache, past_key_values, cache_params),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )

        if not return_dict:
            cache = getattr(outputs, _CACHE_FIELD)
            output = tuple(v for v in (logits, cache, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


class LRUForSequenceClassification(LRUPreTrainedModel):
    """LRU stack, pooling over time (``config.classifier_pooling``: mean or last non-padding position) and a
    linear head, as in the paper's LRA / sequential-image setups. Takes token ids or, with
    ``config.input_size``, continuous features ``(batch, seq_len, input_size)`` as ``inputs_embeds``."""

    def __init__(self, config: LRUConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LRUModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.model.set_input_embeddings(new_embeddings)

    def _pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            if self.config.classifier_pooling == "mean":
                return hidden_states.mean(dim=1)
            return hidden_states[:, -1]
        mask = attention_mask.to(hidden_states.dtype)
        if self.config.classifier_pooling == "mean":
            return (hidden_states * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        # last non-padding position (works for left and right padding)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (attention_mask != 0)).argmax(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, config.num_labels)` (cross-entropy); with `config.num_labels == 1` a
                regression target (MSE); `config.problem_type` overrides the choice as in transformers.

            The other arguments are those of [`LRUModel.forward`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = self._pool(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype))

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
            if problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
            elif problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())

        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "LRUBatchNorm",
    "LRUCache",
    "LRUForCausalLM",
    "LRUForSequenceClassification",
    "LRUMixer",
    "LRUModel",
    "LRUPreTrainedModel",
]
