"""Pruning schedules, masks through rewinding and retraining, rewinding targets, reproducibility."""
import math

import pytest
import torch

from jobs.config import DatasetConfig, from_flat
from jobs.data import load_dataset
from jobs.models import prunable_parameters
from jobs.pruning import PRUNE_METHODS, REWINDS, level_amount, target_sparsity
from jobs.checkpoint import Checkpoint
from jobs.trial import execute, seed_everything

SYNTHETIC = load_dataset(DatasetConfig(name="synthetic", train_size=256))


def test_level_amount_reaches_the_ratio():
    for ratio in (0.5, 0.8, 0.9, 0.98):
        for k in (1, 2, 5):
            a = level_amount(ratio, k)
            assert math.isclose(1 - (1 - a) ** k, ratio)
            assert math.isclose(target_sparsity(ratio, k, k), ratio)
    assert level_amount(0.75, 2) == pytest.approx(0.5)


@pytest.mark.parametrize("method", sorted(PRUNE_METHODS))
@pytest.mark.parametrize("rewind", sorted(REWINDS))
def test_masks_persist_and_sparsity_follows_the_schedule(method, rewind, tmp_path):
    """Check the trained model of every level, as the trial checkpointed it."""
    cfg = from_flat({"dataset": "synthetic", "dataset.train_size": 256, "prune.method": method,
                     "prune.ratio": 0.9, "prune.iterations": 3, "prune.rewind": rewind, "train.epochs": 1})
    checkpoint = Checkpoint(tmp_path)
    seen = []

    def on_row(row):
        # The last epoch's checkpoint holds this level's trained model (weight_orig + mask).
        state = checkpoint.load()
        assert (state["level"], state["epoch"]) == (row["level"], 1)
        layers = sorted({k.rsplit(".", 1)[0] for k in state["model"] if k.endswith("weight_mask")})
        assert len(layers) == (3 if row["level"] else 0)
        current = [state["model"][f"{name}.weight_mask"] for name in layers]
        for name, mask in zip(layers, current):
            effective = state["model"][f"{name}.weight_orig"] * mask
            assert torch.count_nonzero(effective[mask == 0]) == 0
        if seen and seen[-1]:  # once pruned, always pruned
            for old, new in zip(seen[-1], current):
                assert torch.all(new <= old)
        seen.append(current)
        # torch rounds the number pruned per tensor (local) or overall (global)
        tolerance = 0.003 if method.endswith("local") else 0.001
        assert row["sparsity"] == pytest.approx(target_sparsity(0.9, 3, row["level"]), abs=tolerance)
        if current:
            zeros = sum((m == 0).sum().item() for m in current) / sum(m.numel() for m in current)
            assert zeros == pytest.approx(row["sparsity"])

    rows = execute(cfg, on_row, checkpoint)
    assert [r["level"] for r in rows] == [0, 1, 2, 3]


def test_pruned_weights_are_exactly_zero_in_the_model_after_retraining():
    """The live model (not a checkpoint): masks hold through rewinding and retraining."""
    from jobs.models import build_model
    from jobs.pruning import prune_level
    from jobs.train import make_loader, train

    cfg = from_flat({"dataset": "synthetic", "train.epochs": 1})
    seed_everything(0)
    model = build_model(cfg.model, SYNTHETIC.input_shape, SYNTHETIC.num_classes)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader(SYNTHETIC.train, 32, shuffle=True, seed=0)
    for level in range(1, 4):
        prune_level(model, "l1_local", 0.5)
        REWINDS["init"](model, init, lambda: None)
        train(model, loader, cfg.train, torch.device("cpu"))
        for module, name in prunable_parameters(model):
            weight, mask = getattr(module, name), getattr(module, f"{name}_mask")
            assert torch.count_nonzero(weight[mask == 0]) == 0
            assert (mask == 0).float().mean().item() == pytest.approx(1 - 0.5 ** level, abs=0.01)


def _after_rewind(rewind):
    """Weights of the first layer right after the level-1 rewind (before retraining)."""
    from jobs.models import build_model
    from jobs.pruning import prune_level

    seed_everything(0)
    cfg = from_flat({"dataset": "synthetic"})
    model = build_model(cfg.model, SYNTHETIC.input_shape, SYNTHETIC.num_classes)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # stands in for training
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    prune_level(model, "l1_global", 0.5)
    fresh = build_model(cfg.model, SYNTHETIC.input_shape, SYNTHETIC.num_classes).state_dict()
    REWINDS[rewind](model, init, lambda: fresh)
    layer = prunable_parameters(model)[0][0]
    return layer, init, trained, fresh


@pytest.mark.parametrize("rewind,source", [("init", "init"), ("none", "trained"), ("reinit", "fresh")])
def test_rewind_targets(rewind, source):
    layer, init, trained, fresh = _after_rewind(rewind)
    expected = {"init": init, "trained": trained, "fresh": fresh}[source]["1.weight"]
    mask = layer.weight_mask
    assert torch.equal(layer.weight[mask == 1], expected[mask == 1])
    assert torch.count_nonzero(layer.weight[mask == 0]) == 0
    assert 0.3 < (mask == 0).float().mean() < 0.7


def test_same_trial_same_numbers():
    settings = {"dataset": "synthetic", "dataset.train_size": 256, "prune.ratio": 0.8,
                "prune.iterations": 2, "prune.method": "random_global", "train.epochs": 1,
                "quant": "dynamic", "seed": 3}

    def numbers(rows):
        return [{k: v for k, v in r.items() if k not in ("train_time_s", "latency_ms")} for r in rows]

    first = execute(from_flat(settings))
    assert numbers(execute(from_flat(settings))) == numbers(first)
    assert [r["level"] for r in first] == [0, 1, 2, 2]
    assert numbers(execute(from_flat({**settings, "seed": 4}))) != numbers(first)
