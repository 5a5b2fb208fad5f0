"""One submission of a sweep at a time, and the ledger's ``queued`` entries it writes.

``sweep run`` holds the sweep's submission lease (``jobs.ledger``, ``_submission``) from
reading the trials' states until it returns; a second ``sweep run`` of the same sweep, in
another terminal or on another login node sharing the folder, is refused with who holds it,
instead of submitting the same trials again.
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import click

from jobs.ledger import SUBMISSION, Holder, Lease, Ledger

EXIT_BUSY = 4


class SweepBusy(click.ClickException):
    """Another live process is running this sweep."""

    exit_code = EXIT_BUSY


@contextlib.contextmanager
def hold_submission(folder: Path, sweep: str, dry_run: bool = False) -> Iterator[None]:
    """Hold the sweep's submission lease for the body; refuse when another process holds it."""
    book = Ledger.of(folder)
    if dry_run:  # reads only: no need to exclude anyone, but say if a run is in flight
        holder, live = book.holder(SUBMISSION)
        if live and holder is not None:
            click.echo(f"note: sweep '{sweep}' is being run by {holder.describe()}", err=True)
        yield
        return
    command = shlex.join(["sweep", *sys.argv[1:]])
    got = book.claim(SUBMISSION, Holder.me(command=command))
    if not isinstance(got, Lease):
        holder, _ = got
        who = holder.describe() if holder else "another process"
        what = f" ({holder.command})" if holder and holder.command else ""
        raise SweepBusy(f"sweep '{sweep}' is already being run by {who}{what}; "
                        "follow it with `sweep status`, or stop that process and run again")
    got.keep_alive()
    previous = _stop_on_sigterm()
    try:
        yield
    finally:
        got.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """SIGTERM (`sweep cancel`, a closed session) stops the run like Ctrl-C: workers cancelled, lease released."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupted)


def mark_queued(folder: Path, trials, executor: str) -> None:
    """Record the trials about to be handed out as queued (their workers or jobs claim them next)."""
    book = Ledger.of(folder)
    for trial in trials:
        book.update(trial.id, durable=False, state="queued", job_id="", error="", extra={"executor": executor})


def assign_jobs(folder: Path, job_ids: dict[str, str]) -> None:
    """Note each queued trial's job id once the scheduler gave one (a trial already claimed keeps its state)."""
    book = Ledger.of(folder)
    for trial_id, job_id in job_ids.items():
        state = book.read(trial_id)
        if state.state == "queued":
            state.job_id = job_id
            book.write(trial_id, state, durable=False)
