"""Load and validate a sweep file into a SweepSpec before anything runs or is logged."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from jobs.config import SETTINGS, SettingInfo, registry_names
from runner import limits
from runner.errors import SpecError, allowed
from runner.limits import printable, shown
from runner.yamlio import LimitError, load_yaml, parse_value, path_str, yaml_problem

TOP_KEYS = ("name", "description", "tracking", "grid", "fixed", "include", "exclude", "launcher")


@dataclass(frozen=True)
class Option:
    """One launcher option: its type, a check, and what it is for."""

    type: type | tuple
    doc: str
    check: tuple | None = None
    choices: Callable[[], list[str]] | None = None
    problem: Callable[[Any], str | None] | None = None  # a full message, for checks that say more than "must be"


_pos = (lambda v: v >= 1, ">= 1")
_nonneg = (lambda v: v >= 0, ">= 0")

LAUNCHER_OPTIONS: dict[str, Option] = {
    "executor": Option(str, "where trials run", choices=registry_names("runner.launch", "EXECUTORS")),
    "max_parallel": Option(int, "trials running at once (local) / array parallelism (slurm)", _pos),
    "folder": Option(str, "submitit folder for job logs and pickles (shared filesystem on clusters)",
                     problem=limits.folder_problem),
    "timeout_min": Option(int, "time limit of one trial in minutes", _pos),
    "job_name": Option(str, "SLURM job name (default: the sweep's name)"),
    "max_requeues": Option(int, "times a trial may be requeued after reaching its time limit", _nonneg),
    "trials_per_job": Option(int, "trials one job runs in sequence, importing once (default: local a few "
                                  "jobs per slot, slurm 1)", _pos),
    "trials_at_once": Option(int, "trials one job runs at the same time, each on its share of the job's "
                                  "cores and its own GPU (default 1: in sequence)", _pos),
    "checkpoint_every_s": Option((int, float), "most seconds between a trial's checkpoints within a level "
                                               "(fewer where saving is cheap; always at a level's end): a "
                                               "requeued trial loses at most this much work; 0: every epoch. "
                                               "Default 60", _nonneg),
    "max_trials": Option(int, f"most grid points the sweep may have (default {limits.DEFAULT_MAX_TRIALS}): a "
                              "typo in an axis must not queue a million jobs",
                         (lambda v: 1 <= v <= limits.MAX_TRIALS_CEILING, f"in 1..{limits.MAX_TRIALS_CEILING}")),
    "share_stages": Option(bool, "compute levels shared by several trials once (dense models, pruning "
                                 "trajectories); default true"),
    "slurm": Option(dict, "SLURM options, see below"),
}

SLURM_OPTIONS: dict[str, Option] = {
    "partition": Option(str, "partition (-p)"),
    "account": Option(str, "account (-A)"),
    "qos": Option(str, "quality of service (--qos)"),
    "nodes": Option(int, "nodes per trial", _pos),
    "cpus_per_task": Option(int, "CPUs per trial", _pos),
    "gpus_per_node": Option(int, "GPUs per trial", _nonneg),
    "mem_gb": Option((int, float), "memory per trial in GB", (lambda v: v > 0, "> 0")),
    "constraint": Option(str, "node features (--constraint)"),
    "exclude": Option(str, "nodes to avoid (--exclude)"),
    "setup": Option(list, "shell lines run before the trial (module load, venv activate)",
                    problem=limits.setup_problem),
    "additional_parameters": Option(dict, "extra #SBATCH options as key: value",
                                    problem=limits.parameters_problem),
    "signal_delay_s": Option(int, "seconds before the time limit at which the trial checkpoints and requeues",
                             _pos),
}


@dataclass
class SweepSpec:
    """A validated sweep file."""

    source: str
    name: str
    description: str
    tracking: str | None
    axes: dict[str, list]
    fixed: dict[str, Any]
    include: list[dict[str, list]]
    exclude: list[dict[str, list]]
    launcher: dict[str, Any]
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)


def _type_name(t) -> str:
    names = {str: "text", int: "an integer", float: "a number", bool: "true/false", list: "a list",
             dict: "a mapping"}
    if isinstance(t, tuple):
        return " or ".join(names[x] for x in t)
    return names[t]


def _group(prefix: str) -> list[str]:
    """The settings under a section prefix (``train`` -> batch_size, epochs, ...); empty if none."""
    return sorted(k[len(prefix) + 1:] for k in SETTINGS if k.startswith(prefix + "."))


def unknown_setting(key: str) -> str:
    """Why ``key`` is not a setting, and what is allowed."""
    group = _group(key)
    if group:
        return (f"'{printable(key)}' is a group of settings, not one; set them as {printable(key)}.<name>; "
                f"allowed names: {', '.join(group)}")
    return f"unknown setting '{printable(key)}'; {allowed(SETTINGS, key)}"


def coerce(info: SettingInfo, value: Any, err) -> Any:
    """Check one setting value against its type, choices and range; return it normalised."""
    t = info.type
    ok = (isinstance(value, bool) if t is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
          isinstance(value, int) and not isinstance(value, bool) if t is int else isinstance(value, t))
    if not ok:
        hint = ""
        if isinstance(value, dict) and _group(info.key):
            hint = f"; its options are separate keys: {', '.join(info.key + '.' + g for g in _group(info.key))}"
        raise err(f"expected {_type_name(t)}, got {shown(value)}{hint}")
    if t is float:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise err(f"{shown(value)} is not allowed; must be a finite number") from None
        if not math.isfinite(value):  # .inf passes "> 0" and .nan fails every range with a puzzling message
            raise err(f"{value!r} is not allowed; must be a finite number")
    if info.choices is not None and value not in info.choices():
        raise err(f"unknown value '{printable(value)}'; {allowed(info.choices(), value)}")
    if info.check is not None and not info.check[0](value):
        raise err(f"{shown(value)} is not allowed; must be {info.check[1]}")
    problem = limits.setting_problem(info.key, value)
    if problem:
        raise err(problem)
    return value


class _Checker:
    """Validates one raw sweep mapping, remembering lines for error messages."""

    def __init__(self, source: str, lines: dict[tuple, int]):
        self.source, self.lines = source, lines

    def error(self, path: tuple, message: str) -> SpecError:
        line, probe = self.lines.get(path), path
        while line is None and probe:
            probe = probe[:-1]
            line = self.lines.get(probe)
        return SpecError(self.source, line, path_str(path) or None, message)

    def mapping(self, value, path: tuple) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {type(value).__name__} {shown(value)}")
        return value

    def known(self, mapping: dict, allowed_keys, path: tuple, what: str) -> None:
        for key in mapping:
            if key not in allowed_keys:
                raise self.error(path + (key,), f"unknown {what} '{printable(key)}'; {allowed(allowed_keys, key)}")

    def flatten(self, mapping: dict, path: tuple, prefix: str = "",
                out: dict | None = None) -> dict[str, tuple[Any, tuple]]:
        """Flatten nested setting mappings into dotted keys, keeping each value's path.

        ``train: {epochs: 3}`` and ``train.epochs: 3`` are the same setting; giving both is a duplicate.
        """
        out = {} if out is None else out
        for key, value in mapping.items():
            flat, p = f"{prefix}{key}", path + (key,)
            if isinstance(value, dict) and flat not in SETTINGS:
                self.flatten(value, p, flat + ".", out)
                continue
            if flat not in SETTINGS:
                if _group(flat):
                    raise self.error(p, f"expected a mapping of {flat} settings, got {shown(value)}; "
                                        f"allowed names: {', '.join(_group(flat))}")
                raise self.error(p, unknown_setting(flat))
            if flat in out:
                first = out[flat][1]
                where = f" (first given on line {self.lines[first]})" if first in self.lines else ""
                raise self.error(p, f"duplicate setting '{flat}'{where}; give it once, nested or dotted")
            out[flat] = (value, p)
        return out

    def setting(self, key: str, value, path: tuple):
        return coerce(SETTINGS[key], value, lambda msg: self.error(path, msg))

    def values(self, key: str, value, path: tuple, *, scalar_ok: bool) -> list:
        if not isinstance(value, list):
            if not scalar_ok:
                raise self.error(path, f"an axis needs a list of values, got {shown(value)}")
            value = [value]
        elif not value:
            raise self.error(path, "empty list of values; give at least one")
        return [self.setting(key, v, path + (i,)) for i, v in enumerate(value)]

    def options(self, mapping: dict, schema: dict[str, Option], path: tuple, what: str) -> dict:
        self.known(mapping, schema, path, what)
        for key, value in mapping.items():
            message = option_problem(schema[key], value)
            if message:
                raise self.error(path + (key,), message)
        return mapping


def option_problem(opt: Option, value: Any) -> str | None:
    """Why a launcher option's value cannot be used: type, choices, range, finite, one-line text."""
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        return f"expected {_type_name(opt.type)}, got {shown(value)}"
    if opt.choices and value not in opt.choices():
        return f"unknown value '{printable(value)}'; {allowed(opt.choices(), value)}"
    # Launcher text reaches #SBATCH lines and paths: one line, no control characters.
    generic = limits.text_problem(value) if isinstance(value, str) else limits.number_problem(value)
    if generic:
        return f"{shown(value)} {generic}" if isinstance(value, str) else f"{shown(value)} is not allowed; {generic}"
    if opt.check and not opt.check[0](value):
        return f"{shown(value)} is not allowed; must be {opt.check[1]}"
    return opt.problem(value) if opt.problem else None


def _rules(chk: _Checker, raw, name: str) -> list[dict[str, list]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise chk.error((name,), f"expected a list of rules (mappings of setting: value or [values]), got {raw!r}")
    rules = []
    for i, rule in enumerate(raw):
        flat = chk.flatten(chk.mapping(rule, (name, i)), (name, i))
        if not flat:
            raise chk.error((name, i), "empty rule; give at least one setting")
        rules.append({k: chk.values(k, v, p, scalar_ok=True) for k, (v, p) in flat.items()})
    return rules


def _without(rules: list[dict[str, list]], keys: set[str]) -> list[dict[str, list]]:
    """--set wins everywhere: overridden settings leave the include rules (emptied rules go)."""
    trimmed = [{k: v for k, v in rule.items() if k not in keys} for rule in rules]
    return [rule for rule in trimmed if rule]


def _parse(source: str, key: str, text: str) -> Any:
    """One command-line YAML value, or SpecError naming the option and key."""
    try:
        return parse_value(text)
    except LimitError as exc:
        raise SpecError(source, None, printable(key), exc.problem) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, None, printable(key), f"value is not valid YAML: {yaml_problem(exc)[1]}") from None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``--set key=value`` strings (values are YAML) into pairs."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError("--set", None, printable(item), "expected key=value")
        out.append((key.strip(), _parse("--set", key.strip(), text)))
    return out


def apply_launcher_overrides(raw_launcher: Any, overrides: list[str]) -> Any:
    """Merge ``--launcher key=value`` (``slurm.partition=gpu``) into the file's launcher mapping."""
    if not overrides:
        return raw_launcher
    merged = dict(raw_launcher) if isinstance(raw_launcher, dict) else {}
    if isinstance(merged.get("slurm"), dict):
        merged["slurm"] = dict(merged["slurm"])
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError("--launcher", None, printable(item), "expected key=value")
        value = _parse("--launcher", key, text)
        chk = _Checker("--launcher", {})
        head, _, sub = key.partition(".")
        if head == "slurm" and sub:
            chk.options({sub: value}, SLURM_OPTIONS, ("slurm",), "slurm option")
            merged.setdefault("slurm", {})[sub] = value
        else:
            chk.options({key: value}, LAUNCHER_OPTIONS, (), "launcher option")
            merged[key] = value
    return merged


def _header(chk: _Checker, raw: dict) -> str:
    """Check name, description and tracking; return the name."""
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise chk.error(("name",), f"expected text (the MLflow experiment), got {shown(name)}")
    if not isinstance(name, str) or not name.strip():
        raise chk.error(("name",), "required: a non-empty name (the MLflow experiment)")
    problem = limits.text_problem(name.strip(), limits.MAX_NAME)  # it names folders and SLURM jobs
    if problem:
        raise chk.error(("name",), f"the name {shown(name)} {problem}")
    for key in ("description", "tracking"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise chk.error((key,), f"expected text, got {shown(raw[key])}")
    description = raw.get("description") or ""
    problem = limits.text_problem(description, len(description), allow="\t\n")  # free text may span lines
    if problem:
        raise chk.error(("description",), f"the description {problem}")
    if raw.get("tracking") is not None:
        problem = limits.tracking_problem(raw["tracking"])
        if problem:
            raise chk.error(("tracking",), problem)
    return name.strip()


def _grid(chk: _Checker, raw: dict) -> dict[str, tuple[Any, tuple]]:
    """The grid's flat settings; a grid that is written must have an axis (leave it out for one trial)."""
    if "grid" not in raw:
        return {}
    written = {} if raw["grid"] is None else raw["grid"]  # `grid:` with nothing under it
    grid = chk.flatten(chk.mapping(written, ("grid",)), ("grid",))
    if not grid:
        raise chk.error(("grid",), "empty grid; give at least one axis (setting: [values]), "
                                   "or leave grid out for a single trial")
    return grid


def _override(axes: dict, fixed_values: dict, overrides: list[str]) -> None:
    """Apply --set: a list (or a setting that is an axis) becomes an axis, a scalar a fixed value."""
    for key, value in parse_overrides(overrides):
        err = lambda msg, key=key: SpecError("--set", None, printable(key), msg)  # noqa: E731
        if key not in SETTINGS:
            raise err(unknown_setting(key))
        values = value if isinstance(value, list) else [value]
        if not values:
            raise err("empty list of values; give at least one")
        checked = [coerce(SETTINGS[key], v, err) for v in values]
        if key in axes or isinstance(value, list):
            axes[key] = checked
            fixed_values.pop(key, None)
        else:
            fixed_values[key] = checked[0]


def _check_size(chk: _Checker, spec: SweepSpec) -> None:
    """Refuse a grid beyond launcher.max_trials from the axis lengths, before any point is built."""
    size = limits.grid_size(spec.axes, spec.include)
    most = spec.launcher.get("max_trials", limits.DEFAULT_MAX_TRIALS)
    if size > most:
        shape = " x ".join(f"{k} {len(v)}" for k, v in spec.axes.items()) or "no axes"
        extra = f" + {len(spec.include)} include rule(s)" if spec.include else ""
        raise chk.error(("grid",), f"the grid has {size:,} points ({shape}{extra}); at most {most:,} "
                                   f"(launcher.max_trials); shrink an axis or raise max_trials")


def validate(raw: Any, source: str, lines: dict[tuple, int], overrides: list[str] = (),
             launcher_overrides: list[str] = ()) -> SweepSpec:
    """Validate a parsed sweep mapping (plus --set and --launcher overrides) into a SweepSpec."""
    chk = _Checker(source, lines)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"{type(raw).__name__} {shown(raw)}"
        raise SpecError(source, 1, None, f"a sweep file must be a mapping with keys {', '.join(TOP_KEYS)}; "
                        f"got {got}")
    chk.known(raw, TOP_KEYS, (), "key")
    name = _header(chk, raw)
    grid = _grid(chk, raw)
    fixed = chk.flatten(chk.mapping(raw.get("fixed") or {}, ("fixed",)), ("fixed",))
    axes = {k: chk.values(k, v, p, scalar_ok=False) for k, (v, p) in grid.items()}
    fixed_values = {}
    for key, (value, path) in fixed.items():
        if key in axes:
            where = f"grid, line {lines[grid[key][1]]}" if grid[key][1] in lines else "grid"
            raise chk.error(path, f"'{key}' is both an axis ({where}) and fixed; keep it in one place")
        if isinstance(value, list):
            raise chk.error(path, f"fixed settings take one value, got a list; move '{key}' to grid to make it an axis")
        fixed_values[key] = chk.setting(key, value, path)
    _override(axes, fixed_values, list(overrides))

    file_launcher = chk.mapping(raw.get("launcher") or {}, ("launcher",))
    launcher = chk.options(apply_launcher_overrides(file_launcher, list(launcher_overrides)), LAUNCHER_OPTIONS,
                           ("launcher",), "launcher option")
    if "slurm" in launcher:
        chk.options(launcher["slurm"], SLURM_OPTIONS, ("launcher", "slurm"), "slurm option")

    spec = SweepSpec(source=source, name=name, description=raw.get("description") or "",
                     tracking=raw.get("tracking"), axes=axes, fixed=fixed_values,
                     include=_without(_rules(chk, raw.get("include"), "include"),
                                      {key for key, _ in parse_overrides(list(overrides))}),
                     exclude=_rules(chk, raw.get("exclude"), "exclude"), launcher=launcher, lines=lines)
    _check_size(chk, spec)
    return spec


# The mappings whose keys are checked before aliases are expanded (what, allowed keys).
KNOWN_KEYS = {(): ("key", TOP_KEYS), ("launcher",): ("launcher option", LAUNCHER_OPTIONS),
              ("launcher", "slurm"): ("slurm option", SLURM_OPTIONS)}


def _read(path: str | os.PathLike, source: str) -> str:
    """The file's text: at most MAX_FILE_BYTES of UTF-8 (``/dev/zero`` must not be read to the end)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limits.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(source, None, None, f"cannot read the sweep file: {exc.strerror or exc}") from None
    if len(data) > limits.MAX_FILE_BYTES:
        raise SpecError(source, None, None, f"the file is larger than {limits.MAX_FILE_BYTES // 1024} KiB; "
                                            "a sweep file is a few KB (write long axes as fewer values)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(source, line, None, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                            f"{exc.start}); save the file as UTF-8") from None


def load_spec(path: str | os.PathLike, overrides: list[str] = (), launcher_overrides: list[str] = ()) -> SweepSpec:
    """Read, parse and validate a sweep file."""
    source = str(path)
    raw, lines = load_yaml(_read(path, source), source, KNOWN_KEYS)
    return validate(raw, source, lines, overrides, launcher_overrides)


def sweep_folder(spec: SweepSpec) -> Path:
    """The sweep's submitit folder: launcher.folder, else .submitit/<name> made safe and collision-free.

    A name that is already a safe folder name keeps it (existing sweeps keep their folders);
    another gets a slug plus a hash of the exact name, so that two names never share one.
    """
    folder = spec.launcher.get("folder")
    return Path(folder) if folder is not None else Path(".submitit") / limits.folder_name(spec.name)
