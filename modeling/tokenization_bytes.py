"""A byte-level tokenizer for the CompreSSM language models: token id ``i`` is the byte ``i``.

The models that ``compressm-train`` trains read raw UTF-8 bytes (``compressm_hf.data.byte_lm_splits``:
``np.frombuffer(text.encode("utf-8"), np.uint8)``, no BOS/EOS inserted) with a vocabulary of 256.
``CompreSSMByteTokenizer`` produces exactly those ids, adds no special token when encoding, and decodes
them back to the same text, so ``AutoTokenizer`` / ``pipeline("text-generation", model=folder)`` work on
a saved folder.

Special tokens are optional and, when set, are single bytes that already have their id (e.g. the Mamba
CLI models use byte 0 as pad/bos/eos): the vocabulary stays 256, the model's embedding matrix fits it.
``CompreSSMByteTokenizer.for_model_config(config)`` takes them from a model config.

This file is copied next to saved models (``trust_remote_code``): it imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_python import AddedToken, PreTrainedTokenizer

__all__ = ["BYTE_VOCAB_SIZE", "CompreSSMByteTokenizer"]

BYTE_VOCAB_SIZE = 256
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _byte_token(name: str, token: Any) -> str | AddedToken | None:
    """Check that a special token is one byte (a str of one character with code point < 256)."""
    if token is None:
        return None
    content = token.content if isinstance(token, AddedToken) else token
    if not isinstance(content, str) or len(content) != 1 or ord(content) >= BYTE_VOCAB_SIZE:
        raise ValueError(
            f"{name}={content!r} is not a byte: CompreSSMByteTokenizer's special tokens must be one character "
            f"with code point 0..255 (e.g. '\\x00'), so that its id is that byte and the vocabulary stays "
            f"{BYTE_VOCAB_SIZE}."
        )
    if isinstance(token, AddedToken):
        return token
    # no stripping, no normalization: the special byte stays exactly where it is in the text
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


class CompreSSMByteTokenizer(PreTrainedTokenizer):
    """Raw UTF-8 bytes as tokens: ``encode(text) == list(text.encode("utf-8"))`` and back.

    Args:
        bos_token, eos_token, pad_token, unk_token (`str`, *optional*, default `None`): special tokens, each
            a single byte (``"\\x00"`` is id 0). ``None``: the tokenizer has no such token.
        errors (`str`, *optional*, defaults to `"replace"`): how ``decode`` treats ids that are not valid
            UTF-8 (``bytes.decode``'s ``errors``); :meth:`decode_bytes` returns the exact bytes.

    Encoding adds no special token (the training data has none). Tokens are one-character strings
    ``chr(byte)``; ids are ``int`` in ``[0, 256)`` (plus any tokens added later with ``add_tokens``).
    """

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        bos_token: str | AddedToken | None = None,
        eos_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = None,
        unk_token: str | AddedToken | None = None,
        errors: str = "replace",
        **kwargs: Any,
    ) -> None:
        specials = {
            name: _byte_token(name, token)
            for name, token in zip(_SPECIAL_ATTRIBUTES, (bos_token, eos_token, pad_token, unk_token))
        }
        self.errors = errors
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # never rewrite " ." and friends
        kwargs["special_tokens_pattern"] = "none"
        super().__init__(**specials, errors=errors, **kwargs)

    @classmethod
    def for_model_config(cls, config: Any, **kwargs: Any) -> CompreSSMByteTokenizer:
        """The tokenizer of a byte-level model: its ``bos/eos/pad_token_id`` (when set) become special bytes.

        Args:
            config: a model config (``PreTrainedConfig`` or anything with ``vocab_size`` and the token ids).
            **kwargs: passed to the constructor (they override the config's tokens).

        Raises:
            ValueError: ``config.vocab_size`` is below 256, or a special token id is not a byte.
        """
        vocab_size = getattr(config, "vocab_size", None)
        if not isinstance(vocab_size, int) or vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size!r}: a byte-level tokenizer needs a model with vocab_size >= "
                f"{BYTE_VOCAB_SIZE} (one id per byte)."
            )
        for name in ("bos_token", "eos_token", "pad_token"):
            token_id = getattr(config, f"{name}_id", None)
            if isinstance(token_id, (list, tuple)):  # eos_token_id may be a list: the first one is the token
                token_id = token_id[0] if token_id else None
            if token_id is None or name in kwargs:
                continue
            if not isinstance(token_id, int) or not 0 <= token_id < BYTE_VOCAB_SIZE:
                raise ValueError(
                    f"config.{name}_id={token_id!r} is not a byte id; allowed: None or 0..{BYTE_VOCAB_SIZE - 1}."
                )
            kwargs[name] = chr(token_id)
        return cls(**kwargs)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(BYTE_VOCAB_SIZE)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        if len(token) == 1 and ord(token) < BYTE_VOCAB_SIZE:
            return ord(token)
        return self.unk_token_id

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"token id {index} is not a byte (allowed: 0..{BYTE_VOCAB_SIZE - 1} or an added token)"
            )
        return chr(index)

    def _token_bytes(self, token: str) -> bytes:
        if len(token) == 1 and ord(token) < BYTE_VOCAB_SIZE:
            return bytes([ord(token)])
        return token.encode("utf-8")  # a token added with add_tokens stands for its text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", errors=self.errors)

    def decode_bytes(self, token_ids: Any, skip_special_tokens: bool = False) -> bytes:
        """The exact bytes of ``token_ids`` (a list / 1-D tensor of ids), without UTF-8 decoding."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        tokens = self.convert_ids_to_tokens(list(token_ids), skip_special_tokens=skip_special_tokens)
        return b"".join(self._token_bytes(t) for t in tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to write
