"""Expert selection (paper Eq. 8) from per-layer scores.

* `select_top_p`: per layer, experts in descending score (ties: lower expert id first), added until the cumulative
  score reaches p; the expert that crosses p is included. Scores are accumulated as Python floats in that order, which
  is exactly what the official script does, so rounded official summaries give the official configs. Experts with a
  zero score are never selected (they received no tokens, so training them would change nothing).
* `select_under_budget`: the largest p whose selection fits a trainable-parameter budget (routed experts only).
* `random_control`: the paper's Table 4 control, the same number of experts per layer drawn uniformly at random.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_esft.errors import UserError
from megatron_esft.routing.scores import ExpertScores


def check_top_p(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise UserError(f"--top-p: must be in (0, 1], got {p}")
    return float(p)


def _ranked(row) -> list[tuple[int, float]]:
    values = [float(v) for v in row]
    return sorted(((e, v) for e, v in enumerate(values)), key=lambda ev: (-ev[1], ev[0]))


def _select_row(ranked: list[tuple[int, float]], p: float) -> list[int]:
    chosen, total = [], 0.0
    for expert, score in ranked:
        if total >= p or score <= 0.0:
            break
        chosen.append(expert)
        total += score
    return chosen


def select_top_p(scores: ExpertScores, method: str, p: float) -> dict[str, list[int]]:
    """{layer key: selected global expert ids in selection order}."""
    p = check_top_p(p)
    table = scores.method_scores(method)
    return {key: _select_row(_ranked(table[li]), p) for li, key in enumerate(scores.layers)}


@dataclasses.dataclass(frozen=True)
class BudgetSelection:
    top_p: float  # the largest p whose selection fits
    experts: dict[str, list[int]]
    num_experts: int
    params: int


def select_under_budget(
    scores: ExpertScores, method: str, budget_params: int, params_per_expert: int
) -> BudgetSelection:
    """Largest p in (0, 1] whose top-p selection trains at most `budget_params` routed-expert parameters.

    The number of experts a layer selects only changes when p passes one of that layer's cumulative scores (the
    selection for p is the same on the interval (c_{k-1}, c_k]), so the candidates are those cumulative sums (plus
    p = 1); each is tried from the largest down with the same float accumulation `select_top_p` uses.
    """
    if params_per_expert <= 0:
        raise UserError(f"--params-per-expert must be positive, got {params_per_expert}")
    if budget_params <= 0:
        raise UserError(f"--budget must be positive, got {budget_params}")
    table = scores.method_scores(method)
    ranked = [_ranked(row) for row in table]
    candidates = {1.0}
    for row in ranked:
        total = 0.0
        for _, score in row:
            if score <= 0.0:
                break
            total += score
            if 0.0 < total <= 1.0:
                candidates.add(total)
    max_experts = budget_params // params_per_expert
    for p in sorted(candidates, reverse=True):
        experts = {key: _select_row(r, p) for key, r in zip(scores.layers, ranked)}
        n = sum(len(v) for v in experts.values())
        if n <= max_experts:
            return BudgetSelection(top_p=p, experts=experts, num_experts=n, params=n * params_per_expert)
    minimum = sum(1 for row in ranked if row and row[0][1] > 0)
    raise UserError(
        f"--budget {budget_params}: too small; even the smallest p selects {minimum} experts "
        f"({minimum * params_per_expert} parameters at {params_per_expert} per expert)"
    )


def random_control(
    selection: dict[str, list[int]], num_experts: int, seed: int
) -> dict[str, list[int]]:
    """Per layer, as many experts as `selection` has, drawn uniformly without replacement (sorted ids).

    Each layer uses its own stream seeded by (seed, layer), so a layer's draw does not depend on the other layers.
    """
    out = {}
    for key, chosen in selection.items():
        rng = np.random.default_rng([int(seed), int(key)])
        out[key] = sorted(int(e) for e in rng.choice(num_experts, size=len(chosen), replace=False))
    return out
