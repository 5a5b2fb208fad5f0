"""Grid expansion, include/exclude rules, canonicalisation and trial-id stability."""
from pathlib import Path

import pytest

from jobs.config import SETTINGS, TrialConfig, from_flat, identity, to_flat, trial_id
from runner.grid import expand, points
from runner.spec import load_spec, validate

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def spec(**raw):
    """A validated spec from keyword sections."""
    return validate({"name": "t", **raw}, "t.yaml", {})


def test_product_of_axes_with_fixed_settings():
    s = spec(grid={"seed": [0, 1, 2], "quant": ["none", "static"]}, fixed={"prune.ratio": 0.5})
    size, trials = expand(s)
    assert size == 6 and len(trials) == 6
    assert {(t.config.seed, t.config.quant.mode) for t in trials} == {
        (s_, q) for s_ in (0, 1, 2) for q in ("none", "static")}
    assert all(t.config.prune.ratio == 0.5 for t in trials)
    assert trials[0].axes == {"seed": 0, "quant": "none"}


def test_ratio_zero_collapses_method_and_iterations():
    s = spec(grid={"prune.method": ["l1_global", "random_local"], "prune.ratio": [0, 0.5],
                   "prune.iterations": [1, 3]})
    size, trials = expand(s)
    assert size == 8
    dense = [t for t in trials if t.config.prune.ratio == 0]
    assert len(dense) == 1 and len(trials) == 5
    assert dense[0].config.prune.method == "none" and dense[0].config.prune.iterations == 0
    assert "dense" in dense[0].name


def test_unquantized_trials_ignore_quant_backend():
    s = spec(grid={"quant.backend": ["x86", "qnnpack"], "quant": ["none", "static"]})
    _, trials = expand(s)
    assert len(trials) == 3
    assert sorted(t.config.quant.backend for t in trials) == ["none", "qnnpack", "x86"]


def test_quickstart_counts():
    size, trials = expand(load_spec(QUICKSTART))
    assert (size, len(trials)) == (48, 39)
    assert len({t.id for t in trials}) == 39 and len({t.name for t in trials}) == 39


def test_exclude_removes_matching_points():
    s = spec(grid={"model": ["lenet_300_100", "lenet5"], "quant": ["none", "dynamic", "static"]},
             exclude=[{"model": "lenet5", "quant": ["dynamic", "static"]}])
    _, trials = expand(s)
    assert sorted((t.config.model.name, t.config.quant.mode) for t in trials) == [
        ("lenet5", "none"), ("lenet_300_100", "dynamic"), ("lenet_300_100", "none"),
        ("lenet_300_100", "static")]


def test_include_adds_a_subgrid_and_duplicates_are_removed():
    s = spec(grid={"prune.ratio": [0.5], "seed": [0, 1]},
             include=[{"prune.ratio": [0.9, 0.5], "train.epochs": 7}])
    raw = points(s)
    # 2 base points + 2 ratios x 2 seeds from the include rule
    assert len(raw) == 6
    _, trials = expand(s)
    assert len(trials) == 6  # epochs 7 makes the included 0.5 points different trials
    assert sum(t.config.train.epochs == 7 for t in trials) == 4
    assert all("train.epochs" in t.axes for t in trials)
    s2 = spec(grid={"prune.ratio": [0.5], "seed": [0, 1]}, include=[{"prune.ratio": [0.5]}])
    size, trials2 = expand(s2)
    assert size == 4 and len(trials2) == 2


def test_extra_axes_appear_in_readable_names():
    _, trials = expand(spec(grid={"train.lr": [0.1, 0.01]}))
    assert [t.name.split("-")[-1] for t in trials] == ["train.lr=0.1", "train.lr=0.01"]


def test_flat_round_trip_and_defaults():
    cfg = TrialConfig()
    assert from_flat(to_flat(cfg)) == cfg
    assert set(to_flat(cfg)) == set(SETTINGS)
    assert from_flat({"model": "lenet5", "prune.ratio": 0.3}).model.name == "lenet5"
    with pytest.raises(KeyError):
        from_flat({"no.such": 1})


# Ids of real quickstart trials. If one of these changes, every existing store loses track of
# which trials finished: change ids only on purpose.
PINNED = {
    "digits-lenet_300_100-dense-none-s0": "aab83d7f5014",
    "digits-lenet_300_100-dense-dynamic-s0": "1c4a392797f9",
    "digits-lenet_300_100-l1_global-r0.5-i1-none-s0": "672775da7b88",
    "digits-lenet_300_100-random_global-r0.9-i3-static-s0": "51ae80a76b5c",
}


def test_trial_ids_are_pinned():
    _, trials = expand(load_spec(QUICKSTART))
    by_name = {t.name: t.id for t in trials}
    assert {name: by_name[name] for name in PINNED} == PINNED


# The keys that make up an id today. A new setting must be declared with hash_default=False
# (hashed only when set to a non-default value), or every existing trial id changes.
ID_KEYS = {
    "dataset", "dataset.root", "dataset.download", "dataset.train_size", "model", "model.small_stem",
    "train.epochs", "train.batch_size", "train.optimizer", "train.lr", "train.momentum",
    "train.weight_decay", "prune.method", "prune.ratio", "prune.iterations", "prune.rewind", "quant",
    "quant.backend", "quant.calibration_batches", "seed", "device",
}


def test_new_settings_do_not_change_old_ids(monkeypatch):
    assert set(identity(TrialConfig())) == ID_KEYS, "declare new settings with hash_default=False"
    base = trial_id(TrialConfig())
    # A later setting left at its default is not hashed; set to something else, it is.
    info = SETTINGS["device"]
    monkeypatch.setitem(SETTINGS, "device", info.__class__(**{**info.__dict__, "hash_default": False}))
    assert "device" not in identity(TrialConfig())
    assert trial_id(from_flat({"device": "cpu"})) != trial_id(TrialConfig())
    assert trial_id(TrialConfig()) != base  # sanity: the monkeypatch really changed the identity


def test_id_ignores_how_a_value_was_written():
    a = spec(fixed={"prune.ratio": 0.5, "train": {"lr": 0.1}})
    b = spec(fixed={"prune.ratio": 0.50, "train.lr": 0.1})
    assert expand(a)[1][0].id == expand(b)[1][0].id
    c = spec(fixed={"prune.ratio": 0})
    d = spec(fixed={"prune.ratio": 0.0, "prune.method": "random_local", "prune.iterations": 4})
    assert expand(c)[1][0].id == expand(d)[1][0].id


def test_exclude_matches_defaults_and_rejects_rules_matching_nothing():
    s = spec(grid={"quant": ["none", "static"]}, exclude=[{"train.lr": 0.05, "quant": "static"}])
    assert [t.config.quant.mode for t in expand(s)[1]] == ["none"]  # lr 0.05 is the default
    bad = spec(grid={"quant": ["none", "static"]}, exclude=[{"quant": "dynamic"}])
    from runner.errors import SpecError

    with pytest.raises(SpecError, match=r"exclude\[0\]: this rule matches no grid point"):
        expand(bad)



def test_isolate_expands_into_one_trial_per_layer():
    s = spec(grid={"prune.scope": ["all", "isolate"]},
             fixed={"model": "lenet5", "prune.ratio": 0.5, "prune.ignore": "11"})
    _, trials = expand(s)
    isolated = [t for t in trials if t.config.prune.scope == "layers"]
    # lenet5 has 5 prunable layers (2 convs, 3 linears); the ignored one gets no trial
    assert len(isolated) == 4 and len(trials) == 5
    assert sorted(t.config.prune.layers for t in isolated) == ["0", "3", "7", "9"]
    assert all(t.name.endswith(f"layers={t.config.prune.layers}") for t in isolated)
    dense = spec(grid={"prune.scope": ["isolate"]}, fixed={"model": "lenet5", "prune.ratio": 0})
    assert len(expand(dense)[1]) == 1  # nothing to isolate without pruning
