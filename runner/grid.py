"""Expand a SweepSpec into unique, canonical trials with stable ids."""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from jobs.config import SETTINGS, TrialConfig, from_flat, to_flat, trial_id
from runner.errors import SpecError
from runner.limits import DEFAULT_MAX_TRIALS
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

    cfg = from_flat(flat)
    ignored = {n.strip() for n in cfg.prune.ignore.split(",") if n.strip()}
    return [{**flat, "prune.scope": "layers", "prune.layers": name}
            for name in _layer_names(cfg.model, INPUT_SHAPES.get(cfg.dataset.name, (3, 32, 32)))
            if name not in ignored]


@functools.lru_cache(maxsize=64)
def _layer_names(model_cfg, shape: tuple) -> tuple[str, ...]:
    """The prunable layers of a model, built once per architecture (not once per isolated grid point)."""
    import torch

    from jobs.models import build_model
    from jobs.pruning import named_prunable

    # Layer names depend on the architecture only: any class count will do, the weights file is the
    # trial's business (validation must not need it), and on the meta device a model of 10^8
    # channels costs no memory.
    structure = dataclasses.replace(model_cfg, weights="", finetune="full")
    with torch.device("meta"):
        return tuple(name for name, _ in named_prunable(build_model(structure, shape, 10)))


def _isolated(spec: SweepSpec, flat: dict[str, Any]) -> list[dict[str, Any]]:
    """``isolate`` for one point of a sweep, with a model that cannot be built as a SpecError."""
    try:
        return isolate(flat)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # e.g. kernels larger than the input
        key = next((k for k in ("grid", "fixed") if (k, "prune.scope") in spec.lines), "fixed")
        raise SpecError(spec.source, spec.lines.get((key, "prune.scope")), "prune.scope",
                        f"isolate cannot list the layers of {flat['model']}: {exc}") from None


def _product(axes: dict[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, combo))


def _matches(point: dict[str, Any], rule: dict[str, list]) -> bool:
    return all(point.get(k) in values for k, values in rule.items())


_DEFAULTS = {key: info.default for key, info in SETTINGS.items()}  # in schema order, like to_flat


def _kept(spec: SweepSpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(point as written with the fixed settings, point resolved with defaults) of every kept grid point.

    Exclude rules match resolved settings (defaults included); a rule that matches no point
    is almost always a typo, and rules that drop every point leave nothing to run: both are errors.
    """
    pts = list(_product(spec.axes))
    for rule in spec.include:
        pts.extend(_product({**spec.axes, **rule}))
    full = [{**spec.fixed, **p} for p in pts]
    # Settings are validated, so this is to_flat(from_flat(p)) without building 2 dataclasses per point.
    resolved = [{**_DEFAULTS, **p} for p in full]
    for i, rule in enumerate(spec.exclude):
        if not any(_matches(r, rule) for r in resolved):
            line = spec.lines.get(("exclude", i))
            raise SpecError(spec.source, line, f"exclude[{i}]",
                            f"this rule matches no grid point ({rule}); check its values against the grid")
    kept = [(p, r) for p, r in zip(full, resolved) if not any(_matches(r, rule) for rule in spec.exclude)]
    if spec.exclude and not kept:
        raise SpecError(spec.source, spec.lines.get(("exclude",)), "exclude",
                        f"these rules drop all {len(full)} grid points; nothing would run")
    return kept


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The raw grid: product of the axes, plus include sub-grids, minus exclude matches."""
    return [p for p, _ in _kept(spec)]


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
    kept = _kept(spec)
    axis_keys = list(spec.axes) + [k for rule in spec.include for k in rule if k not in spec.axes]
    extra = [k for k in axis_keys if k not in _NAMED]
    trials: dict[str, Trial] = {}
    if any(r["prune.scope"] == "isolate" for _, r in kept):
        axis_keys.append("prune.layers")
    seen: set[tuple] = set()  # canonical points already made trials: no second config and hash
    most = spec.launcher.get("max_trials", DEFAULT_MAX_TRIALS)
    for _, resolved in kept:
        for flat in _isolated(spec, canonical(resolved)):
            key = tuple(flat.values())
            if key in seen:
                continue
            seen.add(key)
            cfg = from_flat(flat)
            tid = trial_id(cfg)
            if tid not in trials:
                name = readable_name(flat, [k for k in extra if k != "prune.layers"])
                if flat["prune.scope"] == "layers" and flat["prune.ratio"] > 0:
                    name += f"-layers={flat['prune.layers']}"
                trials[tid] = Trial(tid, name, cfg, {k: flat[k] for k in axis_keys})
            if len(trials) > most:  # prune.scope: isolate multiplies points by layers
                raise SpecError(spec.source, spec.lines.get(("grid",)), "grid",
                                f"the grid expands to more than {most:,} trials (prune.scope: isolate makes one "
                                f"per layer); at most {most:,} (launcher.max_trials)")
    return len(kept), list(trials.values())
