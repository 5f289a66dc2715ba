"""Tokenizers: the tiny offline tokenizer, HF directory loading, sentencepiece models, bad paths."""

import json
import os

import pytest

from megatron_esft.data.tiny_tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer, corpus_lines
from megatron_esft.data.tokenizer import load_tokenizer
from megatron_esft.errors import UserError

TEXTS = [
    "User: 请分析下面这句话的意图，并转化为json格式： 美国片速度与激情播放一下呢\n答案：\n\nAssistant:",
    ' {"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "美国"}}。',
    "Hello, world! 12345 tabs\tand  double  spaces\n",
    "",
]


def test_tiny_tokenizer_is_deterministic_and_loads_offline(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    build_tiny_tokenizer(str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:  # byte-for-byte identical to the session build
        assert (tmp_path / name).read_bytes() == open(os.path.join(tiny_tokenizer_dir, name), "rb").read()

    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 512
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert len({hf.bos_token_id, hf.eos_token_id, hf.pad_token_id}) == 3
    # like DeepSeek's tokenizers: encoding with special tokens prepends BOS, and nothing is appended
    ids = hf("hello")["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[-1] != hf.eos_token_id
    for text in TEXTS:  # lossless byte-level round trip, Chinese included
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    # real merges were learned: the corpus compresses well below one token per UTF-8 byte
    sample = "\n".join(corpus_lines()[:200])
    assert len(hf.encode(sample, add_special_tokens=False)) < 0.6 * len(sample.encode())
    chat = hf.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                  tokenize=False)
    assert chat == f"{BOS_TOKEN}User: q\n\nAssistant: a{EOS_TOKEN}"


def test_tiny_tokenizer_vocab_size_bound(tmp_path):
    build_tiny_tokenizer(str(tmp_path / "v300"), vocab_size=300)
    vocab = json.loads((tmp_path / "v300" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= 300
    assert load_tokenizer(str(tmp_path / "v300")).vocab_size <= 300
    with pytest.raises(UserError, match="at least 259"):
        build_tiny_tokenizer(str(tmp_path / "v100"), vocab_size=100)


def test_hf_adapter_matches_transformers(tok, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.encode_batch(TEXTS) == [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
    assert tok.has_chat_template
    ids, offsets = tok.encode_with_offsets(TEXTS[1])
    assert ids == tok.encode(TEXTS[1]) and offsets[0][0] == 0 and offsets[-1][1] == len(TEXTS[1])
    # also accepted: the tokenizer.json path itself
    assert load_tokenizer(os.path.join(tiny_tokenizer_dir, "tokenizer.json")).encode(TEXTS[0]) == tok.encode(TEXTS[0])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece

    out = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(out / "tokenizer"), vocab_size=1400,
        model_type="bpe", character_coverage=0.98, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, bos_id=1, eos_id=2, pad_id=3, unk_id=0,
        num_threads=1, minloglevel=2,
    )
    return out / "tokenizer.model"


def test_sentencepiece_model(sp_model, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    for path in (str(sp_model), str(sp_model.parent)):  # the .model file, or a directory holding tokenizer.model
        tok = load_tokenizer(path)
        assert tok.kind == "sentencepiece"
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 1400)
        for text in TEXTS:
            assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
        assert not tok.has_chat_template
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    bad = tmp_path / "broken.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(str(bad))


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(UserError, match="no such tokenizer directory"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(str(broken))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="expected a tokenizer directory"):
        load_tokenizer(str(tmp_path / "notes.txt"))


def test_sentencepiece_esft_template(sp_model, small_chat):
    import sentencepiece

    from megatron_esft.data import build_sft_datasets

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    train, _ = build_sft_datasets(small_chat, tokenizer=load_tokenizer(str(sp_model)), seq_length=512, pack=False)
    sample = next(train[i] for i in range(len(train)) if int(train[i]["document_ids"][0]) == 0)
    prompt = sp.encode("User: What is the capital of France?\n\nAssistant:")
    answer = sp.encode(" Paris.") + [2]
    expected = [1] + prompt + answer
    assert sample["tokens"][: len(expected)].tolist() == expected
    assert sample["labels"][sample["loss_mask"].bool()].tolist() == answer
