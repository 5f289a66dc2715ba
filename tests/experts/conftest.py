import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tiny.py helpers


@pytest.fixture(scope="module")
def mcore():
    """Single-rank Megatron-Core parallel state (gloo on CPU)."""
    from megatron_esft.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    yield
