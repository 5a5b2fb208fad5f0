"""A sweep report: every figure (PNG), every table (CSV + Markdown) and an index.html showing them together.

The page links its images relatively, so the folder can be copied off a login node and
opened anywhere; it records the sweep files' text and the code version that made it.
"""
from __future__ import annotations

import datetime
import html
import subprocess
from pathlib import Path
from typing import Mapping

import pandas as pd

from analysis.summary import FAILED, FINISHED

ROOT = Path(__file__).resolve().parents[1]
CURVES_ARTIFACT = "curves.csv"


def code_version() -> str:
    """``git describe --always --dirty`` of the code, else the installed package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass  # no git on the machine, or not a checkout: fall back to the package
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lottery-sweeps {version('lottery-sweeps')}"
    except PackageNotFoundError:
        return "unknown"


def trial_curves(uri: str, run_id: str) -> pd.DataFrame | None:
    """A run's per-epoch ``curves.csv`` artifact, or None if it has none."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from jobs.tracking import retry

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = retry(MlflowClient(uri).download_artifacts, run_id, CURVES_ARTIFACT, tmp)
        except Exception:  # a run that failed before its first epoch ended
            return None
        return pd.read_csv(path)


def choose_trials(frame: pd.DataFrame, n: int = 1) -> list[str]:
    """Trial ids worth showing curves for: finished, most pruning levels, then best final accuracy."""
    done = frame[(frame["status"] == FINISHED) & frame["level"].notna()]
    if done.empty:
        return []
    per_trial = done.groupby("trial_id").agg(levels=("level", "max"), accuracy=("accuracy", "last"))
    return list(per_trial.sort_values(["levels", "accuracy"], ascending=False).index[:n])


def curves_for(frame: pd.DataFrame, uris: Mapping[str, str], trial_ids: list[str]) -> dict[str, pd.DataFrame]:
    """Download the curves of the given trials; ``uris`` maps a sweep name to its store."""
    out = {}
    for tid in trial_ids:
        row = frame[frame["trial_id"] == tid].iloc[0]
        curve = trial_curves(uris[row["sweep"]], row["run_id"])
        if curve is not None:
            out[f"{tid}: {row['run_name']}"] = curve
    return out


def _table_html(table: pd.DataFrame) -> str:
    from analysis.tables import display

    return display(table).to_html(index=False, escape=True, border=0, classes="data", na_rep="NA")


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd}table.data{border-collapse:collapse;font-size:90%;margin:.5em 0}
table.data td,table.data th{border:1px solid #ccc;padding:2px 6px;text-align:left}
pre{background:#f6f6f6;padding:1em;overflow:auto}.failed{color:#a00}.note{color:#666}"""


def write_report(frame: pd.DataFrame, out: str | Path, sweep_files: Mapping[str, str] | None = None,
                 curves: Mapping[str, pd.DataFrame] | None = None, stores: list[str] | None = None,
                 title: str | None = None, planned: pd.DataFrame | None = None, prefer: list[str] = ()) -> Path:
    """Write the figures, tables, the runs table and index.html into ``out``; return the index path.

    ``planned`` and ``prefer`` go to the summary (``analysis.summary.summarize``).
    """
    from analysis.figures import FIGURES, save
    from analysis.tables import TABLES, to_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = sorted(frame["sweep"].dropna().unique()) if len(frame) else []
    title = title or f"Sweep report: {', '.join(sweeps) or 'no runs'}"
    body = [f"<h1>{html.escape(title)}</h1>", _header(frame, stores or [])]

    body.append("<h2>Figures</h2>")
    skipped = []
    for name, make in FIGURES.items():
        fig = make(frame, dict(curves or {}))
        caption = html.escape((make.__doc__ or name).strip().splitlines()[0])
        if fig is None:
            skipped.append(f"{name} ({caption})")
            continue
        save(fig, out / f"{name}.png")
        body.append(f'<h3 id="figure-{name}">{name}</h3><p class="note">{caption}</p>'
                    f'<img src="{name}.png" alt="{name}">')
    if skipped:
        body.append("<p class='note'>Nothing to show in these sweeps for: " + html.escape("; ".join(skipped))
                    + "</p>")

    body.append("<h2>Tables</h2>")
    for kind, make in TABLES.items():
        made = make(frame, planned=planned, prefer=prefer) if kind == "summary" else make(frame)
        for name, table in made.items():
            table.to_csv(out / f"{name}.csv", index=False)
            (out / f"{name}.md").write_text(to_markdown(table))
            body.append(f'<h3 id="table-{name}">{name}</h3><p><a href="{name}.csv">CSV</a> · '
                        f'<a href="{name}.md">Markdown</a></p>{_table_html(table)}')
    frame.to_csv(out / "runs.csv", index=False)
    body.append('<p>Every row (trial × level × stage): <a href="runs.csv">runs.csv</a></p>')

    if sweep_files:
        body.append("<h2>Sweep files</h2>")
        for name, text in sweep_files.items():
            body.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(text)}</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _header(frame: pd.DataFrame, stores: list[str]) -> str:
    trials = frame.drop_duplicates("trial_id") if len(frame) else frame
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [f"<p>Code version: <code>{html.escape(code_version())}</code> · generated {now}</p>",
             f"<p>Stores: {', '.join(f'<code>{html.escape(s)}</code>' for s in stores) or 'n/a'}</p>",
             "<p>Trials: " + ", ".join(f"{n} {html.escape(str(s)).lower()}" for s, n in sorted(counts.items()))
             + "</p>"]
    failed = trials[trials["status"] == FAILED] if len(trials) else trials
    if len(failed):
        rows = "".join(f"<li><code>{html.escape(t)}</code> {html.escape(str(n))}: {html.escape(str(e))}</li>"
                       for t, n, e in zip(failed["trial_id"], failed["run_name"], failed["error"]))
        parts.append(f"<p class='failed'>Failed trials (left out of every mean):</p><ul class='failed'>{rows}</ul>")
    return "".join(parts)
