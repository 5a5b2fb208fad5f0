"""Where each trial of a sweep stands, from the tracking store and the scheduler together."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.ledger import SUBMISSION, Ledger, TrialState
from runner import records, scheduler
from runner.grid import Trial
from runner.store import find_experiment_id, store_exists, trial_runs

STATES = ("not submitted", "queued", "running", "finished", "failed", "diverged", "interrupted", "cancelled")
ACTIVE = ("queued", "running")
RESUMES = "a re-run resumes it"


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
    holder: str = ""
    attempts: int = 0
    executor: str = ""


def _from_ledger(entry: TrialState, live: bool, job: dict | None, submitting: bool) -> tuple[str, str] | None:
    """The trial's state from its ledger entry (None: the ledger never saw it, as in older sweeps)."""
    job_state = (job or {}).get("state", "")
    if entry.state == "not submitted":
        return None
    if entry.state == "finished":
        return "finished", ""
    if live:
        return "running", ""
    if entry.state in ("running", "claimed", "interrupted", "queued") and job_state in scheduler.CANCELLED:
        return "cancelled", "its job was cancelled"
    if entry.state in ("running", "claimed", "interrupted"):
        who = f" ({entry.holder.describe()})" if entry.holder else ""
        return "interrupted", f"its process ended mid-trial{who}; {RESUMES}"
    if entry.state == "queued":
        if job_state in scheduler.ACTIVE:
            return ("queued" if job_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") else "running"), ""
        if submitting or (not job_state and entry.job_id and entry.extra.get("executor") == "slurm"):
            return "queued", ""  # its sweep run is still handing it out (or SLURM cannot tell yet)
        return "interrupted", f"its job ended before the trial started; {RESUMES}"
    return entry.state, entry.error


def _from_store(run, record, job: dict | None) -> tuple[str, str]:
    """Combine the run's status and the job's state into one state and an error line (no ledger entry)."""
    run_status = run.info.status if run is not None else None
    error = (run.data.tags.get("error") or "") if run is not None else ""
    job_state = (job or {}).get("state", "")
    if run_status == "FINISHED":
        return "finished", ""
    if job_state in scheduler.ACTIVE:
        return ("queued" if job_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") else "running"), ""
    if job_state in scheduler.CANCELLED:
        return "cancelled", error or "cancelled"
    if run_status == "FAILED" and run.data.tags.get("diverged") == "true":
        return "diverged", error
    if run_status == "FAILED" or job_state in scheduler.FAILED:
        return "failed", error or f"job ended {job_state}"
    if run_status == "RUNNING":
        if record is not None and record.executor == "slurm" and not job_state:
            return "running", ""  # scheduler state unknown: trust the store
        return "interrupted", f"the job ended without finishing the trial (see its log); {RESUMES}"
    if record is not None:
        if job_state == "COMPLETED":
            return "failed", "the job completed without a run in the store (see its log)"
        return ("running", "") if record.executor == "slurm" and not job_state else ("interrupted", RESUMES)
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
    book = Ledger.of(folder)
    submitter, live = book.holder(SUBMISSION)
    # Another `sweep run` still handing trials out (not this one, which reads before it submits).
    submitting = live and submitter is not None and (submitter.pid, submitter.host) != (os.getpid(), socket.gethostname())
    out = []
    for trial in trials:
        run, record = runs.get(trial.id), latest.get(trial.id)
        entry, (holder, live) = book.read(trial.id), book.holder(trial.id)
        job_id = (holder.job_id or str(holder.pid)) if live and holder else (entry.job_id or (record.job_id if record else ""))
        job = jobs.get(job_id) or (jobs.get(record.job_id) if record is not None else None)
        if run is not None and run.info.status == "FINISHED":
            state, error = "finished", ""
        else:
            state, error = _from_ledger(entry, live, job, submitting) or _from_store(run, record, job)
        out.append(TrialStatus(
            trial, state, job_id=job_id, elapsed=_elapsed(entry, live, job),
            last_level=run.data.tags.get("last_level", "") if run is not None else "",
            error=error.strip().splitlines()[0] if error.strip() else "",
            log=record.stdout if record and state in ("failed", "cancelled", "interrupted") else "",
            run_id=run.info.run_id if run is not None else "",
            holder=holder.describe() if live and holder else "", attempts=entry.attempts,
            executor=entry.extra.get("executor") or (record.executor if record else "")))
    return out, note


def _elapsed(entry: TrialState, live: bool, job: dict | None) -> str:
    """How long the trial has been running (from its lease), else what the scheduler says."""
    if live and entry.holder is not None and entry.holder.since:
        seconds = int(time.time() - entry.holder.since)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return (job or {}).get("elapsed", "")
