"""Expand a SweepSpec into unique, canonical trials with stable ids."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from jobs.config import SETTINGS, TrialConfig, from_flat, to_flat, trial_id
from runner.errors import SpecError
from runner.spec import SweepSpec

# Values a setting takes when it cannot matter, so that equivalent points become one trial.
DENSE = {"prune.method": "none", "prune.iterations": 0, "prune.rewind": "none"}
DENSE_DEFAULTS = ("prune.retrain_epochs", "prune.scope", "prune.layers", "prune.ignore", "prune.layer_rates",
                  "prune.norm")
UNQUANTIZED = {"quant.backend": "none", "quant.calibration_batches": 0}
UNQUANTIZED_DEFAULTS = ("quant.qat_epochs",)


@dataclass(frozen=True)
class Trial:
    """One grid point with every setting resolved."""

    id: str
    name: str
    config: TrialConfig
    axes: dict[str, Any]

    @property
    def flat(self) -> dict[str, Any]:
        """The resolved settings as flat keys."""
        return to_flat(self.config)


def canonical(flat: dict[str, Any]) -> dict[str, Any]:
    """Normalise settings that cannot matter: no pruning makes method/iterations/rewind moot."""
    out = dict(flat)
    if out["prune.ratio"] == 0:
        out.update(DENSE)
        out.update({k: SETTINGS[k].default for k in DENSE_DEFAULTS})
    if out["quant"] == "none":
        out.update(UNQUANTIZED)
        out.update({k: SETTINGS[k].default for k in UNQUANTIZED_DEFAULTS})
    if out["prune.method"] != "ln_structured":
        out["prune.norm"] = SETTINGS["prune.norm"].default
    if out["quant"] != "qat":
        out["quant.qat_epochs"] = SETTINGS["quant.qat_epochs"].default
    return out


def isolate(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """``prune.scope: isolate``: one point per prunable layer (minus ``prune.ignore``), pruned alone."""
    if flat["prune.scope"] != "isolate" or flat["prune.ratio"] == 0:
        return [flat]
    from jobs.data import INPUT_SHAPES
    from jobs.models import build_model
    from jobs.pruning import named_prunable

    cfg = from_flat(flat)
    # Layer names depend on the architecture only; any class count will do.
    model = build_model(cfg.model, INPUT_SHAPES.get(cfg.dataset.name, (3, 32, 32)), 10)
    ignored = {n.strip() for n in cfg.prune.ignore.split(",") if n.strip()}
    return [{**flat, "prune.scope": "layers", "prune.layers": name}
            for name, _ in named_prunable(model) if name not in ignored]


def _product(axes: dict[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, combo))


def _matches(point: dict[str, Any], rule: dict[str, list]) -> bool:
    return all(point.get(k) in values for k, values in rule.items())


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The raw grid: product of the axes, plus include sub-grids, minus exclude matches.

    Exclude rules match resolved settings (defaults included); a rule that matches no point
    is almost always a typo, so it is an error.
    """
    pts = list(_product(spec.axes))
    for rule in spec.include:
        pts.extend(_product({**spec.axes, **rule}))
    full = [{**spec.fixed, **p} for p in pts]
    resolved = [to_flat(from_flat(p)) for p in full]
    for i, rule in enumerate(spec.exclude):
        if not any(_matches(r, rule) for r in resolved):
            line = spec.lines.get(("exclude", i))
            raise SpecError(spec.source, line, f"exclude[{i}]",
                            f"this rule matches no grid point ({rule}); check its values against the grid")
    return [p for p, r in zip(full, resolved) if not any(_matches(r, rule) for rule in spec.exclude)]


def readable_name(flat: dict[str, Any], extra_axes: list[str]) -> str:
    """A short human name: dataset-model-method-rRATIO-iN-quant-sSEED (+ other axes)."""
    if flat["prune.ratio"] == 0:
        prune = "dense"
    else:
        prune = f"{flat['prune.method']}-r{flat['prune.ratio']:g}-i{flat['prune.iterations']}"
    parts = [flat["dataset"], flat["model"], prune, flat["quant"], f"s{flat['seed']}"]
    parts += [f"{k}={flat[k]}" for k in extra_axes]
    return "-".join(str(p) for p in parts)


_NAMED = {"dataset", "model", "prune.method", "prune.ratio", "prune.iterations", "quant", "seed"}


def expand(spec: SweepSpec) -> tuple[int, list[Trial]]:
    """Return (grid size before de-duplication, unique trials in grid order)."""
    raw = points(spec)
    axis_keys = list(spec.axes) + [k for rule in spec.include for k in rule if k not in spec.axes]
    extra = [k for k in axis_keys if k not in _NAMED]
    trials: dict[str, Trial] = {}
    if any(p.get("prune.scope") == "isolate" for p in raw):
        axis_keys.append("prune.layers")
    for point in raw:
        for flat in isolate(canonical(to_flat(from_flat(point)))):
            cfg = from_flat(flat)
            tid = trial_id(cfg)
            if tid not in trials:
                name = readable_name(flat, [k for k in extra if k != "prune.layers"])
                if flat["prune.scope"] == "layers" and flat["prune.ratio"] > 0:
                    name += f"-layers={flat['prune.layers']}"
                trials[tid] = Trial(tid, name, cfg, {k: flat[k] for k in axis_keys})
    return len(raw), list(trials.values())
