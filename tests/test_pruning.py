"""Pruning schedules, masks through rewinding and retraining, rewinding targets, reproducibility."""
import math

import pytest
import torch

from jobs.config import DatasetConfig, PruneConfig, from_flat
from jobs.data import load_dataset
from jobs.models import prunable_parameters
from jobs.pruning import PRUNE_METHODS, REWINDS, level_amount, named_prunable, target_sparsity
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
        # (whole output channels for ln_structured: 10 output neurons are 10% each of that layer)
        tolerance = {"ln_structured": 0.02}.get(method, 0.003 if method.endswith("local") else 0.001)
        assert row["sparsity"] == pytest.approx(target_sparsity(0.9, 3, row["level"]), abs=tolerance)
        if current:
            zeros = sum((m == 0).sum().item() for m in current) / sum(m.numel() for m in current)
            assert zeros == pytest.approx(row["sparsity"])

    rows = execute(cfg, on_row, checkpoint).rows
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
        prune_level(model, PruneConfig(method="l1_local"), 0.5)
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
    prune_level(model, PruneConfig(method="l1_global"), 0.5)
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
        return [{k: v for k, v in r.items() if not k.startswith(("train_time", "latency", "peak_"))} for r in rows]

    first = execute(from_flat(settings)).rows
    assert numbers(execute(from_flat(settings)).rows) == numbers(first)
    assert [r["level"] for r in first] == [0, 1, 2, 2]
    assert numbers(execute(from_flat({**settings, "seed": 4})).rows) != numbers(first)


def _model():
    from jobs.models import build_model

    seed_everything(0)
    return build_model(from_flat({"model": "lenet5"}).model, (1, 8, 8), 10)


def _layer_sparsity(model):
    return {name: (m.weight == 0).float().mean().item() for name, m in named_prunable(model)}


def test_scopes_select_layers():
    from jobs.pruning import prune_level

    names = [n for n, _ in named_prunable(_model())]
    first_conv = _model()
    prune_level(first_conv, PruneConfig(method="l1_local", scope="first_conv"), 0.5)
    assert [n for n, s in _layer_sparsity(first_conv).items() if s > 0] == [names[0]]
    chosen = _model()
    prune_level(chosen, PruneConfig(method="random_local", scope="layers", layers=f"{names[1]},{names[3]}"), 0.5)
    assert [n for n, s in _layer_sparsity(chosen).items() if s > 0] == [names[1], names[3]]
    ignoring = _model()
    prune_level(ignoring, PruneConfig(method="l1_global", ignore=names[-1]), 0.5)
    assert _layer_sparsity(ignoring)[names[-1]] == 0 and sum(_layer_sparsity(ignoring).values()) > 0
    with pytest.raises(ValueError, match="prune.layers"):
        prune_level(_model(), PruneConfig(scope="layers", layers="nope"), 0.5)


def test_output_layer_at_half_the_rate():
    from jobs.pruning import prune_level

    model = _model()
    prune_level(model, PruneConfig(method="l1_global", layer_rates="output:0.5"), 0.4)
    sparsity = _layer_sparsity(model)
    output = list(sparsity)[-1]
    assert sparsity[output] == pytest.approx(0.2, abs=0.01)
    rest = [m for n, m in named_prunable(model) if n != output]
    zeros = sum((m.weight == 0).sum().item() for m in rest) / sum(m.weight.numel() for m in rest)
    assert zeros == pytest.approx(0.4, abs=0.01)


def test_ln_structured_removes_whole_channels():
    from jobs.pruning import prune_level

    model = _model()
    prune_level(model, PruneConfig(method="ln_structured", norm=1.0), 0.5)
    for name, module in named_prunable(model):
        rows = module.weight.detach().reshape(module.weight.shape[0], -1)
        dead = (rows == 0).all(dim=1)
        assert dead.float().mean().item() == pytest.approx(0.5, abs=0.5 / rows.shape[0] + 1e-6), name
        assert ((rows == 0).any(dim=1) == dead).all()  # a channel is either whole or gone


def test_late_rewinding_goes_back_to_the_weights_after_epoch_n(tmp_path):
    from jobs.models import build_model
    from jobs.train import make_loader, train

    settings = {"dataset": "synthetic", "dataset.train_size": 128, "train.epochs": 3, "prune.ratio": 0.5,
                "prune.rewind": "epoch:1", "prune.retrain_epochs": 1}
    cfg = from_flat(settings)
    checkpoint = Checkpoint(tmp_path)
    rows = execute(cfg, checkpoint=checkpoint).rows
    assert [r["level"] for r in rows] == [0, 1]
    # the same dense training, stopped after 1 epoch, is what survivors were rewound to
    seed_everything(0)
    data = load_dataset(cfg.dataset)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    from jobs.trial import derive_seed

    loader = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    train(model, loader, cfg.train, torch.device("cpu"), epochs=1,
          epoch_seed=lambda e: derive_seed(cfg.seed, "data", 0, e))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert checkpoint.load()["rewind_state"] is not None
    # Run again, stopping right after the level-1 rewind (before its first epoch ends).
    class Stop(BaseException):
        pass

    class StopAtLevel1(Checkpoint):
        def save(self, state):
            super().save(state)
            if state["level"] == 1 and state["epoch"] == 0:
                raise Stop

    with pytest.raises(Stop):
        execute(cfg, checkpoint=StopAtLevel1(tmp_path / "b"))
    state = Checkpoint(tmp_path / "b").load()
    for key, value in state["rewind_state"].items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(ValueError, match="never reached"):
        execute(from_flat({**settings, "prune.rewind": "epoch:9"}))
    assert execute(from_flat({**settings, "prune.rewind": "step:3"})).rows[-1]["sparsity"] == pytest.approx(0.5)


def test_retrain_epochs_and_curves():
    settings = {"dataset": "synthetic", "dataset.train_size": 128, "train.epochs": 3, "prune.ratio": 0.5,
                "prune.iterations": 2, "prune.retrain_epochs": 1, "train.lr_schedule": "cosine"}
    result = execute(from_flat(settings))
    assert [(c["level"], c["epoch"]) for c in result.curves] == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert [c["step"] for c in result.curves] == [0, 1, 2, 3, 4]
    assert result.curves[0]["lr"] == pytest.approx(0.05) and result.curves[1]["lr"] < 0.05
    assert result.curves[3]["lr"] == pytest.approx(0.05)  # the schedule restarts every level
    assert all(0 <= c["test_accuracy"] <= 1 and c["train_loss"] > 0 for c in result.curves)


def test_lr_schedules():
    from jobs.config import TrainConfig
    from jobs.train import lr_at

    step = TrainConfig(lr=1.0, lr_schedule="step")
    assert [lr_at(step, e, 8) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine")
    assert lr_at(cosine, 0, 4) == 1.0 and lr_at(cosine, 2, 4) == pytest.approx(0.5)
    assert lr_at(TrainConfig(lr=0.3), 5, 8) == 0.3
