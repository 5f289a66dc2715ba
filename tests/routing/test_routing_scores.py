"""Scores math: the official routing logs and summary.json reproduced; our scores.json round trip; bad input."""

import json

import numpy as np
import pytest
from routing_fixtures import INTENT_LOGS, INTENT_SUMMARY, needs_fixtures

from megatron_esft.errors import UserError
from megatron_esft.esft.expert_config import ModelShape
from megatron_esft.routing.scores import ExpertScores, load_scores, read_official_logs


@needs_fixtures
def test_official_logs_reproduce_summary_json_to_4_decimals():
    scores = read_official_logs(INTENT_LOGS, topk=6, num_experts=64)
    official = json.loads(INTENT_SUMMARY.read_text())
    ours = scores.summary_dict(decimals=4)
    assert list(ours) == ["token_scores", "gate_scores"]
    for table in ours:
        assert set(ours[table]) == set(official[table]) == {str(i) for i in range(1, 27)}
        for layer in ours[table]:
            assert ours[table][layer] == official[table][layer], (table, layer)
    # the committed scores came from ~8.2K tokens (127 intent samples), every layer saw the same tokens
    assert (scores.num_tokens == 8222).all()
    np.testing.assert_allclose(scores.token_scores.sum(1), 1.0, atol=1e-12)
    assert ((scores.gate_scores.sum(1) > 0.3) & (scores.gate_scores.sum(1) < 0.5)).all()


def _write_logs(directory, per_layer):
    for layer, sequences in per_layer.items():
        lines = []
        for ids, weights in sequences:
            lines.append("\t".join(map(str, ids.ravel())) + "\t\t" + "\t".join(f"{w:.4f}" for w in weights.ravel()))
        (directory / f"expert_weights_{layer}.txt").write_text("\n".join(lines) + "\n")


def test_scores_from_logs_match_independent_float64_computation(tmp_path):
    rng = np.random.default_rng(0)
    topk, experts = 3, 10
    per_layer = {}
    for layer in (1, 2, 5):
        seqs = []
        for length in rng.integers(1, 30, size=7):
            ids = np.stack([rng.choice(experts, topk, replace=False) for _ in range(length)])
            weights = np.round(rng.random((length, topk)) / 3, 4)
            seqs.append((ids, weights))
        per_layer[layer] = seqs
    _write_logs(tmp_path, per_layer)
    scores = read_official_logs(tmp_path, topk=topk, num_experts=experts)
    assert scores.layers == ["1", "2", "5"]
    for li, layer in enumerate((1, 2, 5)):
        ids = np.concatenate([s[0] for s in per_layer[layer]])
        weights = np.concatenate([s[1] for s in per_layer[layer]])
        n = ids.shape[0]
        token = np.array([(ids == e).sum() for e in range(experts)]) / (topk * n)
        gate = np.array([weights[ids == e].sum() for e in range(experts)]) / n
        np.testing.assert_allclose(scores.token_scores[li], token, rtol=0, atol=1e-15)
        np.testing.assert_allclose(scores.gate_scores[li], gate, rtol=1e-12)
        assert scores.num_tokens[li] == n


def test_scores_json_round_trip_keeps_counts(tmp_path):
    counts = np.array([[3, 1, 0, 2], [0, 6, 0, 0]])
    sums = np.array([[0.9, 0.2, 0.0, 0.5], [0.0, 2.5, 0.0, 0.0]])
    scores = ExpertScores.from_counts(["1", "2"], counts, sums, [3, 3], topk=2, gate="raw softmax",
                                      model={"path": "m"}, data={"file": "d.jsonl"})
    np.testing.assert_allclose(scores.token_scores, counts / 6)
    np.testing.assert_allclose(scores.gate_scores, sums / 3)
    path = scores.save(tmp_path)
    assert path.name == "scores.json"
    back = load_scores(tmp_path)
    assert back.layers == ["1", "2"] and back.topk == 2 and back.model == {"path": "m"}
    np.testing.assert_array_equal(back.counts, counts)
    np.testing.assert_array_equal(back.token_scores, scores.token_scores)
    np.testing.assert_array_equal(back.gate_scores, scores.gate_scores)
    data = json.loads(path.read_text())
    assert data["token_scores"]["2"] == {"0": 0.0, "1": 1.0, "2": 0.0, "3": 0.0}


@needs_fixtures
def test_load_official_summary_and_model_check():
    scores = load_scores(INTENT_SUMMARY)
    assert scores.counts is None and scores.num_experts == 64 and len(scores.layers) == 26
    v2_lite = ModelShape.from_hf_dict({"num_hidden_layers": 27, "first_k_dense_replace": 1, "n_routed_experts": 64,
                                       "num_experts_per_tok": 6})
    scores.check_model(v2_lite)
    tiny = ModelShape.from_hf_dict({"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 8},
                                   source="tiny/config.json")
    with pytest.raises(UserError, match="different model than tiny/config.json"):
        scores.check_model(tiny)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t3\t4\t\t0.1\t0.2\t0.3", "4 expert ids but 3 gate weights"),
        ("1\t2\t3\t\t0.1\t0.2\t0.3", "not a multiple of top-k 2"),
        ("1\t1\t\t0.1\t0.2", "same expert twice"),
        ("1\tx\t\t0.1\t0.2", "invalid literal"),
        ("1\t2 0.1\t0.2", "empty field"),
    ],
)
def test_bad_logs_name_file_and_line(tmp_path, line, message):
    (tmp_path / "expert_weights_1.txt").write_text("0\t1\t\t0.5\t0.25\n" + line + "\n")
    with pytest.raises(UserError, match=message) as info:
        read_official_logs(tmp_path, topk=2)
    assert "expert_weights_1.txt:2:" in str(info.value)


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{", "not valid JSON"),
        ('{"token_scores": {}}', "missing or empty 'token_scores'"),
        ('{"token_scores": {"1": {"0": 0.5, "2": 0.5}}, "gate_scores": {"1": {"0": 0.5, "1": 0.5}}}', "0..1"),
        ('{"token_scores": {"1": {"0": 1.0}, "2": {"0": 0.5, "1": 0.5}}, "gate_scores": {}}', "2 experts, but layer 1 has 1"),
        ('{"token_scores": {"1": {"0": -1}}, "gate_scores": {"1": {"0": 1}}}', "non-negative"),
    ],
)
def test_bad_score_files(tmp_path, payload, message):
    path = tmp_path / "scores.json"
    path.write_text(payload)
    with pytest.raises(UserError, match=message):
        load_scores(path)
