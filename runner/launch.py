"""Submit trials through submitit executors: debug, local or slurm.

Caveats users hit:
- ``folder`` holds submitit's pickles and logs, the job records and the trials'
  checkpoints; on a cluster it must be on a filesystem that compute nodes share with the
  submitting node.
- submitit's LocalExecutor starts every submitted job at once, so the local path keeps at
  most ``max_parallel`` jobs in flight itself.
- On SLURM every trial is one task of a job array (arrays are chunked under the cluster's
  MaxArraySize). Trials are submitit Checkpointables: on preemption or at the time limit
  (SIGUSR2 ``signal_delay_s`` before it) the task is requeued and resumes from its last
  checkpoint, at most ``max_requeues`` times for time limits.
- A job that dies without writing a result (killed, out of memory) cannot record its own
  failure; a waiting launcher then marks its MLflow run FAILED with the executor's error.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from jobs.task import TrackingTarget
from jobs.tracking import retry
from jobs.task import TrialJob, TrialTask
from runner import records, scheduler
from runner.grid import Trial

DEFAULT_TIMEOUT_MIN = 24 * 60
DEFAULT_MAX_REQUEUES = 10
SLURM_PASSTHROUGH = ("partition", "account", "qos", "nodes", "cpus_per_task", "gpus_per_node", "constraint",
                     "exclude", "setup", "additional_parameters")


def debug_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run trials one after another in this process (tests, pdb)."""
    return submitit.DebugExecutor(folder=folder)


def local_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Run each trial as a local process."""
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.get("max_requeues", DEFAULT_MAX_REQUEUES))
    ex.update_parameters(timeout_min=opts.get("timeout_min", DEFAULT_TIMEOUT_MIN))
    return ex


def slurm_executor(folder: Path, opts: dict[str, Any], max_parallel: int) -> submitit.Executor:
    """Submit trials as SLURM job arrays with at most ``max_parallel`` running at once."""
    slurm = dict(opts.get("slurm", {}))
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.get("max_requeues", DEFAULT_MAX_REQUEUES))
    params: dict[str, Any] = {"time": opts.get("timeout_min", DEFAULT_TIMEOUT_MIN),
                              "array_parallelism": max_parallel, "job_name": opts.get("job_name", "sweep")}
    params.update({k: slurm[k] for k in SLURM_PASSTHROUGH if k in slurm})
    if "mem_gb" in slurm:
        params["mem"] = f"{int(slurm['mem_gb'] * 1024)}M"
    if "signal_delay_s" in slurm:
        params["signal_delay_s"] = slurm["signal_delay_s"]
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
    """Share this machine's cores between local trials; SLURM gives each its cpus_per_task."""
    if executor == "local":
        return max(1, (os.cpu_count() or 1) // max_parallel)
    return None  # in process: torch's default; on SLURM: the job's SLURM_CPUS_PER_TASK


def payloads(trials: list[Trial], target: TrackingTarget, executor: str, folder: Path,
             max_parallel: int, tags: dict[str, str] | None = None) -> list[TrialJob]:
    """The picklable job of each trial, with its checkpoint directory under ``folder``."""
    threads = threads_per_trial(executor, max_parallel)
    return [TrialJob(t.id, t.name, t.flat, target, {"executor": executor, **(tags or {})}, threads,
                     str((folder / "checkpoints" / t.id).resolve())) for t in trials]


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
        text = str(exc).strip()
        message = text.splitlines()[-1] if text else type(exc).__name__
        mark_lost(target, trial.id, message)
        summary.failed[trial.id] = message
        return
    if outcome["status"] == "FINISHED":
        summary.finished.append(trial.id)
    else:
        summary.failed[trial.id] = outcome["error"]


def submit_slurm(ex: submitit.Executor, jobs: list[TrialJob], trials: list[Trial], folder: Path) -> list:
    """Submit as job arrays of at most MaxArraySize tasks; record which job runs which trial."""
    chunk = scheduler.max_array_size()
    submitted = []
    for start in range(0, len(jobs), chunk):
        with ex.batch():
            part = [ex.submit(TrialTask(), job) for job in jobs[start:start + chunk]]
        submitted += part
        records.append(folder, [records.record_for(j, t.id, t.name, "slurm")
                                for j, t in zip(part, trials[start:start + chunk])])
    return submitted


def wait(submitted: list, trials: list[Trial], target: TrackingTarget,
         progress: Callable[[Trial, str], None] = lambda trial, status: None) -> Summary:
    """Follow submitted jobs until all ended; returns what happened."""
    summary = Summary()
    pending = list(zip(submitted, trials))
    while pending:
        still = []
        for job, trial in pending:
            if job.done():
                _collect(job, trial, target, summary)
                progress(trial, "failed" if trial.id in summary.failed else "finished")
            else:
                still.append((job, trial))
        if len(still) == len(pending):
            time.sleep(1.0)
        pending = still
    return summary


def run_local(ex: submitit.Executor, executor: str, jobs: list[TrialJob], trials: list[Trial],
              target: TrackingTarget, folder: Path, max_parallel: int,
              progress: Callable[[Trial, str], None] = lambda trial, status: None) -> Summary:
    """Run in this process (debug) or as local processes, at most ``max_parallel`` at once."""
    summary = Summary()
    limit = 1 if executor == "debug" else max_parallel
    queue = list(zip(jobs, trials))
    running: list[tuple[Any, Trial]] = []

    def done(job, trial):
        _collect(job, trial, target, summary)
        progress(trial, "failed" if trial.id in summary.failed else "finished")

    try:
        while queue or running:
            while queue and len(running) < limit:
                payload, trial = queue.pop(0)
                job = ex.submit(TrialTask(), payload)
                records.append(folder, [records.record_for(job, trial.id, trial.name, executor)])
                running.append((job, trial))
            still = []
            for job, trial in running:
                if executor == "debug" or job.done():
                    done(job, trial)
                else:
                    still.append((job, trial))
            if still and len(still) == len(running):
                time.sleep(0.2)
            running = still
    except KeyboardInterrupt:
        # Stop the local processes too; their checkpoints let a re-run resume them.
        for job, _ in running:
            job.cancel(check=False)
        raise
    return summary
