"""Chat JSONL -> token ids + a per-token target mask (what the loss is computed on).

Input lines are the official ESFT format, `{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...], ...}` (other keys are ignored). Roles: `user`, `assistant` and
`system`; an assistant message with `"mask": 1` is kept as context but not trained on (as in the official code).
Every problem is a `UserError("<file>:<line>: <problem>")`.

Templates (`template=`):
* `"esft"` -- the official ESFT layout (deepseek-ai/ESFT utils.py `get_formatted_input_and_target`):
  `[BOS] + enc("User: {q}\\n\\nAssistant:") + enc(" {a}") + [EOS]` per turn, contents stripped, every piece encoded
  separately without special tokens. System messages (not in the official code) become `enc("{s}\\n\\n")`.
* `"chat_template"` -- the tokenizer's own chat template; the text is rendered once and encoded with character
  offsets, and a token is a target when it starts inside an assistant message's span (the text that rendering
  `messages[:i+1]` adds after rendering `messages[:i]` with the generation prompt).

`target_mask[j] = 1` means token j is an assistant token the model must learn to produce (the EOS closing an
assistant turn included); prompt tokens, BOS and masked turns are 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from megatron_esft.data.tokenizer import TokenizerAdapter
from megatron_esft.errors import UserError

ROLES = ("system", "user", "assistant")
TEMPLATES = ("esft", "chat_template")

PROMPT_USER = "User: {}\n\n"
PROMPT_ASSISTANT = "Assistant:"  # no trailing space: the answer piece starts with it
ANSWER = " {}"
SYSTEM = "{}\n\n"


@dataclass
class Conversation:
    source: str  # "file:line", for error messages
    messages: list[dict]


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise UserError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    return template


def _validate(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        hint = " (this looks like an ESFT eval record; training data needs 'messages')" if "prompt" in record else ""
        raise UserError(f"{where}: no 'messages' field{hint}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    has_answer = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise UserError(f"{where}: messages[{i}] is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{i}] ({role}): 'content' must be a string")
        if role == "assistant":
            if not content.strip():
                raise UserError(f"{where}: messages[{i}]: empty assistant turn")
            has_answer = True
    if not has_answer:
        raise UserError(f"{where}: no assistant turn (nothing to train on)")
    return messages


def read_conversations(path: str) -> Iterator[Conversation]:
    """Yield validated conversations from a JSONL file; blank lines are skipped."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a .jsonl file")
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{where}: not valid UTF-8 (byte {exc.start})")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                truncated = " (truncated line?)" if not line.endswith("\n") or exc.pos >= len(line.rstrip()) else ""
                # exc.colno counts from the last newline before the error: a line cut short (error past its "\n")
                # would say column 1; the column within the line (at most just past its end) is what an editor shows
                column = min(exc.pos, len(line.rstrip("\r\n"))) + 1
                raise UserError(f"{where}: invalid JSON{truncated}: {exc.msg} at column {column}")
            yield Conversation(where, _validate(record, where))
            count += 1
    if count == 0:
        raise UserError(f"{path}: no samples in file")


def _esft_pieces(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of the official layout, BOS/EOS excluded (added as ids)."""
    pieces = []
    for msg in messages:
        content = msg["content"].strip()
        if msg["role"] == "user":
            pieces.append((PROMPT_USER.format(content) + PROMPT_ASSISTANT, False))
        elif msg["role"] == "assistant":
            pieces.append((ANSWER.format(content), msg.get("mask", 0) != 1))
        else:
            pieces.append((SYSTEM.format(content), False))
    return pieces


def format_esft_batch(
    conversations: Sequence[Conversation], tokenizer: TokenizerAdapter
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize with the official ESFT template; one (tokens int32, target_mask uint8) pair per conversation."""
    all_pieces = [_esft_pieces(c.messages) for c in conversations]
    flat = [text for pieces in all_pieces for text, _ in pieces]
    encoded = iter(tokenizer.encode_batch(flat))
    out = []
    for conv, pieces in zip(conversations, all_pieces):
        tokens: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        target: list[int] = [0] * len(tokens)
        for (text, is_answer), msg in zip(pieces, conv.messages):
            ids = next(encoded)
            if msg["role"] == "assistant":
                ids = ids + [tokenizer.eos_id]
            tokens.extend(ids)
            target.extend([int(is_answer)] * len(ids))
        out.append((np.asarray(tokens, dtype=np.int32), np.asarray(target, dtype=np.uint8)))
    return out


def _render(tokenizer: TokenizerAdapter, messages, add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except UserError:
        raise
    except Exception as exc:  # jinja raises its own exceptions (raise_exception in templates, undefined vars)
        raise UserError(f"{where}: the tokenizer's chat template failed ({type(exc).__name__}: {exc})")


def format_chat_template(conv: Conversation, tokenizer: TokenizerAdapter) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize one conversation with the tokenizer's chat template (see the module docstring)."""
    where = conv.source
    full = _render(tokenizer, conv.messages, False, where)
    spans = []
    for i, msg in enumerate(conv.messages):
        if msg["role"] != "assistant" or msg.get("mask", 0) == 1:
            continue
        before = _render(tokenizer, conv.messages[:i], True, where) if i else ""
        through = _render(tokenizer, conv.messages[: i + 1], False, where)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise UserError(f"{where}: the chat template does not render conversations prefix by prefix, so the "
                            "assistant tokens cannot be located; use the 'esft' template")
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    target = np.zeros(len(ids), dtype=np.uint8)
    for j, (start, _end) in enumerate(offsets):
        target[j] = any(lo <= start < hi for lo, hi in spans)
    return np.asarray(ids, dtype=np.int32), target


def tokenize_conversations(
    conversations: Sequence[Conversation], tokenizer: TokenizerAdapter, template: str = "esft"
) -> list[tuple[np.ndarray, np.ndarray]]:
    check_template(template)
    if template == "esft":
        return format_esft_batch(conversations, tokenizer)
    if not tokenizer.has_chat_template:
        raise UserError(f"{tokenizer.path}: tokenizer has no chat template; use --template esft")
    return [format_chat_template(c, tokenizer) for c in conversations]
