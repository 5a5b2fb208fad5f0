"""Run trials on this machine: packs as local processes (or in this process), or local workers.

Workers mode (``launch.uses_workers``): ``max_parallel`` local jobs get the same pack and share
its trajectory groups out as they free up (``jobs.packs``); the first creates the store. This
process follows them through the outcome markers the trials leave, and returns as soon as
every trial has one. Caveat: submitit's LocalExecutor starts every submitted job at once, so
``run_local`` keeps at most ``max_parallel`` packs in flight itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import submitit

from jobs.atomicio import read_json, write_text
from jobs.ledger import TERMINAL, Ledger
from jobs.task import PackJob, TrackingTarget, TrialJob, TrialTask
from runner import records
from runner.grid import Trial
from runner.launch import Summary, collect, job_error, job_records, mark_lost
from runner.plan import Pack


def run_local(ex: submitit.Executor, executor: str, packed: list[tuple[PackJob, Pack]],
              target: TrackingTarget, folder: Path, max_parallel: int,
              progress: Callable[[Trial, str], None] = lambda trial, status: None) -> Summary:
    """Run packs in this process (debug) or as local processes, at most ``max_parallel`` at once."""
    summary = Summary()
    limit = 1 if executor == "debug" else max_parallel
    queue = list(packed)
    running: list[tuple[Any, Pack]] = []
    try:
        while queue or running:
            while queue and len(running) < limit:
                payload, pack = queue.pop(0)
                job = ex.submit(TrialTask(), payload)
                records.append(folder, job_records(job, pack, executor))
                running.append((job, pack))
            still = []
            for job, pack in running:
                if executor == "debug" or job.done():
                    collect(job, pack, target, summary, progress)
                else:
                    still.append((job, pack))
            if still and len(still) == len(running):
                time.sleep(0.2)
            running = still
    except KeyboardInterrupt:
        # Stop the local processes too; their checkpoints let a re-run resume them.
        for job, _ in running:
            job.cancel(check=False)
        raise
    return summary


@contextlib.contextmanager
def controller_output(folder: Path) -> Iterator[None]:
    """Local jobs inherit our stdout and stderr: hand them a log file in ``folder`` instead.

    Otherwise a pipe reading ``sweep run`` (``| tee``, a CI log, a benchmark) stays open until
    the last worker has torn its interpreter down, after every trial was already reported.
    Our own output goes there too meanwhile, so nothing may draw on the terminal then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    folder.mkdir(parents=True, exist_ok=True)
    log = os.open(folder / "local-controllers.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


def _outcome(job: TrialJob, token: str) -> dict | None:
    try:
        done = read_json(job.outcome_file, ("token", "outcome"))  # None: not there yet, or corrupt
    except OSError:  # unreadable right now (NFS while it is replaced): the next poll reads it
        return None
    return done["outcome"] if done is not None and done["token"] == token else None


def _ledger_outcome(book: Ledger | None, trial_id: str, since: float) -> dict | None:
    """A trial's outcome from the ledger, once it ended after ``since`` (perhaps run by another process)."""
    if book is None:
        return None
    state = book.read(trial_id)
    if state.state not in TERMINAL or state.updated_at < since:
        return None
    return {"status": "FINISHED" if state.state == "finished" else "FAILED", "error": state.error}


def _stop_workers(payload: PackJob, book: Ledger | None) -> None:
    """Stop the workers: no new claims, and the trials they run interrupted at once (checkpoints kept).

    Cancelling the submitit jobs only signals their controllers, whose worker processes would
    otherwise go on claiming trials as orphans. SIGINT makes a worker's trial record itself
    interrupted and release its lease.
    """
    write_text(payload.stop_file, str(os.getpid()))
    for job in payload.trials if book is not None else ():
        holder, live = book.holder(job.trial_id)
        if live and holder is not None and holder.token == payload.token and holder.host == socket.gethostname():
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder.pid, signal.SIGINT)


def _held_elsewhere(book: Ledger | None, pack: Pack, reported: set[str]) -> bool:
    """True while a trial not yet reported is held by a live process (a worker of an earlier run)."""
    return book is not None and any(book.holder(t.id)[1] for t in pack.trials if t.id not in reported)


@dataclass
class Workers:
    """Local workers started on one shared pack (see ``PackJob.prepare_store``)."""

    jobs: list[Any]
    payload: PackJob
    pack: Pack
    started: float = 0.0

    def _said(self) -> dict:
        try:
            return read_json(self.payload.ready_file) or {}
        except OSError:
            return {}

    def target(self) -> TrackingTarget | None:
        """Where the trials log, once the worker preparing the store has said so."""
        said, first = self._said(), self.payload.trials[0].target
        return TrackingTarget(first.uri, said["experiment_id"], first.sweep) if "experiment_id" in said else None

    def store_error(self) -> str | None:
        """Why the store could not be prepared, if the worker preparing it failed."""
        error = self._said().get("error")
        return f"the tracking store {self.payload.trials[0].target.uri} could not be prepared: {error}" if error \
            else None


def start_workers(ex: submitit.Executor, packed: list[tuple[PackJob, Pack]], folder: Path) -> Workers:
    """Start the workers: the first creates the store and the experiment while the others import.

    Call this before any live progress display: while submitting, our stdout is pointed at a
    log file (see ``controller_output``).
    """
    payload, pack = packed[0]
    started = time.time()
    with controller_output(folder):
        jobs = [ex.submit(TrialTask(), payload) for _ in packed]
    # Which worker runs which trial is only known once one claims it (the ledger says): the
    # records say which submission the trials belong to, with the first worker's log.
    records.append(folder, [records.record_for(jobs[0], t.id, t.name, "local") for t in pack.trials])
    return Workers(jobs, payload, pack, started)


def follow_workers(workers: Workers, progress: Callable[[Trial, str], None] = lambda trial, status: None
                   ) -> Summary:
    """Report each trial as its outcome lands, then account for every trial."""
    jobs, payload, pack = workers.jobs, workers.payload, workers.pack
    summary = Summary()
    by_id = {j.trial_id: j for j in payload.trials}
    reported: set[str] = set()

    def report(trial: Trial, outcome: dict) -> None:
        reported.add(trial.id)
        progress(trial, summary.account(trial.id, outcome))

    def landed(trial: Trial) -> dict | None:
        return _outcome(by_id[trial.id], payload.token) or _ledger_outcome(book, trial.id, workers.started)

    book = Ledger(payload.trials[0].ledger_dir) if payload.trials[0].ledger_dir else None
    try:
        while True:
            alive = not all(job.done() for job in jobs)
            for trial in pack.trials:
                if trial.id not in reported and (outcome := landed(trial)):
                    report(trial, outcome)
            # Every trial accounted for: the workers only have their exit left (about a second
            # of interpreter teardown with torch loaded), which nobody needs to wait for.
            if len(reported) == len(pack.trials) or not alive and not _held_elsewhere(book, pack, reported):
                break
            time.sleep(0.1 + 1e-4 * (len(pack.trials) - len(reported)))  # many markers to read: read less often
    except KeyboardInterrupt:
        _stop_workers(payload, book)
        for job in jobs:
            job.cancel(check=False)
        raise
    if len(reported) == len(pack.trials):
        return summary
    errors = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # a worker died: the trial it was on has no outcome
            errors.append(job_error(exc))
    target, store_error = workers.target(), workers.store_error()
    for trial in pack.trials:
        if trial.id not in reported:
            message = store_error or (errors[0] if errors else "no worker ran it")
            if target is not None:  # else no run can exist: the store was never ready
                mark_lost(target, trial.id, message)
            report(trial, {"status": "FAILED", "error": message})
    return summary
