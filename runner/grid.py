"""Expand a SweepSpec into unique, canonical trials with stable ids."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from jobs.config import TrialConfig, from_flat, to_flat, trial_id
from runner.errors import SpecError
from runner.spec import SweepSpec

# Values a setting takes when it cannot matter, so that equivalent points become one trial.
DENSE = {"prune.method": "none", "prune.iterations": 0, "prune.rewind": "none"}
UNQUANTIZED = {"quant.backend": "none", "quant.calibration_batches": 0}


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
    if out["quant"] == "none":
        out.update(UNQUANTIZED)
    return out


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
    for point in raw:
        flat = canonical(to_flat(from_flat(point)))
        cfg = from_flat(flat)
        tid = trial_id(cfg)
        if tid not in trials:
            trials[tid] = Trial(tid, readable_name(flat, extra), cfg, {k: flat[k] for k in axis_keys})
    return len(raw), list(trials.values())
