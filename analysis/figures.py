"""The figures of a sweep as matplotlib Figures (no pyplot, no display: safe on a login node).

``FIGURES`` maps a name to a function ``(frame, curves) -> Figure | None``; ``None`` means the
sweep has nothing to show for it (no pruned trials, no weight-only quant modes...). Points
are means over seeds with ± std error bars (bands on lines), from ``analysis.tables``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.tables import bits_points, facets, layer_points, pruning_points

ACCURACY = "Top-1 test accuracy [%]"
PANEL = (5.2, 3.8)


def _figure(width: float, height: float) -> Figure:
    # An Agg canvas of its own, never pyplot: no display needed and no global figure state.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(keys: list[tuple], title: str) -> tuple[Figure, dict]:
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig = _figure(PANEL[0] * cols, PANEL[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, dict(zip(keys, axes))


def _facet_groups(table: pd.DataFrame, columns: list[str]):
    if not columns:
        return [((), table)]
    return [(k if isinstance(k, tuple) else (k,), g) for k, g in table.groupby(columns, sort=True)]


def _title(columns: list[str], key: tuple) -> str:
    return " / ".join(str(v) for v in key) if key else ""


def _errorbar(ax, part: pd.DataFrame, x: str, y: str, label: str, band: bool = True, **style) -> None:
    part = part.sort_values(f"{x}_mean")
    xs, ys, err = part[f"{x}_mean"], part[f"{y}_mean"], part[f"{y}_std"].fillna(0.0)
    line, = ax.plot(xs, ys, marker="o", label=label, **style)
    if band:
        ax.fill_between(xs, ys - err, ys + err, alpha=0.2, color=line.get_color(), linewidth=0)
    else:
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=line.get_color(), capsize=3)


def _dense_line(ax, dense: pd.DataFrame) -> None:
    if dense.empty:
        return
    mean, std = float(dense["accuracy_pct_mean"].iloc[0]), dense["accuracy_pct_std"].iloc[0]
    std = 0.0 if std != std else float(std)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"dense {mean:.1f} ± {std:.1f}%")
    ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)


def _pruning_figure(frame: pd.DataFrame, x: str, xlabel: str, title: str, log: bool = True,
                    reverse: bool = False) -> Figure | None:
    table = pruning_points(frame)
    if table.empty or not (table["line"] != "dense").any():
        return None
    columns = facets(table)
    groups = _facet_groups(table, columns)
    fig, axes = _panels([k for k, _ in groups], title)
    for key, part in groups:
        ax = axes[key]
        for label, line in part[part["line"] != "dense"].groupby("line", sort=True):
            _errorbar(ax, line, x, "accuracy_pct", label, band=x == "remaining_pct")
        dense = part[part["line"] == "dense"]
        _dense_line(ax, dense)
        if x == "remaining_pct" and len(dense):
            ax.plot([100.0], [dense["accuracy_pct_mean"].iloc[0]], marker="*", markersize=12, color="black",
                    linestyle="none")
        if log:
            ax.set_xscale("log")
            # 1-2-5 ticks as plain numbers: "20" reads better than "2 x 10^1" on a % axis
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if reverse:
            ax.invert_xaxis()
        ax.set(xlabel=xlabel, ylabel=ACCURACY, title=_title(columns, key))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def lottery_curves(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Lottery-ticket curves: accuracy vs % of weights remaining (log, reversed), dense baseline marked."""
    return _pruning_figure(frame, "remaining_pct", "Weights remaining [%] (log scale)",
                           "Accuracy vs weights remaining (mean ± std over seeds)", reverse=True)


def accuracy_vs_speedup(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Accuracy vs theoretical speed-up (dense FLOPs / nonzero FLOPs)."""
    return _pruning_figure(frame, "theoretical_speedup", "Theoretical speed-up [× dense FLOPs] (log scale)",
                           "Accuracy vs theoretical speed-up")


def accuracy_vs_compression(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Accuracy vs compression ratio (all parameters / nonzero parameters)."""
    return _pruning_figure(frame, "compression_ratio", "Compression ratio [× dense parameters] (log scale)",
                           "Accuracy vs compression ratio")


def accuracy_vs_macs(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Accuracy vs the model's nonzero MACs per sample."""
    return _pruning_figure(frame, "macs_nonzero", "Nonzero MACs per sample [multiply-accumulates] (log scale)",
                           "Accuracy vs MACs")


def accuracy_vs_bits(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Accuracy vs weight bits (symmetric uniform ``wN``), per tensor vs per channel, float marked."""
    table = bits_points(frame)
    if table.empty:
        return None
    groups = _facet_groups(table, ["group"])
    fig, axes = _panels([k for k, _ in groups], "Weight quantization: accuracy vs bits (mean ± std over seeds)")
    for key, part in groups:
        ax = axes[key]
        for label, line in part[part["granularity"] != "float"].groupby("granularity", sort=True):
            _errorbar(ax, line.assign(bits_mean=line["bits"]), "bits", "accuracy_pct", label, band=False)
        _dense_line(ax, part[part["granularity"] == "float"])
        bits = sorted(part.loc[part["granularity"] != "float", "bits"].unique())
        ax.set_xticks(bits)
        ax.set(xlabel="Weight bits [bits per weight]", ylabel=ACCURACY, title=key[0])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def layer_sensitivity(frame: pd.DataFrame, curves: dict | None = None) -> Figure | None:
    """Per-layer sensitivity: accuracy vs pruning ratio of each layer alone, and vs the model's MACs."""
    table = layer_points(frame)
    if table.empty:
        return None
    columns = facets(table)
    groups = _facet_groups(table, columns)
    keys = [(*k, panel) for k, _ in groups for panel in ("ratio", "macs")]
    fig, axes = _panels(keys, "Per-layer sensitivity: each layer pruned in isolation (mean ± std over seeds)")
    for key, part in groups:
        for label, line in part.groupby("layer", sort=True):
            style = {"color": "black", "linestyle": "--"} if label == "all layers" else {}
            _errorbar(axes[(*key, "ratio")], line.assign(ratio_pct_mean=line["ratio_pct"]), "ratio_pct",
                      "accuracy_pct", str(label), band=False, **style)
            _errorbar(axes[(*key, "macs")], line, "macs_nonzero", "accuracy_pct", str(label), band=False, **style)
        title = _title(columns, key)
        axes[(*key, "ratio")].set(xlabel="Weights pruned in the layer [%]", ylabel=ACCURACY, title=title)
        axes[(*key, "macs")].set(xlabel="Model nonzero MACs per sample [MACs]",
                                 ylabel=ACCURACY, title=title)
        for panel in ("ratio", "macs"):
            axes[(*key, panel)].grid(True, alpha=0.3)
            axes[(*key, panel)].legend(fontsize="small", title="layer")
    return fig


def training_curves(frame: pd.DataFrame, curves: dict[str, pd.DataFrame] | None = None) -> Figure | None:
    """Per chosen trial: train loss, test accuracy and learning rate per epoch, levels marked."""
    curves = {k: c for k, c in (curves or {}).items() if c is not None and len(c)}
    if not curves:
        return None
    fig = _figure(5.2 * len(curves), 7.5)
    axes = fig.subplots(3, len(curves), squeeze=False, sharex="col")
    fig.suptitle("Training curves")
    for col, (name, curve) in enumerate(sorted(curves.items())):
        x = curve["step"] + 1
        panels = [("train_loss", "Train loss [cross-entropy]", 1), ("test_accuracy", ACCURACY, 100),
                  ("lr", "Learning rate [unitless]", 1)]
        for row, (column, label, scale) in enumerate(panels):
            ax = axes[row, col]
            for level, part in curve.groupby("level"):
                ax.plot(part["step"] + 1, part[column] * scale, marker=".", label=f"level {level}")
            for start in curve.groupby("level")["step"].min().iloc[1:] + 0.5:
                ax.axvline(start, color="grey", linestyle=":", linewidth=1)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[0, col].set_title(f"{name}\n(dotted: a pruning level starts)", fontsize="small")
        axes[1, col].legend(fontsize="small")
        axes[2, col].set_xlabel("Epoch (cumulative over levels) [epochs]")
        axes[2, col].set_xlim(0.5, float(x.max()) + 0.5)
    return fig


FIGURES: dict[str, Callable[..., Figure | None]] = {
    "lottery": lottery_curves,
    "speedup": accuracy_vs_speedup,
    "compression": accuracy_vs_compression,
    "macs": accuracy_vs_macs,
    "bits": accuracy_vs_bits,
    "layer_sensitivity": layer_sensitivity,
    "training_curves": training_curves,
}


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
