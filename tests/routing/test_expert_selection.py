"""Selection: the official intent config reproduced exactly; top-p, budget and random-control semantics."""

import json

import numpy as np
import pytest
from routing_fixtures import INTENT_CONFIG, INTENT_LOGS, INTENT_SUMMARY, needs_fixtures

from megatron_esft.errors import UserError
from megatron_esft.routing.scores import ExpertScores, load_scores, read_official_logs
from megatron_esft.routing.selection import random_control, select_top_p, select_under_budget


@needs_fixtures
def test_summary_json_token_p02_reproduces_official_intent_config():
    official = json.loads(INTENT_CONFIG.read_text())["experts"]
    ours = select_top_p(load_scores(INTENT_SUMMARY), "token", 0.2)
    assert ours == official  # same layers, same experts, same (descending-score) order
    assert sum(map(len, ours.values())) == 124


@needs_fixtures
def test_full_precision_logs_differ_only_in_the_documented_tie():
    # Layer 17: experts 45 (0.030933) and 2 (0.030852) both round to 0.0309; the official config took 2
    # (lower id first among rounded ties). At full precision 45 wins. This is why --scores accepts summary.json.
    official = json.loads(INTENT_CONFIG.read_text())["experts"]
    ours = select_top_p(read_official_logs(INTENT_LOGS), "token", 0.2)
    assert [k for k in official if ours[k] != official[k]] == ["17"]
    assert ours["17"][:4] == official["17"][:4] and ours["17"][4] == 45 and official["17"][4] == 2


def _scores(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return ExpertScores(layers=[str(i + 1) for i in range(len(rows))], num_experts=rows.shape[1],
                        token_scores=rows, gate_scores=rows / 2)


def test_top_p_includes_crossing_expert_breaks_ties_by_id_and_skips_zero():
    scores = _scores([[0.1, 0.3, 0.3, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert select_top_p(scores, "token", 0.3) == {"1": [1], "2": [5]}
    assert select_top_p(scores, "token", 0.31) == {"1": [1, 2], "2": [5]}  # crossing expert included
    assert select_top_p(scores, "token", 0.7) == {"1": [1, 2, 3], "2": [5]}
    assert select_top_p(scores, "token", 0.85) == {"1": [1, 2, 3, 0], "2": [5]}  # tie 0.1: id 0 before 4
    assert select_top_p(scores, "token", 1.0) == {"1": [1, 2, 3, 0, 4], "2": [5]}  # never the zero-score expert
    assert select_top_p(scores, "gate", 0.5) == {"1": [1, 2, 3, 0, 4], "2": [5]}  # gate mass 0.5 just reached


@pytest.mark.parametrize("p", [0, -0.1, 1.0001, float("nan")])
def test_top_p_outside_unit_interval_is_rejected(p):
    with pytest.raises(UserError, match="--top-p"):
        select_top_p(_scores([[1.0]]), "token", p)


def test_unknown_method_is_rejected():
    with pytest.raises(UserError, match="unknown scoring method 'tokens'"):
        select_top_p(_scores([[1.0]]), "tokens", 0.2)


def test_budget_picks_the_largest_p_that_fits():
    rng = np.random.default_rng(3)
    rows = rng.dirichlet(np.full(16, 0.3), size=6)
    scores = _scores(rows)
    per_expert = 1000
    grid = np.linspace(0.001, 1.0, 2000)
    counts = [sum(map(len, select_top_p(scores, "token", p).values())) for p in grid]
    for budget_experts in (6, 9, 20, 40, 96):
        chosen = select_under_budget(scores, "token", budget_experts * per_expert + 999, per_expert)
        assert chosen.num_experts <= budget_experts and chosen.params == chosen.num_experts * per_expert
        assert chosen.experts == select_top_p(scores, "token", chosen.top_p)
        fitting = [p for p, n in zip(grid, counts) if n <= budget_experts]
        assert chosen.top_p >= max(fitting)  # nothing on the grid with a larger p fits
        larger = [n for p, n in zip(grid, counts) if p > chosen.top_p]
        assert all(n > budget_experts for n in larger)
    with pytest.raises(UserError, match="too small"):
        select_under_budget(scores, "token", 5 * per_expert, per_expert)  # 6 layers need >= 6 experts


def test_random_control_keeps_counts_and_is_seeded():
    selection = {"1": [3, 4], "2": [0], "3": [], "4": [1, 2, 3, 4, 5]}
    a = random_control(selection, 8, seed=7)
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in selection.items()}
    assert all(len(set(v)) == len(v) and all(0 <= e < 8 for e in v) for v in a.values())
    assert a == random_control(selection, 8, seed=7)
    draws = {tuple(map(tuple, random_control(selection, 8, seed=s).values())) for s in range(10)}
    assert len(draws) > 5
    # a layer's draw does not depend on the other layers
    assert random_control({"4": selection["4"]}, 8, seed=7)["4"] == a["4"]
