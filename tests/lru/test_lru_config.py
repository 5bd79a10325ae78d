"""LRUConfig: defaults, per-layer state sizes, validation messages, serialization."""

import pytest

from compressm_hf.modeling.lru import LRUConfig


def test_defaults_and_derived_fields():
    config = LRUConfig(num_hidden_layers=3, state_size=8, hidden_size=16)
    assert config.model_type == "compressm_lru"
    assert config.vocab_size == 256
    assert config.state_sizes == [8, 8, 8]
    assert config.intermediate_size == 16
    assert (config.r_min, config.r_max, config.max_phase) == (0.9, 0.999, 6.28)
    assert config.scan_implementation == "parallel"
    assert config.compression is None
    assert LRUConfig(hidden_size=16, expand=2).intermediate_size == 32


def test_numbers_are_coerced_to_float():
    config = LRUConfig(max_phase=3, r_min=0.5, hidden_dropout=0)
    assert isinstance(config.max_phase, float) and config.max_phase == 3.0


def test_round_trip_keeps_state_sizes_and_compression():
    config = LRUConfig(num_hidden_layers=2, state_sizes=[5, 3], compression={"events": [{"step": 3}]})
    again = LRUConfig.from_dict(config.to_dict())
    assert again.state_sizes == [5, 3]
    assert again.compression == {"events": [{"step": 3}]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_hidden_layers": 2, "state_sizes": [4]}, r"one entry per layer .*num_hidden_layers=2.*\[4\]"),
        (
            {"num_hidden_layers": 2, "state_sizes": [4, 0]},
            r"state_sizes\[1\]` must be an integer >= 1, got 0",
        ),
        ({"state_size": 0}, r"`state_size` must be an integer >= 1, got 0"),
        ({"hidden_size": -3}, r"`hidden_size` must be an integer >= 1, got -3"),
        ({"r_min": 0.99, "r_max": 0.9}, r"0 < r_min <= r_max < 1, got r_min=0.99, r_max=0.9"),
        ({"r_max": 1.0}, r"r_max=1.0"),
        ({"r_min": 0.0}, r"r_min=0.0"),
        ({"max_phase": 7.0}, r"`max_phase` must be in \(0, 2\*pi\], got 7.0"),
        ({"hidden_dropout": 1.0}, r"`hidden_dropout` must be in \[0, 1\), got 1.0"),
        (
            {"norm_type": "groupnorm"},
            r"`norm_type` must be one of \('layernorm', 'rmsnorm', 'batchnorm'\), got 'groupnorm'",
        ),
        ({"layer_norm_epsilon": 0.0}, r"`layer_norm_epsilon` must be > 0, got 0.0"),
        ({"initializer_range": -1.0}, r"`initializer_range` must be > 0"),
        ({"input_size": 0}, r"`input_size` must be None .* or an integer >= 1 .*got 0"),
        ({"classifier_pooling": "max"}, r"`classifier_pooling` must be one of \('mean', 'last'\), got 'max'"),
        ({"scan_implementation": "cuda"}, r"`scan_implementation` must be one of .*got 'cuda'"),
        ({"scan_chunk_size": 0}, r"`scan_chunk_size` must be an integer >= 1, got 0"),
        ({"intermediate_size": 0}, r"`intermediate_size` must be an integer >= 1, got 0"),
    ],
)
def test_validation_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRUConfig(**kwargs)
