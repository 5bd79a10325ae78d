"""LRU models: causal LM with recurrent generate, sequence classification (ids and continuous features)."""

import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from compressm_hf.modeling.lru import (
    LRUCache,
    LRUConfig,
    LRUForCausalLM,
    LRUForSequenceClassification,
    LRUModel,
)


def _config(**kwargs):
    defaults = dict(hidden_size=16, num_hidden_layers=2, state_size=8, state_sizes=[8, 5], scan_chunk_size=4)
    defaults.update(kwargs)
    return LRUConfig(**defaults)


def _lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return LRUForCausalLM(_config(**kwargs)).eval()


def test_parameters_and_ring_init():
    model = _lm()
    mixer = model.model.layers[1].mixer
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "nu_log": (5,),
        "theta_log": (5,),
        "gamma_log": (5,),
        "B_re": (5, 16),
        "B_im": (5, 16),
        "C_re": (16, 5),
        "C_im": (16, 5),
        "D": (16,),
    }
    assert mixer.state_size == 5 and mixer.layer_idx == 1
    modulus = torch.exp(-torch.exp(mixer.nu_log))
    assert bool(((modulus >= 0.9 - 1e-6) & (modulus <= 0.999 + 1e-6)).all())
    phase = torch.exp(mixer.theta_log)
    assert bool(((phase > 0) & (phase < 6.28)).all())
    torch.testing.assert_close(torch.exp(mixer.gamma_log), torch.sqrt(1 - modulus**2))
    assert model.lm_head.weight is model.model.embeddings.weight  # tied


def test_forward_loss_and_tuple_outputs(decoding):
    model = _lm()
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 9, 256)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.hidden_states) == 2
    assert isinstance(decoding.cache_of(out), LRUCache)  # eval mode + config.use_cache
    as_tuple = model(ids, labels=ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    assert len(as_tuple) == 2
    model.train()
    assert not any(name in model(ids) for name in decoding.CACHE_FIELDS)  # no cache while training


def test_cache_holds_one_state_per_layer_with_its_own_size(decoding):
    model = _lm()
    ids = torch.randint(0, 256, (3, 6))
    cache = decoding.cache_of(model(ids, use_cache=True))
    assert cache.get_seq_length() == 6
    shapes = [tuple(cache.get_recurrent_state(i).shape) for i in range(2)]
    assert shapes == [(3, 8), (3, 5)]
    assert cache.get_recurrent_state(0).is_complex()
    # continuing from the cache equals running the whole sequence
    more = torch.randint(0, 256, (3, 4))
    step = model(more, cache=cache).logits
    full = model(torch.cat([ids, more], dim=1), use_cache=False).logits[:, -4:]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_other_cache_types_are_refused():
    from transformers import DynamicCache

    model = _lm()
    for name in ("cache", "past_key_values", "cache_params"):
        with pytest.raises(ValueError, match="LRUCache"):
            model(torch.randint(0, 256, (1, 3)), **{name: DynamicCache()})


@pytest.mark.parametrize("state_sizes", [[8, 5], [4, 4]])
def test_cached_decoding_step_equals_full_forward(decoding, state_sizes):
    # `cache` is transformers 5.24's name, `past_key_values` / `cache_params` the older ones
    model = _lm(state_sizes=state_sizes)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    decoding.check_cached_decoding(model, ids, cache_names=("cache", "past_key_values", "cache_params"))


def test_greedy_generate_logits_equal_full_forward(decoding):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    decoding.check_greedy_generate(_lm(), prompt)


def test_greedy_generate_with_cache_equals_uncached_argmax():
    model = _lm()
    lengths = []
    model.model.layers[0].register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert lengths == [7, 1, 1, 1, 1, 1]  # prompt once, then one recurrent step per token

    sequence = prompt
    for _ in range(6):
        logits = model(sequence, use_cache=False).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_left_padding_matches_unpadded():
    model = _lm(pad_token_id=0)
    prompt = torch.randint(1, 256, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], dim=1).long()
    plain = model.generate(prompt, max_new_tokens=4, do_sample=False)
    left = model.generate(padded, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain[:, 5:], left[:, 8:])


def test_beam_search_runs():
    model = _lm()
    out = model.generate(torch.randint(0, 256, (2, 4)), max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape == (2, 7)


def test_rmsnorm_sequential_scan_and_gradient_checkpointing():
    model = _lm(norm_type="rmsnorm", scan_implementation="sequential", intermediate_size=24)
    model.activation_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 256, (2, 5))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].mixer.nu_log.grad is not None
    assert model.model.layers[0].glu.out_proj.weight.grad is not None


def test_classification_with_token_ids_and_padding():
    torch.manual_seed(0)
    for pooling in ("mean", "last"):
        model = LRUForSequenceClassification(_config(num_labels=3, classifier_pooling=pooling)).eval()
        ids = torch.randint(0, 256, (2, 6))
        labels = torch.tensor([0, 2])
        out = model(ids, labels=labels)
        assert isinstance(out, SequenceClassifierOutput)
        assert out.logits.shape == (2, 3)
        expected = torch.nn.functional.cross_entropy(out.logits, labels)
        torch.testing.assert_close(out.loss, expected)
        # right padding does not change the pooled result of the real tokens
        padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits, out.logits, rtol=1e-5, atol=1e-5
        )
        loss, logits = model(ids, labels=labels, return_dict=False)
        torch.testing.assert_close(logits, out.logits)


def test_classification_with_continuous_features():
    torch.manual_seed(0)
    model = LRUForSequenceClassification(_config(input_size=1, num_labels=10))
    assert model.model.embeddings is None and model.model.encoder.in_features == 1
    pixels = torch.rand(4, 30, 1)
    labels = torch.tensor([1, 2, 3, 9])
    out = model(inputs_embeds=pixels, labels=labels)
    assert out.logits.shape == (4, 10)
    out.loss.backward()
    assert model.model.layers[0].mixer.B_re.grad is not None
    model.eval()
    torch.testing.assert_close(model(inputs_embeds=pixels[..., 0]).logits, model(inputs_embeds=pixels).logits)
    with pytest.raises(ValueError, match="continuous features"):
        model(input_ids=torch.zeros(4, 30, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 1\)"):
        model(inputs_embeds=torch.rand(4, 30, 3))


def test_input_errors_and_bare_model():
    model = LRUModel(_config()).eval()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    embeds = torch.randn(2, 4, 16)
    out = model(inputs_embeds=embeds)
    assert out.last_hidden_state.shape == (2, 4, 16)
    with pytest.raises(ValueError, match="input_size must be None"):
        LRUForCausalLM(_config(input_size=2))
