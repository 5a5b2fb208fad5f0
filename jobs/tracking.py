"""MLflow writes of one trial: one run, params once, metrics in batches, tables as artifacts.

Many trials write to one store at once; every write goes through ``jobs.retrying.retry``.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from jobs.naming import folder_name
from jobs.retrying import RESULTS_ARTIFACT, retry  # noqa: F401  (re-exported)
from jobs.storeguard import check_uri, check_writable, store_errors, store_lock
from jobs.task import TrackingTarget

CONFIG_ARTIFACT = "config.json"
TRACEBACK_ARTIFACT = "traceback.txt"


def _artifact_location(uri: str, name: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database, not in whatever directory we run from."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where artifacts go
    # The sweep folder's naming: two names never share artifacts, and '..' stays inside mlruns.
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns" / folder_name(name)).as_uri()


def prepare_store(uri: str, sweep: str) -> TrackingTarget:
    """Create (or migrate) the store and the sweep's experiment, before any trial logs; StoreError if it cannot.

    Processes creating a new SQLite store at once corrupt it for good, so creation runs under
    an exclusive lock on ``<db>.lock`` beside it: any number of processes may call this at
    once (``sweep run``s sharing a store, local workers), one after another creating or finding.
    """
    check_uri(uri)
    with store_errors(uri), store_lock(uri):
        check_writable(uri)
        client = MlflowClient(uri)
        retry(client.search_experiments, max_results=1)  # creates and migrates a new store
        exp_id = _experiment_id(client, uri, sweep)
    return TrackingTarget(uri=uri, experiment_id=exp_id, sweep=sweep)


def _experiment_id(client: MlflowClient, uri: str, sweep: str) -> str:
    """The sweep's experiment, created (or restored from deleted) if need be."""
    exp = retry(client.get_experiment_by_name, sweep)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(client.restore_experiment, exp.experiment_id)
        return exp.experiment_id
    try:
        return retry(client.create_experiment, sweep, artifact_location=_artifact_location(uri, sweep))
    except Exception:
        # A server store has no lock of ours: another submitter may have created it in between
        # ("already exists"); then both use that one.
        exp = retry(client.get_experiment_by_name, sweep)
        if exp is None:
            raise
        return exp.experiment_id


def close_abandoned_runs(client: MlflowClient, experiment_id: str, trial_id: str, keep: str) -> int:
    """Mark FAILED the trial's RUNNING runs other than ``keep``; how many there were.

    Only for a process holding the trial's ledger lease: then no other process runs the trial,
    so such a run was left by one that died (kill -9, a full disk that refused its last write).
    """
    stale = retry(client.search_runs, [experiment_id],
                  filter_string=f"tags.trial_id = '{trial_id}' and attributes.status = 'RUNNING'")
    for found in stale:
        if found.info.run_id != keep:
            retry(client.set_tag, found.info.run_id, "error", "abandoned: its process ended without an outcome; "
                                                                "a later attempt ran the trial")
            retry(client.set_terminated, found.info.run_id, "FAILED")
    return sum(found.info.run_id != keep for found in stale)


def _number(value: Any) -> bool:
    """A value to log as a metric: NaN and inf too (a diverged epoch's loss must show, not vanish)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TrialRun:
    """The MLflow run of one trial."""

    def __init__(self, target: TrackingTarget, trial_id: str, name: str, settings: dict[str, Any],
                 tags: dict[str, str], resume_run_id: str | None = None):
        self.client = MlflowClient(target.uri)
        all_tags = {"sweep": target.sweep, "trial_id": trial_id, "mlflow.runName": name, **tags}
        self.logged: set[tuple[str, int]] = set()
        if resume_run_id is not None:
            # A requeued or re-run trial continues its run; steps it already logged are not
            # logged again (it may have died between logging a level and checkpointing it).
            self.run_id = resume_run_id
            retry(self.client.update_run, self.run_id, status="RUNNING")
            # Every key the run has, so no (key, step) is written twice (the timings included).
            for key in retry(self.client.get_run, self.run_id).data.metrics:
                self.logged |= {(key, m.step) for m in retry(self.client.get_metric_history, self.run_id, key)}
            retry(self.client.log_batch, self.run_id,
                  tags=[RunTag(k, str(v)) for k, v in tags.items()] + [RunTag("resumed", "true")])
            return
        run = retry(self.client.create_run, target.experiment_id, run_name=name,
                    tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in settings.items()]
        for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
            retry(self.client.log_batch, self.run_id, params=params[i:i + 100])

    def log_row(self, row: dict[str, Any], prefix: str = "") -> None:
        """Log one results row's numeric values as metrics at ``step = level``, once."""
        step = int(row["level"])
        if (prefix + "accuracy", step) in self.logged:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(prefix + k, float(v), now, step)
                   for k, v in row.items() if k != "level" and _number(v)]
        tags = [RunTag("last_level", str(step))] if not prefix else []
        retry(self.client.log_batch, self.run_id, metrics=metrics, tags=tags)
        self.logged.add((prefix + "accuracy", step))

    def log_rows(self, rows: list[dict[str, Any]],
                 prefix_for: Callable[[dict[str, Any]], str] = lambda row: "" if row["stage"] == "float" else "quant.",
                 ) -> None:
        """Log several results rows like ``log_row`` each, packed into as few ``log_batch`` calls as MLflow allows."""
        # MLflow refuses a batch of more than 1000 entities (metrics + tags); one is kept for last_level.
        limit = 999
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        markers: list[tuple[str, int]] = []
        last: int | None = None

        def flush() -> None:
            nonlocal batch, markers, last
            tags = [RunTag("last_level", str(last))] if last is not None else []
            if batch or tags:
                retry(self.client.log_batch, self.run_id, metrics=batch, tags=tags)
            # Marked only once written, so a batch that failed for good is not skipped on a retry.
            self.logged.update(markers)
            batch, markers, last = [], [], None

        for row in rows:
            prefix, step = prefix_for(row), int(row["level"])
            marker = (prefix + "accuracy", step)
            if marker in self.logged or marker in markers:
                continue
            metrics = [Metric(prefix + k, float(v), now, step)
                       for k, v in row.items() if k != "level" and _number(v)]
            if len(batch) + len(metrics) > limit:
                flush()
            while len(metrics) > limit:  # a single row of over 999 values has to be split
                batch, metrics = metrics[:limit], metrics[limit:]
                flush()
            batch += metrics
            markers.append(marker)
            if not prefix:
                last = step
        flush()

    def log_curve(self, points: list[dict[str, Any]]) -> None:
        """Log one level's per-epoch curve (``epoch.*`` metrics, step = epoch count) in one batch."""
        now = int(time.time() * 1000)
        metrics = [Metric(f"epoch.{k}", float(v), now, int(p["step"])) for p in points
                   for k, v in p.items() if k not in ("step", "level", "epoch") and _number(v)
                   and (f"epoch.{k}", int(p["step"])) not in self.logged]
        if metrics:
            retry(self.client.log_batch, self.run_id, metrics=metrics)
            self.logged |= {(m.key, m.step) for m in metrics}

    def _artifacts(self, rows: list[dict], config: dict, tables: dict[str, Any], texts: dict[str, str]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, table in {RESULTS_ARTIFACT: rows, **tables}.items():
                frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
                if len(frame):  # a trial that failed before its first level has no table
                    frame.to_csv(Path(tmp) / name, index=False)
            (Path(tmp) / CONFIG_ARTIFACT).write_text(json.dumps(config, indent=2, sort_keys=True))
            for name, text in texts.items():
                (Path(tmp) / name).write_text(text)
            retry(self.client.log_artifacts, self.run_id, tmp)

    def finish(self, rows: list[dict], config: dict, tables: dict[str, Any] | None = None) -> None:
        """Store the results table, other tables and the config, then mark the run FINISHED."""
        self._artifacts(rows, config, tables or {}, {})
        if "error" in retry(self.client.get_run, self.run_id).data.tags:  # a resumed run: its old error no longer holds
            retry(self.client.delete_tag, self.run_id, "error")
        retry(self.client.set_terminated, self.run_id, "FINISHED")

    def fail(self, rows: list[dict], config: dict, traceback_text: str, error: str | None = None,
             tags: dict[str, str] | None = None) -> None:
        """Store what finished and the traceback; mark the run FAILED, tagged ``error`` (or the last line), ``tags``."""
        if error is None:
            error = traceback_text.strip().splitlines()[-1] if traceback_text.strip() else "unknown error"
        retry(self.client.log_batch, self.run_id,
              tags=[RunTag("error", error[:5000])] + [RunTag(k, str(v)) for k, v in (tags or {}).items()])
        self._artifacts(rows, config, {}, {TRACEBACK_ARTIFACT: traceback_text})
        retry(self.client.set_terminated, self.run_id, "FAILED")
