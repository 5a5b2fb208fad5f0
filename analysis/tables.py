"""The comparison tables of a sweep: pruning points, quantization before/after, bits, per-layer sensitivity.

Every table is numeric (``<value>_mean`` / ``_std`` / ``_count`` columns, means over seeds)
so that it exports as CSV; ``to_markdown`` renders it the way the course reports print
theirs ("83.1 ± 0.4"). Per seed, duplicate rows are averaged first: the float levels of a
quantized trial are the same training as those of its ``quant: none`` twin, and must not
count as extra seeds.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import pandas as pd

from analysis.summary import (FINISHED, SEED, aggregate, select, setting_columns, sort_groups, summarize,
                              varying_settings)

FACETS = ("dataset", "model")
WEIGHT_ONLY = re.compile(r"^w(\d+)(_channel)?$")
# (column in the table, label, how it is computed from a results row)
QUANT_COLUMNS: list[tuple[str, str, Callable[[pd.DataFrame], pd.Series]]] = [
    ("accuracy_pct", "Accuracy [%]", lambda r: 100 * r["accuracy"]),
    ("top5_error_pct", "Top-5 error [%]", lambda r: 100 * (1 - r["top5"])),
    ("size_kb", "Size [KB]", lambda r: r["size_bytes"] / 1e3),
    ("latency_ms", "Latency [ms/sample]", lambda r: r["latency_ms"]),
    ("output_mse", "Quantization error [output MSE]", lambda r: r["output_mse"]),
    ("top1_agreement_pct", "Top-1 agreement [%]", lambda r: 100 * r["top1_agreement"]),
]

LABELS = {"version": " ", **{c: label for c, label, _ in QUANT_COLUMNS}, "size_reduction_x": "Size reduction [×]",
          "speedup_x": "Latency speed-up [×]", "accuracy_pct": "Accuracy [%]", "remaining_pct": "Weights left [%]",
          "point_ratio": "prune.ratio", "ratio_pct": "Layer pruned [%]", "macs_nonzero": "Nonzero MACs"}


def _with(rows: pd.DataFrame, columns: Sequence[tuple[str, str, Callable]]) -> pd.DataFrame:
    rows = rows.copy()
    for name, _, fn in columns:
        try:
            rows[name] = pd.to_numeric(fn(rows), errors="coerce")
        except KeyError:  # a store without that measurement (an older sweep)
            rows[name] = math.nan
    return rows


def seed_mean(rows: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Average duplicate rows within (keys, seed), then aggregate over seeds."""
    keys = list(keys)
    per_seed = rows.groupby([*keys, SEED], dropna=False, sort=False)[list(values)].mean().reset_index()
    return sort_groups(aggregate(per_seed, keys, values), keys)


def base_key(rows: pd.DataFrame, drop_prefixes: Sequence[str]) -> pd.Series:
    """Per row, its settings except the seed and those starting with ``drop_prefixes``, as one tuple."""
    keep = [c for c in setting_columns(rows) if c != SEED and not c.startswith(tuple(drop_prefixes))]
    return pd.Series(list(rows[keep].itertuples(index=False, name=None)), index=rows.index, dtype=object)


def facets(rows: pd.DataFrame) -> list[str]:
    """The columns that split figures into panels: dataset and model (and sweep when several)."""
    out = [c for c in FACETS if c in rows]
    return (["sweep"] if "sweep" in rows and rows["sweep"].nunique() > 1 else []) + out


def _label(row, keys: Sequence[str]) -> str:
    shown = [f"{k.removeprefix('prune.')}={row[k]}" for k in keys if row[k] not in ("", None)]
    return ", ".join(shown) or "pruned"


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of FINISHED trials."""
    return frame[frame["status"] == FINISHED]


LINE_ORDER = ["prune.method", "prune.rewind", "prune.iterations"]  # the "method / rewind / schedule"
PRUNE_VALUES = ["accuracy_pct", "remaining_pct", "theoretical_speedup", "compression_ratio", "macs_nonzero"]


def pruning_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, % weights remaining, speed-up, compression and MACs per line and pruning point.

    A line is one combination of the varying pruning settings (method, rewind, schedule...).
    A line with a single target ratio is drawn through its levels (an IMP trajectory); a line
    with several ratios through each trial's final level. Level 0 is the line's dense start;
    the dense trials (``prune.ratio: 0``) form the ``dense`` baseline rows.
    """
    rows = select(finished(frame), "all", "float")
    rows = rows.assign(accuracy_pct=100 * rows["accuracy"], remaining_pct=100 * (1 - rows["sparsity"]))
    rows = _with(rows, [(c, c, lambda r, c=c: r[c]) for c in PRUNE_VALUES[2:]])
    pruned = rows[rows["prune.ratio"] > 0]
    face = facets(rows)
    quant = [c for c in setting_columns(rows) if c.startswith("quant")]
    lines = varying_settings(pruned, prefer=LINE_ORDER, exclude=[*face, "prune.ratio", *quant])
    parts = []
    groups = pruned.groupby(lines, dropna=False, sort=False) if lines else [((), pruned)]
    for _, line in (groups if len(pruned) else []):
        if line["prune.ratio"].nunique() > 1:
            last = line.groupby("trial_id")["level"].transform("max")
            line = line[(line["level"] == last) | (line["level"] == 0)]
        line = line.assign(point_ratio=line["prune.ratio"].where(line["level"] > 0, 0.0))
        points = seed_mean(line, [*face, *lines, "point_ratio", "level"], PRUNE_VALUES)
        parts.append(points.assign(line=_label(line.iloc[0], lines)))
    dense = rows[rows["prune.ratio"] == 0]
    if dense.empty:
        dense = rows[rows["level"] == 0]
    if len(dense):
        parts.append(seed_mean(dense, face, PRUNE_VALUES).assign(line="dense", point_ratio=0.0, level=0))
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    front = [*face, "line", "point_ratio", "level"]
    return table[[c for c in front if c in table] + [c for c in table if c not in front]]


def _quant_groups(frame: pd.DataFrame):
    """Per group of trials that differ only in the quant mode and seed: (name, after rows, before rows)."""
    done = finished(frame)
    final = select(done, "final", "all")
    final = final.assign(_base=base_key(final, ["quant", SEED]))
    quantized = final[final["stage"] != "float"]
    quant = [c for c in setting_columns(final) if c.startswith("quant")]
    varying = varying_settings(quantized, exclude=[*quant, *FACETS])
    for base, after in quantized.groupby("_base", sort=False):
        before = final[(final["_base"] == base) & (final["stage"] == "float")]
        first = after.iloc[0]
        name = "-".join([*(str(first[c]) for c in FACETS if c in after),
                         *(f"{c}={first[c]}" for c in varying)])
        yield re.sub(r"[^A-Za-z0-9_.=-]+", "_", name), after, before  # it names files: no paths or spaces


def quant_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model (and other setting values): the float model before and every quant mode after."""
    values = [c for c, _, _ in QUANT_COLUMNS]
    out = {}
    for name, after, before in _quant_groups(frame):
        both = _with(pd.concat([before, after]), QUANT_COLUMNS)
        table = seed_mean(both, ["stage"], values)
        table.insert(0, "version", [("before: float" if s == "float" else f"after: {s}") for s in table["stage"]])
        base = table[table["stage"] == "float"]
        if len(base):
            table["size_reduction_x"] = float(base["size_kb_mean"].iloc[0]) / table["size_kb_mean"]
            table["speedup_x"] = float(base["latency_ms_mean"].iloc[0]) / table["latency_ms_mean"]
        order = table["stage"].map(lambda s: (s != "float", s))
        out[f"quantization-{name}"] = table.iloc[order.argsort(kind="stable")].reset_index(drop=True)
    return out


def bits_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per weight bit width, per tensor vs per channel (the ``wN`` / ``wN_channel`` modes)."""
    parts = []
    for name, after, before in _quant_groups(frame):
        mode = after["stage"].str.extract(WEIGHT_ONLY)
        after = after[mode[0].notna()].assign(bits=mode[0].dropna().astype(int),
                                              granularity=mode[1].map(lambda g: "per channel" if g == "_channel"
                                                                      else "per tensor"))
        if after.empty:
            continue
        rows = pd.concat([after, before.assign(bits=32, granularity="float")])
        parts.append(seed_mean(rows.assign(accuracy_pct=100 * rows["accuracy"], group=name),
                               ["group", "granularity", "bits"], ["accuracy_pct"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def layer_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-layer sensitivity: accuracy and model MACs vs the ratio of one layer pruned in isolation.

    Trials of ``prune.scope: isolate`` (each prunes one layer) form one line per layer; trials
    with otherwise the same settings and ``scope: all`` form the ``all layers`` line, and the
    dense trials the 0% point of every line.
    """
    rows = select(finished(frame), "final", "float")
    rows = _with(rows.assign(accuracy_pct=100 * rows["accuracy"], ratio_pct=100 * rows["prune.ratio"]),
                 [("macs_nonzero", "", lambda r: r["macs_nonzero"])])
    single = (rows["prune.scope"] == "layers") & ~rows["prune.layers"].astype(str).str.contains(",") & \
             (rows["prune.ratio"] > 0)
    if not single.any():
        return pd.DataFrame()
    keys = base_key(rows, ["prune.scope", "prune.layers", "prune.ratio", "quant", SEED])
    isolated = rows[single].assign(layer=rows.loc[single, "prune.layers"].astype(str))
    everything = rows[(rows["prune.scope"] == "all") & (rows["prune.ratio"] > 0) & keys.isin(set(keys[single]))]
    dense_keys = base_key(rows, ["prune", "quant", SEED])
    dense = rows[(rows["prune.ratio"] == 0) & dense_keys.isin(set(dense_keys[single]))]
    layers = sorted(isolated["layer"].unique())
    parts = [isolated, everything.assign(layer="all layers")]
    parts += [dense.assign(layer=layer) for layer in [*layers, "all layers"] if len(everything) or layer != "all layers"]
    both = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return seed_mean(both, [*facets(rows), "layer", "ratio_pct"], ["accuracy_pct", "macs_nonzero"])


def summary_table(frame: pd.DataFrame, planned: pd.DataFrame | None = None, prefer: Sequence[str] = ()
                  ) -> dict[str, pd.DataFrame]:
    """The default summary (final accuracy per varying setting, seed flags) as a table."""
    return {"summary": summarize(frame, planned=planned, prefer=prefer)}


TABLES: dict[str, Callable[[pd.DataFrame], dict[str, pd.DataFrame]]] = {
    "summary": summary_table,
    "pruning": lambda f: {"pruning": t} if len(t := pruning_points(f)) else {},
    "quantization": quant_tables,
    "bits": lambda f: {"bits": t} if len(t := bits_points(f)) else {},
    "layers": lambda f: {"layer-sensitivity": t} if len(t := layer_points(f)) else {},
}


def _cell(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NA"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
        if std is not None and not (isinstance(std, float) and math.isnan(std)):
            text += f" ± {std:.2g}"
        return text
    return str(value).replace("|", "\\|").replace("\n", " ")


def display(table: pd.DataFrame, labels: dict[str, str] | None = None, hide: Sequence[str] = ("stage",)
            ) -> pd.DataFrame:
    """The table as text cells: ``x_mean`` and ``x_std`` become "x ± std", a lone CI "[low, high]", counts "n"."""
    labels = {**LABELS, **(labels or {})}
    stat = re.compile(r"_(std|ci95_low|ci95_high|count)$")
    means = [c[:-len("_mean")] for c in table.columns if c.endswith("_mean")]
    counts = [c for c in table.columns if c.endswith("_count")]
    out: dict[str, list[str]] = {}
    for column in table.columns:
        if stat.search(column) or column in hide:
            continue
        if column.endswith("_mean"):
            base = column[:-len("_mean")]
            out[labels.get(base, base)] = [_cell(m, s) for m, s in zip(table[column], table[base + "_std"])]
            if len(means) == 1 and base + "_ci95_low" in table:
                out[f"{labels.get(base, base)} 95% CI"] = [
                    "NA" if lo != lo else f"[{_cell(lo)}, {_cell(hi)}]"
                    for lo, hi in zip(table[base + "_ci95_low"], table[base + "_ci95_high"])]
            if base == means[-1] and counts:
                out["n"] = [str(int(max([v for v in row if v == v] or [0]))) for row in table[counts].to_numpy()]
        else:
            out[labels.get(column, column)] = [_cell(v) for v in table[column]]
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, labels: dict[str, str] | None = None, hide: Sequence[str] = ("stage",)) -> str:
    """A GitHub Markdown table of ``display(table)``."""
    shown = display(table, labels, hide)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"
