"""SFT data pipeline: tokenizers, chat formatting with answer-only loss, packing with document masks, indexed data.

Public API (details in each module's docstring):

    from megatron_esft.data import (load_tokenizer, build_tiny_tokenizer, build_sft_datasets, SFTDataLoader,
                                    eval_batches, build_attention_mask, valid_token_mask)

    tok = load_tokenizer(checkpoint_dir)                  # .encode/.decode/.bos_id/.eos_id/.pad_id/.vocab_size
    train, valid = build_sft_datasets("task.jsonl", split="98,2", tokenizer=tok, seq_length=4096, seed=1234)
    loader = SFTDataLoader(train, micro_batch_size=1, dp_rank=r, dp_size=dp)   # endless, resumable
    batch = next(loader)              # tokens, labels (already shifted), loss_mask, position_ids, document_ids [b, s]
    attention_mask = build_attention_mask(batch)   # bool [b, 1, s, s], True = masked out, per-document causal
    real = valid_token_mask(batch)                  # bool [b, s], False on padding (routing statistics skip it)
    batch = to_device(batch, "cuda")                # moves it and adds batch["attention_mask"], built on the GPU
    docs = open_documents("task.jsonl", tok)        # unpacked: docs.get(i) -> (tokens, target_mask) numpy arrays

Differences from the official ESFT data code (deepseek-ai/ESFT utils.py), on purpose: packed samples cannot attend
to each other (document masks, restarted positions; the official packing lets them, esft.md 7.3 calls masking an
acceptable improvement); BOS is never dropped at random when packing (the official code drops it with p = 0.2); a
sample that does not fit the current sequence goes into another one (the official packer cuts its head off to fill
the sequence), and only samples longer than --seq-length are truncated (BOS plus their tail kept); the 98/2 split is
per document, not per packed sequence.
The token layout, stripping and answer-only targets (EOS included) are the official ones.

Modules: tokenizer (HF / sentencepiece adapters), tiny_tokenizer (offline test tokenizer), conversation (JSONL
validation, ESFT template, chat templates), documents (JSONL and Megatron indexed stores, preprocessing writer),
packing (sample tensors, attention masks), sft_dataset (split, truncation, epochs), loader (DP sharding, resume).
Heavy libraries (transformers, megatron.core) are imported only when needed.
"""

from megatron_esft.data.loader import SFTDataLoader, eval_batches, num_eval_batches
from megatron_esft.data.documents import open_documents
from megatron_esft.data.packing import build_attention_mask, collate, to_device, valid_token_mask
from megatron_esft.data.sft_dataset import SFTDataset, build_sft_datasets, parse_split
from megatron_esft.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_esft.data.tokenizer import TokenizerAdapter, load_tokenizer

__all__ = [
    "SFTDataLoader",
    "SFTDataset",
    "TokenizerAdapter",
    "build_attention_mask",
    "build_sft_datasets",
    "build_tiny_tokenizer",
    "collate",
    "eval_batches",
    "load_tokenizer",
    "num_eval_batches",
    "open_documents",
    "parse_split",
    "to_device",
    "valid_token_mask",
]
