"""Tokenizers behind one small interface: Hugging Face checkpoint directories and sentencepiece models.

`load_tokenizer(path) -> TokenizerAdapter`:
* a directory with `tokenizer.json` / `tokenizer_config.json` (every DeepSeek checkpoint, the tiny test tokenizer)
  is loaded offline with `transformers.AutoTokenizer` (no remote code);
* a `*.model` sentencepiece file, or a directory holding only `tokenizer.model`, is loaded with `sentencepiece`.

The adapter encodes without special tokens (`encode`, `encode_batch`); the SFT formatter adds BOS/EOS itself, the
way the model expects them (`bos_id`, `eos_id`; `pad_id` falls back to EOS, as in DeepSeek-V2's own config).
`apply_chat_template` and `encode_with_offsets` exist only for Hugging Face tokenizers (`has_chat_template`).
Bad paths raise `UserError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from megatron_esft.errors import UserError

# Probe text for the tokenizer fingerprint stored next to preprocessed data (Chinese, English, digits, JSON).
_PROBE = 'User: 请分析这句话的意图 "hello world" 12345 {"intent": [1, 2]}\n\nAssistant: 好的。'


class TokenizerAdapter:
    """Common interface; see the module docstring."""

    kind: str = "base"
    path: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False):
        raise UserError(f"{self.path}: this tokenizer has no chat template (use the 'esft' template)")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise UserError(f"{self.path}: character offsets need a Hugging Face fast tokenizer")

    def fingerprint(self) -> str:
        """Short hash of what decides the token ids: vocabulary size, specials and the encoding of a probe text."""
        blob = json.dumps([self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.encode(_PROBE)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class HFTokenizer(TokenizerAdapter):
    kind = "huggingface"

    def __init__(self, path: str):
        import transformers

        self.path = path
        try:
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # "tokenizer_class is LlamaTokenizerFast ..." is noise here
            try:
                self.hf = transformers.AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=False
                )
            finally:
                transformers.logging.set_verbosity(verbosity)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, JSONDecodeError, ...)
            raise UserError(f"{path}: cannot load tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        self.bos_id = self.hf.bos_token_id
        if self.hf.eos_token_id is None:
            raise UserError(f"{path}: tokenizer defines no EOS token")
        self.eos_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self.hf, "is_fast", False):
            return super().encode_with_offsets(text)
        out = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], [tuple(o) for o in out["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False):
        if not self.has_chat_template:
            return super().apply_chat_template(messages, add_generation_prompt, tokenize)
        return self.hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )


class SentencePieceTokenizer(TokenizerAdapter):
    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece

        self.path = model_file
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except Exception as exc:
            raise UserError(f"{model_file}: not a sentencepiece model ({str(exc).splitlines()[0]})")
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise UserError(f"{model_file}: sentencepiece model defines no EOS piece")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int) if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(int(i) for i in ids))


_HF_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path) -> TokenizerAdapter:
    """Load a tokenizer from a checkpoint/tokenizer directory or a sentencepiece `.model` file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        if os.path.basename(path) in _HF_FILES:
            return HFTokenizer(os.path.dirname(path) or ".")
        raise UserError(f"{path}: expected a tokenizer directory or a sentencepiece .model file")
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such tokenizer directory")
    if any(os.path.isfile(os.path.join(path, f)) for f in _HF_FILES):
        return HFTokenizer(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    raise UserError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model in this directory")
