"""Parsing what SLURM prints."""
from runner.scheduler import _expand


def test_compressed_array_ids_are_expanded():
    assert _expand("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand("12_7") == ["12_7"] and _expand("13") == ["13"]
