"""The tracking store seen from the submitting side: which URI, the experiment, finished trials."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jobs.task import TrackingTarget
from jobs.retrying import retry

DEFAULT_DB = "mlflow.db"


def resolve_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """Pick the store: --tracking-uri, then MLFLOW_TRACKING_URI, then the sweep file, then ./mlflow.db.

    Relative SQLite paths become absolute so that jobs started elsewhere find the same file.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def prepare(uri: str, sweep: str) -> TrackingTarget:
    """Create (or migrate) the store and the sweep's experiment (``jobs.tracking.prepare_store``)."""
    from jobs.tracking import prepare_store

    return prepare_store(uri, sweep)


def find_experiment_id(uri: str, sweep: str) -> str | None:
    """The id of the sweep's experiment, or None if it was never run."""
    exp = retry(_client(uri).get_experiment_by_name, sweep)
    return None if exp is None else exp.experiment_id


def trial_runs(uri: str, experiment_id: str) -> dict[str, Any]:
    """Per trial id, its most relevant MLflow run: a FINISHED one if any, else the latest."""
    client = _client(uri)
    best: dict[str, Any] = {}
    token = None
    while True:
        page = retry(client.search_runs, [experiment_id], max_results=5000, page_token=token,
                     order_by=["attributes.start_time ASC"])
        for run in page:
            tid = run.data.tags.get("trial_id")
            if tid and (tid not in best or best[tid].info.status != "FINISHED"):
                best[tid] = run
        token = page.token
        if not token:
            return best


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file does not exist yet (asking would create it)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists()


def finished_trials(uri: str, sweep: str) -> set[str]:
    """Trial ids of the sweep that already finished in the store (without creating anything)."""
    if not store_exists(uri):
        return set()
    exp_id = find_experiment_id(uri, sweep)
    if exp_id is None:
        return set()
    return {tid for tid, run in trial_runs(uri, exp_id).items() if run.info.status == "FINISHED"}
