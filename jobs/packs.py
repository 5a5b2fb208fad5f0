"""Packs of trials in one process: in order, in lanes at the same time, or shared out by local workers.

A pack runs its trials one after another (``run_trial`` each); one failing trial does not
stop the others. Each trial's outcome lands in ``<checkpoint_dir>/outcome.json`` under the
pack's token, so a requeued pack skips what it ran, and a local ``sweep run`` reports trials
as they finish. Lanes run parts of a pack at the same time in spawned processes, each on its
share of the cores and its own GPU. In local workers mode every worker gets the same pack,
runs the trajectory groups it claims first, and the first to claim it creates the tracking
store (see ``PackJob``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from jobs.atomicio import read_json, write_json
from jobs.checkpoint import Checkpoint
from jobs.ledger import Holder, Lease, Ledger
from jobs.task import HELD, PackJob, TrialJob
from jobs.trial import run_trial


def _lane_devices(lanes: int) -> list[str | None]:
    """The GPU each lane sees (CUDA_VISIBLE_DEVICES), round-robin over the allocation's GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible else (
        [str(i) for i in range(torch.cuda.device_count())])
    return [gpus[i % len(gpus)] if gpus else None for i in range(lanes)]


def _run_lane(pack: PackJob, gpu: str | None, threads: int) -> list[dict[str, Any]]:
    """One lane of a pack, in its own process: its GPU, its share of the cores."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before this process touches CUDA
    trials = tuple(dataclasses.replace(job, threads=threads) for job in pack.trials)
    return run_pack(PackJob(trials, pack.token))


def _run_lanes(pack: PackJob) -> list[dict[str, Any]]:
    """Run the pack's lanes at the same time; outcomes in the pack's order."""
    import multiprocessing

    slots = pack.trials[0].threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or os.cpu_count() or 1
    threads = max(1, slots // len(pack.lanes))
    lanes = [PackJob(tuple(pack.trials[i] for i in lane), pack.token) for lane in pack.lanes]
    # spawn: a forked child would inherit torch's thread pools and CUDA state from this process.
    with multiprocessing.get_context("spawn").Pool(len(lanes)) as pool:
        results = pool.starmap(_run_lane, zip(lanes, _lane_devices(len(lanes)), [threads] * len(lanes)))
    by_id = {o["trial_id"]: o for lane in results for o in lane}
    return [by_id[job.trial_id] for job in pack.trials]


def _claim(path: Path) -> bool:
    """Create ``path`` if nobody has (atomic on local and NFS filesystems); True if we did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _alive(pid_file: Path) -> bool:
    """False once the process whose pid ``pid_file`` holds has ended (True while it is unwritten)."""
    try:
        pid = int(pid_file.read_text() or 0)
    except (OSError, ValueError):
        return True
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _when_store_ready(pack: PackJob) -> PackJob:
    """Create the store if we claim it first, else wait for it; the pack with its experiment id filled in."""
    from jobs.tracking import prepare_store

    ready, creator = pack.ready_file, pack.ready_file.with_suffix(".creator")
    first = pack.trials[0].target
    if first.uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (half a second, while others may wait)
    if not ready.exists() and _claim(creator):
        creator.write_text(str(os.getpid()))
        try:
            experiment_id = prepare_store(first.uri, first.sweep).experiment_id
        except Exception as exc:
            write_json(ready, {"error": _one_line(exc)})
            raise
        write_json(ready, {"experiment_id": experiment_id})
    while not ready.exists():
        if not _alive(creator):
            raise RuntimeError("the worker preparing the tracking store ended before it was ready")
        time.sleep(0.05)
    said = json.loads(ready.read_text())
    if "error" in said:
        raise RuntimeError(f"the tracking store could not be prepared: {said['error']}")
    trials = tuple(dataclasses.replace(job, target=dataclasses.replace(job.target, experiment_id=said["experiment_id"]))
                   for job in pack.trials)
    return dataclasses.replace(pack, trials=trials, prepare_store=False)


def _run_unclaimed(job: TrialJob) -> dict[str, Any]:
    try:
        return run_trial(job)
    except Exception as exc:  # the store itself failed: this trial could not even be recorded
        return {"trial_id": job.trial_id, "run_id": None, "status": "FAILED", "error": _one_line(exc)}


def _fenced(trial_id: str) -> None:
    # Another process took this trial over (we were presumed dead): writing on would duplicate it.
    print(f"lottery-sweeps: trial {trial_id} was taken over by another process; stopping", flush=True)
    os._exit(75)


def _outcome_of(job: TrialJob, status: str, error: str | None, run_id: str | None = None) -> dict[str, Any]:
    return {"trial_id": job.trial_id, "run_id": run_id, "status": status, "error": error}


def _claim_trial(book: Ledger, job: TrialJob, token: str) -> Lease | dict[str, Any]:
    """The trial's lease, with the ledger saying it runs; else the outcome to report instead of running it."""
    before = book.read(job.trial_id)
    if before.state == "finished":
        return _outcome_of(job, "FINISHED", None, before.run_id)
    try:
        lease = book.claim(job.trial_id, Holder.me(token=token))
        if not isinstance(lease, Lease):
            holder, _ = lease
            return _outcome_of(job, HELD, f"already held by {holder.describe() if holder else 'another process'}")
        book.update(job.trial_id, state="running", attempts=before.attempts + 1, holder=lease.holder,
                    token=token, error="")
    except OSError as exc:  # a full or read-only disk under the ledger: this trial cannot be claimed
        return _outcome_of(job, "FAILED", _one_line(exc))
    return lease


def _run_claimed(job: TrialJob, token: str) -> dict[str, Any]:
    """Run the trial under its ledger lease, so no other process runs it at the same time.

    A trial the ledger has as finished is not run again; one another live process holds is
    skipped (``HELD``). The ledger then records how it ended: finished, failed, diverged, or
    interrupted when its checkpoint is kept for a requeue or a re-run to resume.
    """
    if not job.ledger_dir:
        return _run_unclaimed(job)
    book = Ledger(job.ledger_dir)
    lease = _claim_trial(book, job, token)
    if not isinstance(lease, Lease):
        return lease
    lease.keep_alive(on_lost=lambda: _fenced(job.trial_id))
    ended, outcome = "interrupted", {}
    try:
        outcome = _run_unclaimed(job)
        kept = job.checkpoint_dir and Checkpoint(job.checkpoint_dir).path.exists()
        ended = "finished" if outcome["status"] == "FINISHED" else (
            "diverged" if outcome.get("diverged") else "interrupted" if kept else "failed")
    finally:  # also on Ctrl-C, SIGTERM (submitit raises) and a requeue: the state says interrupted
        try:
            book.update(job.trial_id, state=ended, error=outcome.get("error") or "", run_id=outcome.get("run_id") or "")
        except OSError as exc:  # disk full: the lease's release below still lets a re-run in
            print(f"lottery-sweeps: could not record trial {job.trial_id} as {ended}: {exc}", flush=True)
        lease.release()
    return outcome


def run_pack(pack: PackJob) -> list[dict[str, Any]]:
    """Run a pack's trials in order (or its lanes at the same time); one failing trial does not stop the others.

    A requeued pack (preemption, time limit) skips the trials it already ran under this
    submission's token and resumes the interrupted one from its checkpoint.
    """
    if len(pack.lanes) > 1:
        return _run_lanes(pack)
    if pack.prepare_store:
        pack = _when_store_ready(pack)
    if pack.claim_dir:
        claimed = []
        for group in pack.groups:
            if pack.stop_file.exists():  # the sweep run was stopped (Ctrl-C, sweep cancel)
                break
            if _claim(Path(pack.claim_dir) / f"{pack.token}-{pack.trials[group[0]].trial_id}"):
                claimed += run_pack(PackJob(tuple(pack.trials[i] for i in group), pack.token))
        return claimed
    outcomes = []
    for job in pack.trials:
        marker = job.outcome_file
        # A corrupt marker (a crash or a full disk of an older tool) reads as none: the trial runs again.
        done = read_json(marker, ("token", "outcome")) if job.checkpoint_dir else None
        if done is not None and done["token"] == pack.token:
            outcomes.append(done["outcome"])
            continue
        outcome = _run_claimed(job, pack.token)
        if outcome["status"] == HELD:  # another live process runs it: its result is its own to report
            outcomes.append(outcome)
            continue
        # A trial stopped with its checkpoint kept (out of time) is not done: a requeue resumes it.
        if job.checkpoint_dir and not Checkpoint(job.checkpoint_dir).path.exists():
            try:
                write_json(marker, {"token": pack.token, "outcome": outcome})
            except OSError as exc:  # disk full: the trial says so, and the pack goes on with the next one
                if outcome["status"] == "FINISHED":
                    outcome = {**outcome, "status": "FAILED", "error": _one_line(exc)}
        outcomes.append(outcome)
    return outcomes
