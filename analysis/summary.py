"""Group a tidy runs frame over seeds: mean, std, count and a 95% Student-t interval, with seed flags.

Only FINISHED trials are averaged. A FAILED trial may have stored the levels it finished
before failing; those rows are never counted, the group names the trial instead
(``failed_trials``). Seeds a group should have but has no finished run for are listed in
``missing_seeds``: with the sweep's planned trials (``planned``) the expected seeds are those
planned for the group, otherwise every seed seen in the sweep.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from jobs.config import SETTINGS

SEED = "seed"
FINISHED = "FINISHED"
FAILED = "FAILED"
LEVELS = ("final", "all")
STAGES = ("final", "float", "all")
STATS = ("mean", "std", "count", "ci95_low", "ci95_high")
FLAG_COLUMNS = ["seeds", "failed", "failed_trials", "missing_seeds", "flag"]


class UnknownName(ValueError):
    """An axis, metric, level or stage the frame does not have; the message lists what it has."""

    def __init__(self, kind: str, got: object, choices: Iterable[object]):
        from runner.errors import allowed

        self.kind, self.got, self.allowed = kind, got, [str(a) for a in choices]
        super().__init__(f"unknown {kind} '{got}'; {allowed(self.allowed, got)}")


def describe(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1), count and the Student-t confidence interval of the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "count": n, "ci95_low": mean - half, "ci95_high": mean + half}


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's setting columns, in the settings schema's order."""
    return [c for c in SETTINGS if c in frame.columns]


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric measurement columns: everything that is neither an id, the level nor a setting."""
    skip = {"sweep", "trial_id", "run_id", "run_name", "status", "error", "level", "stage", *SETTINGS}
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]


def trials(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial (its settings and status)."""
    return frame.drop_duplicates("trial_id").reset_index(drop=True)


def _splits(table: pd.DataFrame, kept: list[str], column: str) -> bool:
    if not kept:
        return table[column].nunique(dropna=False) > 1
    return bool((table.groupby(kept, dropna=False, sort=False)[column].nunique(dropna=False) > 1).any())


def varying_settings(frame: pd.DataFrame, prefer: Sequence[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Settings that vary across trials, except the seed, and except those the others already imply.

    Canonical settings move together (``prune.ratio: 0`` makes the method ``none``), so a
    setting that splits no group of the ones kept before it adds only width. ``prefer``
    (e.g. the sweep file's axes) is tried first; ``exclude`` is never considered.
    """
    table = trials(frame)
    skip = {SEED, *exclude}
    candidates = [c for c in [*prefer, *setting_columns(table)] if c in table.columns and c not in skip]
    kept: list[str] = []
    if "sweep" in table and table["sweep"].nunique() > 1:
        kept.append("sweep")
    for column in dict.fromkeys(candidates):
        if _splits(table, kept, column):
            kept.append(column)
    return kept


def check_names(frame: pd.DataFrame, by: Sequence[str] = (), metrics: Sequence[str] = ()) -> None:
    """Raise UnknownName for an axis or metric the frame does not have."""
    axes = ["sweep", *setting_columns(frame)]
    for name in by:
        if name not in axes:
            raise UnknownName("axis", name, axes)
    allowed = metric_columns(frame)
    for name in metrics:
        if name not in allowed:
            raise UnknownName("metric", name, allowed)


def select(frame: pd.DataFrame, level: str | int = "final", stage: str = "final") -> pd.DataFrame:
    """The rows to summarise: ``level`` final / all / N, ``stage`` final / float / all / a quant mode.

    ``final`` level is each trial's last pruning level; ``final`` stage is, per trial and level,
    the quantized model where there is one, else the float model.
    """
    rows = frame[frame["level"].notna()]
    if level == "final":
        last = rows.groupby("trial_id")["level"].transform("max")
        rows = rows[rows["level"] == last]
    elif level != "all":
        try:
            wanted = int(level)
        except (TypeError, ValueError):
            raise UnknownName("level", level, [*LEVELS, "N (an integer)"]) from None
        rows = rows[rows["level"] == wanted]
    stages = sorted(frame["stage"].dropna().unique())
    if stage == "final":
        quantized = rows["stage"] != "float"
        has_quant = quantized.groupby([rows["trial_id"], rows["level"]]).transform("any")
        rows = rows[quantized | ~has_quant]
    elif stage != "all":
        if stage not in stages and stage != "float":  # every trial has float rows, even an empty frame
            raise UnknownName("stage", stage, [*STAGES, *[s for s in stages if s != "float"]])
        rows = rows[rows["stage"] == stage]
    return rows


def aggregate(rows: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: ``<metric>_mean``, ``_std``, ``_count``, ``_ci95_low``, ``_ci95_high``."""
    from scipy import stats

    by, metrics = list(by), list(metrics)
    values = rows[metrics].apply(pd.to_numeric, errors="coerce").astype(float)
    if not by:  # one group, even an empty one, so that a summary always has its row
        return pd.DataFrame([{f"{m}_{k}": v for m in metrics for k, v in describe(values[m]).items()}])
    grouped = values.groupby([rows[c] for c in by], dropna=False, sort=False)
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.count()
    # Vectorised over groups (describe() per group costs a scipy call each); n < 2 has no interval.
    n = count.where(count > 1)
    half = pd.DataFrame(stats.t.ppf(0.975, n - 1), index=n.index, columns=n.columns) * std / np.sqrt(n)
    out = pd.concat({"mean": mean, "std": std, "count": count, "ci95_low": mean - half, "ci95_high": mean + half},
                    axis=1)
    out.columns = [f"{metric}_{stat}" for stat, metric in out.columns]
    out = out.reset_index()
    out.columns = [*by, *out.columns[len(by):]]
    return out[[*by, *(f"{m}_{s}" for m in metrics for s in STATS)]]


def _seed_text(seeds: Iterable) -> str:
    return ",".join(str(s) for s in sorted(set(seeds), key=_order))


def seed_flags(table: pd.DataFrame, by: Sequence[str], planned: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per group of ``by`` over trials: finished seeds, failed trials, missing seeds and a flag text.

    ``planned`` (trial_id, sweep and settings of every trial the sweep files plan) adds the
    trials never run; a sweep without a plan expects every seed it has anywhere.
    """
    table = trials(table)
    planned_sweeps: set = set()
    if planned is not None and len(planned):
        planned_sweeps = set(planned["sweep"])
        table = pd.concat([table, planned[~planned["trial_id"].isin(table["trial_id"])]
                           .assign(status="MISSING")], ignore_index=True)
    # Without a plan, a seed axis is assumed to cross every other setting of its sweep.
    sweep_seeds = {s: set(g[SEED]) for s, g in table.groupby("sweep") if s not in planned_sweeps}
    by = list(by)
    groups = table.groupby(by, dropna=False, sort=False) if by else [((), table)]
    out = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        done = part[part["status"] == FINISHED]
        failed = part[part["status"] == FAILED]
        expected = set(part[SEED]).union(*(sweep_seeds.get(s, set()) for s in part["sweep"].unique()))
        missing = expected - set(done[SEED]) - set(failed[SEED])  # a failed seed is reported as failed
        failed_text = "; ".join(f"{t} (seed {s})" for t, s in zip(failed["trial_id"], failed[SEED]))
        notes = []
        if len(failed):
            notes.append(f"{len(failed)} failed (not averaged): {failed_text}")
        if missing:
            notes.append(f"missing seeds {_seed_text(missing)}")
        out.append({**dict(zip(by, key)), "seeds": _seed_text(done[SEED]), "failed": len(failed),
                    "failed_trials": failed_text, "missing_seeds": _seed_text(missing), "flag": "; ".join(notes)})
    return pd.DataFrame(out, columns=[*by, *FLAG_COLUMNS])


def _order(value) -> tuple:
    """A sort key that puts numbers in numeric order and text after them (columns mix both)."""
    if isinstance(value, (bool, np.bool_)):
        return (1, 0.0, str(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (0, float(value), "") if value == value else (2, 0.0, "")
    return (1, 0.0, str(value))


def sort_groups(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Rows in the natural order of their group keys."""
    if not by or table.empty:
        return table.reset_index(drop=True)
    order = sorted(range(len(table)), key=lambda i: tuple(_order(table[c].iloc[i]) for c in by))
    return table.iloc[order].reset_index(drop=True)


def summarize(frame: pd.DataFrame, by: Sequence[str] | None = None, metrics: str | Sequence[str] = "accuracy",
              level: str | int = "final", stage: str = "final", planned: pd.DataFrame | None = None,
              prefer: Sequence[str] = ()) -> pd.DataFrame:
    """Group finished trials over seeds (``by`` default: varying settings) with stats and seed flags."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    by = varying_settings(frame, prefer) if by is None else list(by)
    check_names(frame, by, metrics)
    rows = select(frame[frame["status"] == FINISHED], level, stage)
    keys = [*by, *(["level"] if level == "all" else []), *(["stage"] if stage == "all" else [])]
    stats = aggregate(rows, keys, metrics)
    flags = seed_flags(frame, by, planned)
    # A group whose every trial failed has no rows to aggregate, and must still be listed.
    if by:
        table = flags.merge(stats, on=by, how="left")
    else:
        table = pd.concat([flags] * max(len(stats), 1), ignore_index=True).join(stats)
    for metric in metrics:
        table[f"{metric}_count"] = table[f"{metric}_count"].fillna(0).astype(int)
    columns = [*keys, *(f"{m}_{s}" for m in metrics for s in STATS), *FLAG_COLUMNS]
    return sort_groups(table[columns], keys)
