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
"""Linear Recurrent Unit (LRU) configuration.

This file imports only transformers (and its dependency huggingface_hub): it is copied next to saved models
for ``trust_remote_code`` loading.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

_NORM_TYPES = ("layernorm", "rmsnorm", "batchnorm")
_INITIALIZERS = ("normal", "fan_in_uniform")
_POOLINGS = ("mean", "last")
_SCANS = ("parallel", "sequential")
_FLOAT_FIELDS = (
    "r_min",
    "r_max",
    "max_phase",
    "hidden_dropout",
    "layer_norm_epsilon",
    "batch_norm_momentum",
    "initializer_range",
)


@strict
class LRUConfig(PreTrainedConfig):
    r"""
    Configuration of a stack of Linear Recurrent Unit blocks (Orvieto et al. 2023), the diagonal complex linear
    state space model that CompreSSM (arXiv 2510.02823) compresses during training by balanced truncation.
    Each block is ``x + dropout(GLU(dropout(GELU(LRU(norm(x))))))`` (pre-norm), followed after the last block by
    an optional final norm. Every layer may have its own state size (``state_sizes``): reductions shrink layers
    independently and write the new sizes here.

    The defaults suit language modelling (LayerNorm, final norm, normal init). The block of the paper's official
    code (BatchNorm without affine, no final norm, fan-in uniform init, ring `[0.9, 0.999]`, dropout 0.1) is
    `norm_type="batchnorm", final_norm=False, initializer="fan_in_uniform"`; the classmethod
    [`~LRUConfig.paper_sequence_classification`] builds it, and is the recommended start for sequence
    classification of continuous signals.

    Args:
        vocab_size (`int`, *optional*, defaults to 256):
            Number of token ids (256: bytes). Unused when `input_size` is set.
        hidden_size (`int`, *optional*, defaults to 128):
            Width `H` of the residual stream (the LRU input/output size).
        num_hidden_layers (`int`, *optional*, defaults to 4):
            Number of LRU blocks.
        state_size (`int`, *optional*, defaults to 64):
            Initial number of complex states `n` per layer (the size before any reduction).
        state_sizes (`list[int]`, *optional*):
            Current number of states of each layer, one entry per layer, each `>= 1`. Defaults to
            `[state_size] * num_hidden_layers`. Updated in place by reductions; models are built from it.
        expand (`int`, *optional*, defaults to 1):
            Width factor of the GLU: `intermediate_size = expand * hidden_size` when `intermediate_size` is not
            given. With 1 the GLU is the paper's `W1 x * sigmoid(W2 x)` with `H x H` matrices.
        intermediate_size (`int`, *optional*):
            Width of the GLU. When it differs from `hidden_size`, a linear layer projects back to `hidden_size`.
        r_min (`float`, *optional*, defaults to 0.9):
            Smallest eigenvalue modulus of the ring initialization, `0 < r_min <= r_max`.
        r_max (`float`, *optional*, defaults to 0.999):
            Largest eigenvalue modulus of the ring initialization, `r_max < 1`.
        max_phase (`float`, *optional*, defaults to 6.28):
            Eigenvalue phases are initialized uniformly in `[0, max_phase)`, `0 < max_phase <= 2*pi`.
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability after the LRU (GELU) and after the GLU, in `[0, 1)`.
        norm_type (`str`, *optional*, defaults to `"layernorm"`):
            Pre-norm of each block and final norm: `"layernorm"`, `"rmsnorm"`, or `"batchnorm"` (the paper's:
            no affine parameters; in training, statistics over the batch and time, padding positions of
            `attention_mask` left out, and running statistics updated; in evaluation, the running statistics).
            `"batchnorm"` is refused by `LRUForCausalLM` (its training statistics span the whole sequence, so a
            position would see later tokens) and for a recurrent cache in training mode.
        layer_norm_epsilon (`float`, *optional*, defaults to 1e-05):
            Epsilon of the normalization layers, `> 0`.
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the BatchNorm running statistics (torch convention: `running = (1 - m) running + m batch`),
            in `(0, 1]`. The official code's Equinox BatchNorm keeps `0.99` of the old value, i.e. `m = 0.01`.
        final_norm (`bool`, *optional*, defaults to `True`):
            Whether a norm (of `norm_type`) follows the last block. The paper's model has none.
        initializer (`str`, *optional*, defaults to `"normal"`):
            Initialization of the linear and embedding layers: `"normal"` (weights `N(0, initializer_range)`,
            biases 0) or `"fan_in_uniform"` (the official code's Equinox default: linear weights and biases
            `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, embeddings `N(0, 1)`). The LRU parameters always use the ring
            initialization (`r_min`, `r_max`, `max_phase`).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the `"normal"` initialization, `> 0` (unused by `"fan_in_uniform"`).
        input_size (`int`, *optional*):
            `None`: the inputs are token ids, embedded by an `nn.Embedding`. An integer `d >= 1`: the inputs are
            continuous features of shape `(batch, seq_len, d)` passed as `inputs_embeds` and encoded by a linear
            layer (e.g. `d=1` for sequential MNIST).
        num_labels (`int`, *optional*, defaults to 2):
            Number of classes of `LRUForSequenceClassification` (the standard `PreTrainedConfig` argument; 1
            means regression).
        classifier_pooling (`str`, *optional*, defaults to `"mean"`):
            How `LRUForSequenceClassification` pools over time: `"mean"` (over non-padding positions, as in the
            paper) or `"last"` (the last non-padding position).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the language-modeling head shares its weight with the input embedding.
        pad_token_id (`int`, *optional*):
            Padding token id.
        bos_token_id (`int`, *optional*):
            Beginning-of-sequence token id.
        eos_token_id (`int` or `list[int]`, *optional*):
            End-of-sequence token id(s).
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the causal LM returns its recurrent states (an `LRUCache`) in evaluation mode.
        scan_implementation (`str`, *optional*, defaults to `"parallel"`):
            `"parallel"`: a chunked parallel scan for full sequences; `"sequential"`: the reference loop over
            time. Single-token decoding always takes one recurrent step.
        scan_chunk_size (`int`, *optional*, defaults to 16):
            Steps per chunk of the parallel scan, `>= 1`.
        compression (`dict`, *optional*):
            Record of the reductions applied so far (written by the CompreSSM callback; not read by the model).

    Example:

    ```python
    >>> from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM

    >>> configuration = LRUConfig(hidden_size=64, num_hidden_layers=2, state_size=32)
    >>> model = LRUForCausalLM(configuration)
    >>> model.config.state_sizes
    [32, 32]
    ```"""

    model_type = "compressm_lru"
    # the cache's output field: `cache` from transformers 5.24 on, `past_key_values` before
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    state_size: int = 64
    state_sizes: list[int] | None = None
    expand: int = 1
    intermediate_size: int | None = None
    r_min: float | int = 0.9
    r_max: float | int = 0.999
    max_phase: float | int = 6.28
    hidden_dropout: float | int = 0.0
    norm_type: str = "layernorm"
    layer_norm_epsilon: float | int = 1e-5
    batch_norm_momentum: float | int = 0.1
    final_norm: bool = True
    initializer: str = "normal"
    initializer_range: float | int = 0.02
    input_size: int | None = None
    classifier_pooling: str = "mean"
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    scan_implementation: str = "parallel"
    scan_chunk_size: int = 16
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "state_size",
            "expand",
            "scan_chunk_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LRUConfig: `{name}` must be an integer >= 1, got {value!r}.")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LRUConfig: `{name}` must be a number, got {value!r}.")
            setattr(self, name, float(value))
        if self.state_sizes is None:
            self.state_sizes = [self.state_size] * self.num_hidden_layers
        else:
            self.state_sizes = list(self.state_sizes)
        if len(self.state_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"LRUConfig: `state_sizes` must have one entry per layer (num_hidden_layers="
                f"{self.num_hidden_layers}), got {len(self.state_sizes)} entries: {self.state_sizes!r}."
            )
        for i, size in enumerate(self.state_sizes):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"LRUConfig: `state_sizes[{i}]` must be an integer >= 1, got {size!r}.")
        if self.intermediate_size is None:
            self.intermediate_size = self.expand * self.hidden_size
        if isinstance(self.intermediate_size, bool) or self.intermediate_size < 1:
            raise ValueError(
                f"LRUConfig: `intermediate_size` must be an integer >= 1, got {self.intermediate_size!r}."
            )
        if not 0.0 < self.r_min <= self.r_max < 1.0:
            raise ValueError(
                f"LRUConfig: the ring initialization needs 0 < r_min <= r_max < 1, got r_min={self.r_min!r}, "
                f"r_max={self.r_max!r}."
            )
        if not 0.0 < self.max_phase <= 2 * math.pi:
            raise ValueError(f"LRUConfig: `max_phase` must be in (0, 2*pi], got {self.max_phase!r}.")
        if not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError(f"LRUConfig: `hidden_dropout` must be in [0, 1), got {self.hidden_dropout!r}.")
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"LRUConfig: `norm_type` must be one of {_NORM_TYPES}, got {self.norm_type!r}.")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"LRUConfig: `layer_norm_epsilon` must be > 0, got {self.layer_norm_epsilon!r}.")
        if not 0.0 < self.batch_norm_momentum <= 1.0:
            raise ValueError(
                f"LRUConfig: `batch_norm_momentum` must be in (0, 1], got {self.batch_norm_momentum!r}."
            )
        if not isinstance(self.final_norm, bool):
            raise ValueError(f"LRUConfig: `final_norm` must be True or False, got {self.final_norm!r}.")
        if self.initializer not in _INITIALIZERS:
            raise ValueError(
                f"LRUConfig: `initializer` must be one of {_INITIALIZERS}, got {self.initializer!r}."
            )
        if not self.initializer_range > 0:
            raise ValueError(f"LRUConfig: `initializer_range` must be > 0, got {self.initializer_range!r}.")
        if self.input_size is not None and (isinstance(self.input_size, bool) or self.input_size < 1):
            raise ValueError(
                f"LRUConfig: `input_size` must be None (token ids) or an integer >= 1 (continuous features), "
                f"got {self.input_size!r}."
            )
        if self.classifier_pooling not in _POOLINGS:
            raise ValueError(
                f"LRUConfig: `classifier_pooling` must be one of {_POOLINGS}, got {self.classifier_pooling!r}."
            )
        if self.scan_implementation not in _SCANS:
            raise ValueError(
                f"LRUConfig: `scan_implementation` must be one of {_SCANS}, got {self.scan_implementation!r}."
            )
        if self.compression is not None and not isinstance(self.compression, dict):
            raise ValueError(f"LRUConfig: `compression` must be None or a dict, got {self.compression!r}.")
        super().__post_init__(**kwargs)

    @classmethod
    def paper_sequence_classification(cls, **overrides) -> "LRUConfig":
        """The sequence-classification model of the paper's official code (sMNIST setup, ``configs/paper``).

        One block, hidden size 8, 256 complex states, continuous inputs of one channel (``input_size=1``),
        BatchNorm without affine (running-statistics momentum 0.01, as Equinox's 0.99 decay), no final norm,
        fan-in uniform initialization, ring ``[0.9, 0.999]`` with phases in ``[0, 6.28)``, dropout 0.1, mean
        pooling, 10 classes. Any field can be overridden, e.g.
        ``LRUConfig.paper_sequence_classification(hidden_size=32, num_labels=4)``.
        """
        fields = dict(
            num_hidden_layers=1,
            hidden_size=8,
            state_size=256,
            input_size=1,
            num_labels=10,
            norm_type="batchnorm",
            batch_norm_momentum=0.01,
            final_norm=False,
            initializer="fan_in_uniform",
            r_min=0.9,
            r_max=0.999,
            max_phase=6.28,
            hidden_dropout=0.1,
            classifier_pooling="mean",
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' ``get_config_dict``, refusing a checkpoint of another ``model_type``.

        transformers only warns there, and ``LRUForCausalLM.from_pretrained`` on, say, a Mamba folder would
        then return a model whose every weight is freshly initialized.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found not in (None, cls.model_type):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a `{found}` checkpoint, which {cls.__name__} "
                f"(model_type `{cls.model_type}`) cannot load: none of its weights would be used. Load it with the "
                f"classes of `{found}` (e.g. AutoModelForCausalLM.from_pretrained), or pass a `{cls.model_type}` "
                f"checkpoint."
            )
        return config_dict, kwargs


__all__ = ["LRUConfig"]
