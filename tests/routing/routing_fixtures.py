"""Paths of the official ESFT fixtures (outside the repository: <repo>/../shared/fixtures); tests skip without them."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "esft_official"
INTENT_LOGS = FIXTURES / "expert_scores" / "intent"
INTENT_SUMMARY = INTENT_LOGS / "summary.json"
INTENT_CONFIG = FIXTURES / "expert_configs" / "intent.json"
REPO = Path(__file__).resolve().parents[2]

needs_fixtures = pytest.mark.skipif(not INTENT_SUMMARY.is_file(), reason=f"official fixtures absent: {FIXTURES}")
