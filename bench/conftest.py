"""Benchmarks run with `pytest bench/ --benchmark-only`. They time on CUDA when present and on the
CPU otherwise (small shapes there); results go in `extra_info`, never in assertions."""
import pytest
import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
