"""MLflow runs → one tidy frame: a row per trial × level × stage, settings and metrics as columns.

The rows come from each run's ``results.csv`` artifact, never from metric histories, so a
sweep of thousands of runs costs one search plus one small download per trial.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.config import SETTINGS
from jobs.tracking import RESULTS_ARTIFACT, retry
from runner.store import find_experiment_id, trial_runs

ID_COLUMNS = ["sweep", "trial_id", "run_id", "run_name", "status", "error", "level", "stage"]


def _typed(key: str, text: str) -> Any:
    """Turn a logged param string back into its setting's type."""
    info = SETTINGS.get(key)
    if info is None or info.type is str:
        return text
    if info.type is bool:
        return text == "True"
    try:
        return info.type(text)
    except ValueError:  # canonical placeholders such as prune.method "none" on int settings
        return text


def _results(client, run_id: str) -> pd.DataFrame | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = retry(client.download_artifacts, run_id, RESULTS_ARTIFACT, tmp)
        except Exception:  # a run that died before writing its table
            return None
        return pd.read_csv(path)


def runs_frame(uri: str, experiment: str) -> pd.DataFrame:
    """Tidy rows of one experiment (sweep) in the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    exp_id = find_experiment_id(uri, experiment)
    if exp_id is None:
        raise LookupError(f"no experiment named '{experiment}' in {uri}")
    client = MlflowClient(uri)
    frames = []
    for tid, run in sorted(trial_runs(uri, exp_id).items()):
        table = _results(client, run.info.run_id)
        if table is None or table.empty:
            table = pd.DataFrame([{"level": None, "stage": None}])
        settings = {k: _typed(k, v) for k, v in sorted(run.data.params.items())}
        ident = {"sweep": experiment, "trial_id": tid, "run_id": run.info.run_id,
                 "run_name": run.data.tags.get("mlflow.runName", ""), "status": run.info.status,
                 "error": run.data.tags.get("error")}
        table = table.assign(**ident, **settings)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=ID_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    first = [c for c in ID_COLUMNS if c in frame] + [c for c in SETTINGS if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def export(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a frame as CSV or Parquet, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path
