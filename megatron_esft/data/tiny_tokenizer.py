"""A real, tiny, offline tokenizer for tests and the demo (DeepSeek-style specials, no download).

`build_tiny_tokenizer(out_dir, vocab_size=512)` trains a byte-level BPE with the `tokenizers` library on the corpus
embedded in `assets/` (Chinese prompts/answers from the official ESFT intent and law training sets, MIT, see
assets/LICENSE-ESFT-DATA, plus English text and JSON/code punctuation) and writes `tokenizer.json`,
`tokenizer_config.json` and `special_tokens_map.json`, so `transformers.AutoTokenizer.from_pretrained(out_dir)` and
`megatron_esft.data.tokenizer.load_tokenizer(out_dir)` load it offline.

* ids 0/1/2 are BOS `<｜begin▁of▁sentence｜>`, EOS `<｜end▁of▁sentence｜>` and PAD `<｜▁pad▁｜>` (DeepSeek's names);
  the whole vocabulary, specials included, has exactly `vocab_size` entries (byte-level BPE needs >= 259).
* Like DeepSeek's tokenizers, encoding with special tokens prepends BOS, and the chat template is DeepSeek-V2's
  ("User: ...\\n\\nAssistant: ...<eos>").
* Byte-for-byte deterministic: the BPE trainer is deterministic for a fixed corpus, and the files are written with
  sorted keys and a fixed layout. Takes well under a second.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from megatron_esft.errors import UserError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
_BYTE_ALPHABET = 256

# DeepSeek-V2(-Lite)-Chat's chat template (tokenizer_config.json of the released models).
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_FILES = ("esft_tasks_zh.txt", "english.txt")


def corpus_lines() -> list[str]:
    lines: list[str] = []
    for name in CORPUS_FILES:
        lines.extend((ASSETS / name).read_text(encoding="utf-8").splitlines())
    return lines


def _train(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # digits in groups of at most three (as DeepSeek/Llama-3 do), then GPT-2 style byte-level splitting
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def _config_files(model_max_length: int) -> dict[str, dict]:
    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added(t) for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": BOS_TOKEN,
        "chat_template": DEEPSEEK_V2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        # loads the tokenizer.json as is in transformers 4.x and 5.x (DeepSeek ships "LlamaTokenizerFast", which
        # transformers 5 maps to the same backend with a warning)
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 512, model_max_length: int = 16384) -> None:
    """Write the tiny tokenizer into `out_dir` (created if needed; existing tokenizer files are replaced)."""
    min_size = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise UserError(f"vocab size {vocab_size}: a byte-level BPE tokenizer needs at least {min_size} entries")
    tokenizer = _train(vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:  # the trainer never exceeds it; keep the contract explicit
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} entries > {vocab_size}")
    # canonical JSON (sorted keys) so the bytes do not depend on dict ordering inside the library
    files = {"tokenizer.json": json.loads(tokenizer.to_str())}
    files.update(_config_files(model_max_length))
    os.makedirs(out_dir, exist_ok=True)
    for name, content in files.items():
        text = json.dumps(content, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(out_dir, name))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
