"""Shared fixtures: `slurm` (skip without a cluster, fail in CI), one torch thread for tiny-model tests."""
import pytest
import torch

from slurm_cluster import slurm  # noqa: F401  (pytest fixture)


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread buys nothing, and on a busy machine spinning OpenMP
    threads slow these tests down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
