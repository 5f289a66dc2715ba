"""Shared command-line helpers of the routing tools (select_experts, plot_expert_scores, collect_expert_scores)."""

from __future__ import annotations

import argparse
import re

from megatron_esft.errors import ArgumentParser, UserError  # noqa: F401 (ArgumentParser re-exported)


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parameter_count(text: str) -> int:
    """'1073741824', '1.07e9', '1.07B', '800M' -> int (argparse `type=`)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1.07e9 or 800M)")
    return int(float(match.group(1)) * _SUFFIX[match.group(2).lower()])


def unit_interval(text: str) -> float:
    """argparse `type=` for p in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
