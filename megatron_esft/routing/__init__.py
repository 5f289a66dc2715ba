"""Routing statistics and expert selection (the first half of ESFT: find the experts a task uses).

* `scores`: ExpertScores (Token / Gate scores per layer and expert), official summary.json and routing-log import.
* `selection`: cumulative top-p, parameter budget, random control.
* `collector`: RoutingStatsCollector, hooks on every Megatron-Core `TopKRouter` (imports torch/Megatron-Core).
* `forward`: forward-only passes with Megatron-Core's schedule (any TP/PP/EP), data-parallel sharding of micro-batches.
* `collect`: the scoring pass of tools/collect_expert_scores.py (checkpoint, data sampling, scores.json).
* `plot`: layers x experts heatmap (PNG / TensorBoard).
* `cli`: argparse helpers shared by the tools (one-line errors).
"""

from megatron_esft.routing.scores import ExpertScores, load_scores, read_official_logs  # noqa: F401
from megatron_esft.routing.selection import (  # noqa: F401
    random_control,
    select_top_p,
    select_under_budget,
)
