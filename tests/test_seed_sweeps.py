"""Every seed experiment's sweep file runs offline, scaled down through --set overrides."""
from pathlib import Path

import pytest

from runner.grid import expand
from runner.spec import load_spec
from jobs.trial import execute

SWEEPS = sorted(p for p in (Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")
                if p.name != "quickstart.yaml")
OFFLINE = ["dataset=synthetic", "dataset.train_size=64", "train.epochs=1", "model.weights=''",
           "dataset.augment=false", "train.batch_size=32"]


def test_there_is_a_sweep_for_every_seed_experiment():
    names = {p.stem for p in SWEEPS}
    assert {"hpc_lottery_cifar10", "kth_transfer_learning", "kth_pruning_retraining", "kth_quantization",
            "resnet34_cifar100_quantization", "technion_weight_quantization",
            "technion_pruning_per_layer"} <= names
    for path in SWEEPS:
        header = path.read_text().split("\nname:")[0]
        assert "seeds/0" in header and "sweep run" in header, f"{path.name}: header must cite its seed and command"


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_runs_offline(path):
    full = expand(load_spec(path))[1]
    spec = load_spec(path, OFFLINE)
    _, trials = expand(spec)
    assert len(trials) >= 2 or len(full) == 1
    # the first and the last trial cover the ends of every axis
    for trial in {t.id: t for t in (trials[0], trials[-1])}.values():
        result = execute(trial.config)
        levels = trial.config.prune.iterations if trial.config.prune.ratio > 0 else 0
        floats = [r for r in result.rows if r["stage"] == "float"]
        assert [r["level"] for r in floats] == list(range(levels + 1))
        assert all(0 <= r["accuracy"] <= 1 for r in result.rows)
        if trial.config.quant.mode != "none":
            assert result.rows[-1]["stage"] == trial.config.quant.mode
