"""Sweeps' runs as tidy data, grouped over seeds, and the figures and tables that compare them.

    from analysis import runs_frame, summarize, write_report
    frame = runs_frame("sqlite:///mlflow.db", "quickstart")     # a row per trial x level x stage
    summarize(frame, by=["prune.method", "prune.ratio"])       # mean, std, count, 95% CI, seed flags
    write_report(frame, "report/")                             # figures, tables, index.html

``runs_frame`` / ``export`` (analysis.export), ``summarize`` / ``aggregate`` / ``describe`` /
``select`` (analysis.summary), ``TABLES`` / ``to_markdown`` (analysis.tables), ``FIGURES``
(analysis.figures) and ``write_report`` / ``trial_curves`` (analysis.report) are loaded on
first use, so ``import analysis`` pulls in neither matplotlib nor mlflow.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "runs_frame": "analysis.export", "export": "analysis.export",
    "summarize": "analysis.summary", "aggregate": "analysis.summary", "describe": "analysis.summary",
    "select": "analysis.summary", "UnknownName": "analysis.summary",
    "TABLES": "analysis.tables", "to_markdown": "analysis.tables",
    "FIGURES": "analysis.figures",
    "write_report": "analysis.report", "trial_curves": "analysis.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
