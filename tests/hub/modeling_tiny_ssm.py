"""A tiny diagonal linear-recurrence causal LM for Hub round-trip tests.

It is saved with its code (``register_for_auto_class``), so loading it back from the fake Hub goes through
``trust_remote_code=True``. Only torch and transformers are imported: this file is copied next to the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinySSMConfig(PreTrainedConfig):
    model_type = "compressm_tiny_test_ssm"

    def __init__(self, vocab_size=32, hidden_size=8, state_sizes=(6, 4), **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_sizes = list(state_sizes)
        super().__init__(**kwargs)


class TinySSMLayer(nn.Module):
    def __init__(self, hidden_size: int, state_size: int):
        super().__init__()
        self.log_decay = nn.Parameter(torch.linspace(-2.0, -0.1, state_size))
        self.B = nn.Parameter(torch.randn(state_size, hidden_size) / hidden_size**0.5)
        self.C = nn.Parameter(torch.randn(hidden_size, state_size) / state_size**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, hidden)
        decay = torch.exp(-torch.exp(self.log_decay))
        h = x.new_zeros(x.shape[0], decay.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            h = decay * h + x[:, t] @ self.B.T
            outputs.append(h @ self.C.T)
        return x + torch.stack(outputs, dim=1)


class TinySSMForCausalLM(PreTrainedModel):
    config_class = TinySSMConfig
    base_model_prefix = "tiny"

    def __init__(self, config: TinySSMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinySSMLayer(config.hidden_size, n) for n in config.state_sizes)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):  # keep the constructor's random values
        pass

    def forward(self, input_ids=None, labels=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=logits)


TinySSMConfig.register_for_auto_class()
TinySSMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
