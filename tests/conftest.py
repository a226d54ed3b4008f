"""Shared pytest setup: determinism for every test.

There is no ``tests/__init__.py``: pytest's rootdir conftest style, so test file
basenames must be unique across the whole tree.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield
