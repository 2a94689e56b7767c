"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread avoids thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
