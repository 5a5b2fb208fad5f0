"""Shared fixtures: `slurm` (skip without a cluster, fail in CI) for every test module."""
from slurm_cluster import slurm  # noqa: F401  (pytest fixture)
