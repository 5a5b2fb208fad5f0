"""The tracking store seen from the submitting side: which URI, the experiment, finished trials.

Every read here raises ``StoreError`` (one line: the store, the cause, what to do) for a store
that cannot be used; the CLI prints it and exits 3 (``runner.errors.spec_errors``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from jobs.retrying import retry
from jobs.storeguard import StoreError  # noqa: F401  (re-exported: what every read here raises)
from jobs.storeguard import check_uri, has_schema, no_store, sqlite_path, store_errors, store_lock
from jobs.task import TrackingTarget

DEFAULT_DB = "mlflow.db"
_opened: set[str] = set()


def resolve_uri(cli_uri: str | None = None, spec_uri: str | None = None) -> str:
    """Pick the store: --tracking-uri, then MLFLOW_TRACKING_URI, then the sweep file, then ./mlflow.db.

    Relative SQLite paths become absolute so that jobs started elsewhere find the same file.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[Any]:
    """An MlflowClient on an existing store, errors in the block raised as StoreError; None for an empty store.

    A SQLite store is first opened under the creation lock, once per process: a store
    another process is creating is read once complete, and never created here (a file without
    MLflow's tables, whose creation never finished, reads as empty).
    """
    check_uri(uri)
    with store_errors(uri):
        first = uri not in _opened and sqlite_path(uri) is not None
        with store_lock(uri, required=False) if first else contextlib.nullcontext():
            # Checked before importing MLflow: a file that is no store fails in a second, not four.
            if first and not has_schema(uri):
                client = None
            else:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                if first:
                    retry(client.search_experiments, max_results=1)  # MLflow opens (and keeps) the store here
                    _opened.add(uri)
        yield client


def require_store(uri: str) -> None:
    """Raise StoreError when a SQLite store does not exist (reading it must not create it)."""
    if not store_exists(uri):
        raise no_store(uri)


def prepare(uri: str, sweep: str) -> TrackingTarget:
    """Create (or migrate) the store and the sweep's experiment (``jobs.tracking.prepare_store``)."""
    from jobs.tracking import prepare_store

    return prepare_store(uri, sweep)


def find_experiment_id(uri: str, sweep: str) -> str | None:
    """The id of the sweep's experiment, or None if it was never run (without creating anything)."""
    if not store_exists(uri):
        return None
    with _reading(uri) as client:
        exp = None if client is None else retry(client.get_experiment_by_name, sweep)
    return None if exp is None else exp.experiment_id


def trial_runs(uri: str, experiment_id: str) -> dict[str, Any]:
    """Per trial id, its most relevant MLflow run: a FINISHED one if any, else the latest."""
    best: dict[str, Any] = {}
    token = None
    with _reading(uri) as client:
        while client is not None:
            page = retry(client.search_runs, [experiment_id], max_results=5000, page_token=token,
                         order_by=["attributes.start_time ASC"])
            for run in page:
                tid = run.data.tags.get("trial_id")
                if tid and (tid not in best or best[tid].info.status != "FINISHED"):
                    best[tid] = run
            token = page.token
            if not token:
                break
    return best


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file does not exist yet (asking would create it)."""
    path = sqlite_path(uri)
    return path is None or path.exists()


def finished_trials(uri: str, sweep: str) -> set[str]:
    """Trial ids of the sweep that already finished in the store (without creating anything)."""
    exp_id = find_experiment_id(uri, sweep)
    if exp_id is None:
        return set()
    return {tid for tid, run in trial_runs(uri, exp_id).items() if run.info.status == "FINISHED"}
