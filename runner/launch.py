"""Submit trials through submitit executors and wait for them: debug, local or slurm.

Caveats users hit:
- ``folder`` holds submitit's pickles and logs; on a cluster it must be on a filesystem that
  the compute nodes share with the submitting node.
- submitit's LocalExecutor starts every submitted job at once, so the local path keeps at
  most ``max_parallel`` jobs in flight itself.
- A job that dies without writing a result (killed, out of memory) cannot record its own
  failure; the launcher then marks its MLflow run FAILED with the executor's error.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from jobs.trial import TrialJob, run_trial
from jobs.tracking import TrackingTarget, retry
from runner.grid import Trial

DEFAULT_TIMEOUT_MIN = 24 * 60


def debug_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run trials one after another in this process (tests, pdb)."""
    return submitit.DebugExecutor(folder=folder)


def local_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run each trial as a local process."""
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=opts.get("timeout_min", DEFAULT_TIMEOUT_MIN))
    return ex


def slurm_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Submit trials as SLURM job arrays with at most ``max_parallel`` running at once."""
    slurm = dict(opts.get("slurm", {}))
    ex = submitit.SlurmExecutor(folder=folder)
    params: dict[str, Any] = {"time": opts.get("timeout_min", DEFAULT_TIMEOUT_MIN),
                              "array_parallelism": max_parallel}
    for key in ("partition", "account", "qos", "nodes", "cpus_per_task", "gpus_per_node", "constraint",
                "exclude", "setup", "additional_parameters"):
        if key in slurm:
            params[key] = slurm[key]
    if "mem_gb" in slurm:
        params["mem"] = f"{int(slurm['mem_gb'] * 1024)}M"
    ex.update_parameters(**params)
    return ex


EXECUTORS: dict[str, Callable[[Path, dict[str, Any], int], submitit.Executor]] = {
    "debug": debug_executor,
    "local": local_executor,
    "slurm": slurm_executor,
}


@dataclass
class Summary:
    """What happened to the trials of one ``sweep run``."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no trial failed."""
        return not self.failed


def threads_per_trial(executor: str, max_parallel: int) -> int | None:
    """Share this machine's cores between local trials; elsewhere let torch decide."""
    if executor != "local":
        return None
    return max(1, (os.cpu_count() or 1) // max_parallel)


def mark_lost(target: TrackingTarget, trial_id: str, error: str) -> None:
    """Mark a trial's unfinished runs FAILED when its process died without saying so."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    runs = retry(client.search_runs, [target.experiment_id],
                 filter_string=f"tags.trial_id = '{trial_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        retry(client.set_tag, run.info.run_id, "error", error[:5000])
        retry(client.set_terminated, run.info.run_id, "FAILED")


def _collect(job, trial: Trial, target: TrackingTarget, summary: Summary) -> None:
    try:
        outcome = job.result()
    except Exception as exc:  # the job process itself died
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        mark_lost(target, trial.id, message)
        summary.failed[trial.id] = message
        return
    if outcome["status"] == "FINISHED":
        summary.finished.append(trial.id)
    else:
        summary.failed[trial.id] = outcome["error"]


def launch(trials: list[Trial], target: TrackingTarget, executor: str, *, folder: Path,
           max_parallel: int, options: dict[str, Any], tags: dict[str, str] | None = None,
           progress: Callable[[Trial, str], None] = lambda trial, status: None) -> Summary:
    """Run ``trials`` on ``executor`` with at most ``max_parallel`` at once and wait for all."""
    summary = Summary()
    ex = EXECUTORS[executor](folder, options, max_parallel)
    threads = threads_per_trial(executor, max_parallel)
    payloads = [TrialJob(t.id, t.name, t.flat, target, {"executor": executor, **(tags or {})}, threads)
                for t in trials]

    def done(job, trial):
        _collect(job, trial, target, summary)
        progress(trial, "failed" if trial.id in summary.failed else "finished")

    if executor == "slurm":
        with ex.batch():
            jobs = [ex.submit(run_trial, p) for p in payloads]
        for job, trial in zip(jobs, trials):
            done(job, trial)
        return summary

    limit = 1 if executor == "debug" else max_parallel
    queue = list(zip(payloads, trials))
    running: list[tuple[Any, Trial]] = []
    while queue or running:
        while queue and len(running) < limit:
            payload, trial = queue.pop(0)
            running.append((ex.submit(run_trial, payload), trial))
        if executor == "debug":
            job, trial = running.pop()
            done(job, trial)
            continue
        still = []
        for job, trial in running:
            if job.done():
                done(job, trial)
            else:
                still.append((job, trial))
        if len(still) == len(running):
            time.sleep(0.2)
        running = still
    return summary
