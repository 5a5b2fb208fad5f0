"""Where each trial of a sweep stands, from the tracking store and the scheduler together."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runner import records, scheduler
from runner.grid import Trial
from runner.store import find_experiment_id, store_exists, trial_runs

STATES = ("not submitted", "pending", "running", "finished", "failed", "cancelled")
ACTIVE = ("pending", "running")


@dataclass
class TrialStatus:
    """One trial's state and where to look next."""

    trial: Trial
    state: str
    job_id: str = ""
    elapsed: str = ""
    last_level: str = ""
    error: str = ""
    log: str = ""
    run_id: str = ""


def _pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def _state(run, record, job: dict | None) -> tuple[str, str]:
    """Combine the run's status and the job's state into one state and an error line."""
    run_status = run.info.status if run is not None else None
    error = (run.data.tags.get("error") or "") if run is not None else ""
    job_state = (job or {}).get("state", "")
    if run_status == "FINISHED":
        return "finished", ""
    if job_state in scheduler.ACTIVE:
        return ("pending" if job_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") else "running"), ""
    if record is not None and record.executor == "local" and _pid_alive(record.job_id):
        return "running", ""
    if job_state in scheduler.CANCELLED:
        return "cancelled", error or "cancelled"
    if run_status == "FAILED" or job_state in scheduler.FAILED:
        return "failed", error or f"job ended {job_state}"
    if run_status == "RUNNING":
        if record is not None and record.executor == "slurm" and not job_state:
            return "running", ""  # scheduler state unknown: trust the store
        return "failed", "the job ended without finishing the trial (see its log)"
    if record is not None:
        if job_state == "COMPLETED":
            return "failed", "the job completed without a run in the store (see its log)"
        return ("running", "") if record.executor == "slurm" and not job_state else ("failed", "no run recorded")
    return "not submitted", ""


def trial_statuses(trials: list[Trial], sweep: str, uri: str, folder: Path) -> tuple[list[TrialStatus], str | None]:
    """The state of every trial, plus a note on what the scheduler could not tell."""
    runs = {}
    if store_exists(uri):
        exp_id = find_experiment_id(uri, sweep)
        runs = trial_runs(uri, exp_id) if exp_id else {}
    latest = records.latest(folder)
    slurm = [r for r in latest.values() if r.executor == "slurm"]
    jobs, note = (scheduler.job_states([r.job_id for r in slurm], min(r.submitted_at for r in slurm))
                  if slurm else ({}, None))
    out = []
    for trial in trials:
        run, record = runs.get(trial.id), latest.get(trial.id)
        job = jobs.get(record.job_id) if record is not None else None
        state, error = _state(run, record, job)
        out.append(TrialStatus(
            trial, state, job_id=record.job_id if record else "", elapsed=(job or {}).get("elapsed", ""),
            last_level=run.data.tags.get("last_level", "") if run is not None else "",
            error=error.strip().splitlines()[0] if error.strip() else "",
            log=record.stdout if record and state in ("failed", "cancelled") else "",
            run_id=run.info.run_id if run is not None else ""))
    return out, note
