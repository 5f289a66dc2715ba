"""Evaluation: official-semantics task scoring (intent), completions files, model-agnostic greedy generation.

  intent.py       the official ESFT IntentEvaluator semantics (exact match on intent + slot set)
  completions.py  completions JSONL (ours and the official results format), eval-data joining, atomic writes
  scoring.py      task name -> scorer; summary + per-sample records
  generate.py     greedy batched generation over any `logits = forward(tokens, position_ids, attention_mask)`
  loss.py         validation loss / perplexity over any such forward (answer-only labels)
"""
