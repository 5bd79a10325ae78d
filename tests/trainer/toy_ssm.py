"""A tiny diagonal linear-RNN language model that implements the reduction protocol.

``x[k+1] = lambda * x[k] + B u[k]``, ``y[k] = Re(C x[k]) + D * u[k]`` with
``lambda = exp(-exp(nu_log) + i * theta)`` (always stable), one mixer per layer, residual blocks.
``config.reduction`` picks what the mixers absorb: ``"balanced"`` (re-diagonalized reduced
system; no index correspondence, ``ParamSwap.keep=None``) or ``"modal"`` (a subset of the
diagonal states, ``ParamSwap.keep`` given). Loading a state dict of another state size resizes
the mixer first (like the LRU/Mamba models), so ``Trainer.train(resume_from_checkpoint=...)``
works with a model built at its original size.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from compressm_hf import LTISystem, ParamSwap


class ToySSMConfig(PretrainedConfig):
    model_type = "compressm_toy_ssm"

    def __init__(self, vocab_size=12, hidden_size=8, state_sizes=(8, 8), reduction="balanced", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_sizes = list(state_sizes)
        self.num_hidden_layers = len(self.state_sizes)
        self.reduction = reduction
        super().__init__(**kwargs)


_STATE_PARAMS = {"nu_log": 0, "theta": 0, "B_re": 0, "B_im": 0, "C_re": 1, "C_im": 1}


class ToyMixer(nn.Module):
    def __init__(self, config: ToySSMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, n = config.hidden_size, config.state_sizes[layer_idx]
        self.D = nn.Parameter(torch.randn(d) * 0.1)
        self.state_size = n
        self._set_params(self._init_values(n, d))

    @staticmethod
    def _init_values(n: int, d: int) -> dict[str, torch.Tensor]:
        r = 0.5 + 0.45 * torch.rand(n)
        return {
            "nu_log": torch.log(-torch.log(r)),
            "theta": torch.rand(n) * 3.0,
            "B_re": torch.randn(n, d) / d**0.5,
            "B_im": torch.randn(n, d) / d**0.5,
            "C_re": torch.randn(d, n) / n**0.5,
            "C_im": torch.randn(d, n) / n**0.5,
        }

    def _set_params(self, values: dict[str, torch.Tensor]) -> list[ParamSwap]:
        swaps = []
        for name, value in values.items():
            old = self._parameters.get(name)
            ref = old if old is not None else self.D
            new = nn.Parameter(value.to(device=ref.device, dtype=ref.dtype).contiguous())
            setattr(self, name, new)  # same key: registration order (and optimizer order) unchanged
            if old is not None:
                swaps.append((name, old, new))
        self.state_size = int(values["nu_log"].shape[0])
        self.config.state_sizes[self.layer_idx] = self.state_size
        return swaps

    # --- protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def lti_system(self) -> LTISystem:
        lam = torch.polar(torch.exp(-torch.exp(self.nu_log.double())), self.theta.double())
        B = torch.complex(self.B_re.double(), self.B_im.double())
        C = torch.complex(self.C_re.double(), self.C_im.double())
        return LTISystem(A=lam.cpu(), B=B.cpu(), C=C.cpu(), diagonal=True, reduction=self.config.reduction)

    @torch.no_grad()
    def reduce_(self, plan) -> list[ParamSwap]:
        if plan.keep is not None:
            keep = plan.keep.to(self.nu_log.device)
            values = {
                name: getattr(self, name).index_select(dim, keep).clone()
                for name, dim in _STATE_PARAMS.items()
            }
            swaps = self._set_params(values)
            return [ParamSwap(old, new, _STATE_PARAMS[name], plan.keep.clone()) for name, old, new in swaps]
        sys = plan.diagonal
        lam = sys.A.to(torch.complex128)
        mod = lam.abs().clamp(1e-12, 1 - 1e-7)
        values = {
            "nu_log": torch.log(-torch.log(mod)).float(),
            "theta": torch.angle(lam).float(),
            "B_re": sys.B.real.float(),
            "B_im": sys.B.imag.float(),
            "C_re": sys.C.real.float(),
            "C_im": sys.C.imag.float(),
        }
        swaps = self._set_params(values)
        return [ParamSwap(old, new, _STATE_PARAMS[name], None) for name, old, new in swaps]

    def resize_(self, state_size: int) -> None:
        self._set_params(self._init_values(state_size, self.config.hidden_size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "nu_log"
        if key in state_dict and state_dict[key].shape[0] != self.state_size:
            self.resize_(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- compute --------------------------------------------------------------------------
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        lam = torch.polar(torch.exp(-torch.exp(self.nu_log)), self.theta)
        B = torch.complex(self.B_re, self.B_im)
        C = torch.complex(self.C_re, self.C_im)
        bu = torch.einsum("nd,bld->bln", B, u.to(B.dtype))
        x = torch.zeros(u.shape[0], self.state_size, dtype=lam.dtype, device=u.device)
        ys = []
        for t in range(u.shape[1]):
            x = lam * x + bu[:, t]
            ys.append(torch.einsum("dn,bn->bd", C, x).real)
        return torch.stack(ys, 1) + self.D * u


class ToySSMForCausalLM(PreTrainedModel):
    config_class = ToySSMConfig
    base_model_prefix = "toy"
    _no_split_modules = []

    def __init__(self, config: ToySSMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mixers = nn.ModuleList(ToyMixer(config, i) for i in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):  # keep the mixers' own initialisation
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.5)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.3)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for mixer in self.mixers:
            h = h + torch.tanh(mixer(h))
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=logits)


class NoSSMModel(PreTrainedModel):
    """A model without reducible layers (for the validation test)."""

    config_class = ToySSMConfig

    def __init__(self, config):
        super().__init__(config)
        self.lin = nn.Linear(2, 2)
        self.post_init()

    def forward(self, input_ids=None, labels=None, **kwargs):
        x = self.lin(torch.ones(input_ids.shape[0], 2))
        return CausalLMOutput(loss=x.pow(2).mean(), logits=x)


class CountingDataset(torch.utils.data.Dataset):
    """Sequences ``s, s+k, s+2k, ...`` (mod vocab) with k in {1, 2}: the SSM has to remember k."""

    def __init__(self, size=64, length=8, vocab=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (size, 1), generator=g)
        step = torch.randint(1, 3, (size, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
