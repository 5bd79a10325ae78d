"""What a user sees of a recurrent cache: decoding with it must equal the model's own full forward.

Imports only torch, so the ``trust_remote_code`` tests can run the same checks (``runpy.run_path``) in a
Python where compressm_hf is not importable. Works whatever the installed transformers calls the cache
(``cache`` since 5.24; ``past_key_values`` / ``cache_params`` before).
"""

from __future__ import annotations

import torch

CACHE_FIELDS = ("cache", "past_key_values", "cache_params")


def cache_of(output):
    """The cache a model output carries, under whichever field name it uses."""
    for name in CACHE_FIELDS:
        if name in output:
            return output[name]
    raise AssertionError(f"the output carries no cache (fields: {list(output.keys())})")


@torch.no_grad()
def check_cached_decoding(model, input_ids, cache_names, steps=3, atol=1e-4):
    """Prefill all but the last ``steps`` tokens with ``use_cache=True``, then feed those tokens one at a
    time passing the cache as ``cache_names[i]``; every step's logits must equal the full forward's at
    that position (max abs difference <= ``atol``). Returns the largest difference seen."""
    model.eval()
    full = model(input_ids, use_cache=False).logits.float()
    prefix = input_ids.shape[1] - steps
    worst = 0.0
    for name in cache_names:
        cache = cache_of(model(input_ids[:, :prefix], use_cache=True))
        for t in range(prefix, input_ids.shape[1]):
            out = model(input_ids[:, t : t + 1], use_cache=True, **{name: cache})
            diff = (out.logits[:, -1].float() - full[:, t]).abs().max().item()
            if not diff <= atol:
                raise AssertionError(
                    f"cache passed as {name!r}: decoding step at position {t} differs from the full forward "
                    f"by {diff:.3g} (> {atol})"
                )
            worst = max(worst, diff)
            cache = cache_of(out)
    return worst


@torch.no_grad()
def check_greedy_generate(model, prompt, new_tokens=6, atol=1e-4, **generate_kwargs):
    """Greedy ``generate()`` (which decodes through the cache) must pick the uncached argmax at every step,
    and its logits must equal the full forward's logits of the generated sequence. Returns the sequence."""
    model.eval()
    out = model.generate(
        prompt,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    sequence = out.sequences
    if sequence.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
        raise AssertionError(f"generate() returned shape {tuple(sequence.shape)}")
    full = model(sequence, use_cache=False).logits.float()
    start = prompt.shape[1]
    expected = full[:, start - 1 : -1]
    if not torch.equal(expected.argmax(-1), sequence[:, start:]):
        raise AssertionError("greedy generate() differs from the uncached argmax")
    scores = torch.stack([s.float() for s in out.logits], dim=1)
    diff = (scores - expected).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"generate() logits differ from the full forward's logits by {diff:.3g}")
    return sequence
