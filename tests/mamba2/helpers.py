"""Tiny Mamba-2 configs and models shared by the Mamba-2 tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch

from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

VOCAB = 64

# hidden 16, expand 2 -> d_inner 32 = 4 heads x head_dim 8; chunk 4 so a 10-token input spans 3 chunks;
# no EOS token (Mamba2Config's default is 2), so greedy generation never stops early
TINY = dict(vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, chunk_size=4, eos_token_id=None)


def tiny_config(state_sizes=(8, 4), n_groups=2, **kw) -> CompreSSMMamba2Config:
    return CompreSSMMamba2Config(
        **{**TINY, **kw}, n_groups=n_groups, num_hidden_layers=len(state_sizes), state_sizes=list(state_sizes)
    )


def tiny_model(state_sizes=(8, 4), n_groups=2, seed=0, **kw) -> CompreSSMMamba2ForCausalLM:
    torch.manual_seed(seed)
    return CompreSSMMamba2ForCausalLM(tiny_config(state_sizes, n_groups, **kw)).eval()


def ids(batch=2, length=10, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids, **kw).logits
