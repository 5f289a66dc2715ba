"""Chat formatting and answer-only loss, checked against an independent re-tokenization.

The reference re-implements the official ESFT `get_formatted_input_and_target` (deepseek-ai/ESFT utils.py) on
transformers' AutoTokenizer directly (not through our adapter) and returns HF-style labels (-100 = ignored, not yet
shifted). Our samples are already shifted: labels[j] is the target of tokens[j].
"""

import json

import numpy as np
import pytest

from megatron_esft.data import build_sft_datasets
from megatron_esft.errors import UserError

IGNORE = -100


def official_reference(messages, hf):
    input_ids, target_ids = [hf.bos_token_id], [hf.bos_token_id]
    for message in messages:
        if message["role"] == "user":
            ids = hf.encode("User: " + message["content"].strip() + "\n\n" + "Assistant:", add_special_tokens=False)
            input_ids += ids
            target_ids += [IGNORE] * len(ids)
        elif message["role"] == "assistant":
            ids = hf.encode(" " + message["content"].strip(), add_special_tokens=False) + [hf.eos_token_id]
            input_ids += ids
            target_ids += [IGNORE] * len(ids) if message.get("mask", 0) == 1 else ids
        else:  # system: our extension (the official code rejects it), prompt-only
            ids = hf.encode(message["content"].strip() + "\n\n", add_special_tokens=False)
            input_ids += ids
            target_ids += [IGNORE] * len(ids)
    return input_ids, target_ids


def read_messages(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def hf(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)


def check_against_reference(path, tok, hf, seq_length=1024):
    conversations = read_messages(path)
    train, valid = build_sft_datasets(path, tokenizer=tok, seq_length=seq_length, pack=False, seed=0)
    assert valid is None and len(train) == len(conversations) and train.num_truncated == 0
    seen = set()
    total_ref_tokens = total_ref_targets = 0
    for i in range(len(train)):
        sample = train[i]
        doc = int(sample["document_ids"][0])
        seen.add(doc)
        ref_in, ref_tgt = official_reference(conversations[doc], hf)
        n = len(ref_in)
        total_ref_tokens += n
        assert sample["tokens"][:n].tolist() == ref_in
        assert (sample["document_ids"][:n] == doc).all() and (sample["document_ids"][n:] == -1).all()
        assert sample["position_ids"][:n].tolist() == list(range(n))
        # shifted: position j predicts token j+1 when the reference trains on it
        ref_mask = [int(t != IGNORE) for t in ref_tgt[1:]] + [0]
        assert sample["loss_mask"].tolist() == ref_mask + [0] * (seq_length - n)
        trained = sample["loss_mask"].bool()
        assert sample["labels"][trained].tolist() == [t for t in ref_tgt[1:] if t != IGNORE]
        total_ref_targets += sum(ref_mask)
    assert seen == set(range(len(conversations)))
    assert train.num_tokens == total_ref_tokens
    return total_ref_tokens, total_ref_targets


def test_esft_template_matches_reference_small(small_chat, tok, hf):
    check_against_reference(small_chat, tok, hf)


def test_esft_template_matches_reference_official(official_slice, tok, hf):
    tokens, targets = check_against_reference(official_slice, tok, hf)
    assert tokens > 10_000 and 0 < targets < tokens


def test_esft_template_readable(small_chat, tok):
    train, _ = build_sft_datasets(small_chat, tokenizer=tok, seq_length=256, pack=False, seed=0)
    by_doc = {int(train[i]["document_ids"][0]): train[i] for i in range(len(train))}
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

    def text_and_answer(sample):
        real = sample["document_ids"] >= 0
        trained = sample["loss_mask"].bool()
        return tok.decode(sample["tokens"][real].tolist()), tok.decode(sample["labels"][trained].tolist())

    assert text_and_answer(by_doc[0]) == (
        f"{bos}User: What is the capital of France?\n\nAssistant: Paris.{eos}", f" Paris.{eos}")
    # multi-turn: both answers trained, contents stripped as in the official template
    assert text_and_answer(by_doc[2]) == (
        f"{bos}User: Count to three.\n\nAssistant: 1, 2, 3{eos}User: And in Chinese?\n\nAssistant: 一、二、三{eos}",
        f" 1, 2, 3{eos} 一、二、三{eos}")
    # system prompt is context; an assistant turn with "mask": 1 is context too
    text, answer = text_and_answer(by_doc[3])
    assert text.startswith(f"{bos}You are terse.\n\nUser: Say hi.\n\nAssistant: Hello there, how are you?{eos}")
    assert answer == f" Hi.{eos}"


def test_chat_template(small_chat, tok, hf):
    conversations = read_messages(small_chat)
    train, _ = build_sft_datasets(small_chat, tokenizer=tok, seq_length=1024, pack=False, seed=0,
                                  template="chat_template")
    eos = hf.eos_token
    for i in range(len(train)):
        sample = train[i]
        doc = int(sample["document_ids"][0])
        messages = conversations[doc]
        real = sample["document_ids"] >= 0
        rendered = hf.apply_chat_template(messages, tokenize=False)
        assert sample["tokens"][real].tolist() == hf.encode(rendered, add_special_tokens=False)
        # DeepSeek-V2 template: each trained answer is " " + content + EOS (content not stripped here)
        expected = "".join(f" {m['content']}{eos}" for m in messages
                           if m["role"] == "assistant" and m.get("mask", 0) != 1)
        assert tok.decode(sample["labels"][sample["loss_mask"].bool()].tolist()) == expected


def test_truncation(small_chat, tok, caplog):
    full, _ = build_sft_datasets(small_chat, tokenizer=tok, seq_length=1024, pack=False, seed=0)
    lengths = full.documents.lengths
    seq = 48
    long_docs = np.flatnonzero(lengths > seq)
    assert len(long_docs) >= 1
    with caplog.at_level("WARNING", logger="megatron_esft.data"):
        train, _ = build_sft_datasets(small_chat, tokenizer=tok, seq_length=seq, pack=True, seed=0)
    assert train.num_truncated == len(long_docs)
    assert f"{len(long_docs)} of {len(lengths)} samples are longer than --seq-length {seq}" in caplog.text
    tokens, target = train.document(int(long_docs[0]))
    full_tokens, full_target = full.documents.get(int(long_docs[0]))
    assert len(tokens) == seq and tokens[0] == tok.bos_id
    assert tokens[1:].tolist() == full_tokens[-(seq - 1):].tolist() and target[1:].tolist() == full_target[-(seq - 1):].tolist()
    with pytest.raises(UserError, match=r"chat_small.jsonl:\d+: sample has \d+ tokens, more than --seq-length 48"):
        build_sft_datasets(small_chat, tokenizer=tok, seq_length=seq, seed=0, truncate="error")


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}', "invalid JSON"),
    ('{"id": 3, "text": "no messages here"}', "no 'messages' field"),
    ('{"prompt": "User: x\\n\\nAssistant:", "answers": ["y"]}', "looks like an ESFT eval record"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": []}', "non-empty list"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}', "must be a string"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_bad_input_names_file_and_line(tmp_path, tok, small_chat, line, problem):
    good = open(small_chat, encoding="utf-8").read().splitlines()[:2]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good + [line]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        build_sft_datasets(str(path), tokenizer=tok, seq_length=64)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message


def test_truncated_last_line_and_missing_file(tmp_path, tok, small_chat):
    path = tmp_path / "cut.jsonl"
    content = open(small_chat, encoding="utf-8").read()
    path.write_text(content[: content.index('"Paris') + 3], encoding="utf-8")  # file cut inside line 1
    with pytest.raises(UserError, match=r"cut.jsonl:1: invalid JSON \(truncated line\?\)"):
        build_sft_datasets(str(path), tokenizer=tok, seq_length=64)
    # the column is within the line, also when the line ends in a newline (json's colno would say 1 there)
    line = '{"messages": [{"role": "user"'
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"cut.jsonl:1: invalid JSON \(truncated line\?\): .* at column {len(line) + 1}$"):
        build_sft_datasets(str(path), tokenizer=tok, seq_length=64)
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        build_sft_datasets(str(tmp_path / "missing.jsonl"), tokenizer=tok, seq_length=64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no samples"):
        build_sft_datasets(str(empty), tokenizer=tok, seq_length=64)
    with pytest.raises(UserError, match="template"):
        build_sft_datasets(small_chat, tokenizer=tok, seq_length=64, template="chatml")


def test_full_official_files_validate():
    from data_fixture_paths import official_file

    from megatron_esft.data.conversation import read_conversations

    counts = {task: sum(1 for _ in read_conversations(str(official_file("train", task)))) for task in ("intent", "law")}
    assert counts == {"intent": 7280, "law": 927}
    # the eval files hold pre-formatted prompts, not messages: refused with a hint, at line 1
    with pytest.raises(UserError, match=r"intent.jsonl:1: no 'messages' field \(this looks like an ESFT eval record"):
        next(read_conversations(str(official_file("eval", "intent"))))
