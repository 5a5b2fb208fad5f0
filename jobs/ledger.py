"""The ledger: one record of each trial's state per sweep folder, and leases so a trial runs once.

Every process that runs a trial (a local worker, a SLURM array task, ``sweep run`` itself with
the debug executor) first *claims* the trial here, and ``sweep run``/``status``/``cancel`` read
the same files, so they agree on who holds what.

Layout, under ``<sweep folder>/ledger/<trial id>/``:

- ``lease.<N>``: the N-th claim of the trial (JSON: host, pid, job id, token, time). A claim is
  ``open(O_CREAT | O_EXCL)`` of the next generation, which is atomic on local disks and on NFS
  (v3 and later) and Lustre, so two processes racing for a trial cannot both get it. The file's
  modification time is the holder's heartbeat, renewed every ``HEARTBEAT_S``.
- ``state.json``: the last state (queued, running, finished, failed, diverged, interrupted, cancelled),
  attempts, the holder, the last error; written atomically by whoever holds the lease (or by
  ``sweep run``/``cancel`` for queued and cancelled, which hold no lease).

A lease is live until released or expired. It expires when its holder is on this host and its
pid is gone (at once), or when its heartbeat is older than ``LEASE_TTL_S`` (any host: the holder
is presumed dead). The next claimant takes generation N+1; a holder that finds a newer
generation than its own (it was stalled for longer than the TTL and presumed dead) has been
fenced off and stops at once instead of writing beside the new holder.

Failure modes (documented in the README): clocks of nodes that differ by more than the TTL make
leases look expired early or late; a holder stalled (SIGSTOP, a hung filesystem) for longer than
the TTL is taken over, and its writes between waking up and its next heartbeat (at most
``HEARTBEAT_S``) can still reach the store; a filesystem without atomic exclusive create (some
FUSE mounts) breaks the guarantee. Nothing here imports torch or mlflow.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from jobs.atomicio import write_json

LEASE_TTL_S = float(os.environ.get("LOTTERY_SWEEPS_LEASE_TTL_S", "120"))
HEARTBEAT_S = max(0.05, min(15.0, LEASE_TTL_S / 8))
DIRNAME = "ledger"
SUBMISSION = "_submission"
TERMINAL = ("finished", "failed", "diverged", "cancelled")
_LEASE = re.compile(r"^lease\.(\d+)$")


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lease: enough to find and judge the process."""

    host: str
    pid: int
    job_id: str = ""
    token: str = ""
    since: float = 0.0
    command: str = ""

    @classmethod
    def me(cls, job_id: str = "", token: str = "", command: str = "") -> "Holder":
        """This process as a holder (its SLURM job, array task included, when there is one)."""
        return cls(socket.gethostname(), os.getpid(), job_id or slurm_job_id(), token, time.time(), command)

    def describe(self) -> str:
        """``pid 123 on node7 (job 45_1) since 12:01:02``: what a user needs to find it."""
        job = f" (job {self.job_id})" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job} since {time.strftime('%H:%M:%S', time.localtime(self.since))}"


@dataclass
class TrialState:
    """What the ledger knows of one trial."""

    state: str = "not submitted"
    attempts: int = 0
    error: str = ""
    holder: Holder | None = None
    job_id: str = ""
    token: str = ""
    run_id: str = ""
    updated_at: float = 0.0
    extra: dict = field(default_factory=dict)


def slurm_job_id() -> str:
    """``123_4`` in an array task, ``123`` in a plain job, "" outside SLURM (a requeue keeps it)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _read_json(path: Path) -> dict | None:
    """The file's JSON object, or None when missing or torn (a crash mid-write of an older tool)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Lease:
    """A held claim on one trial (or on a sweep's submission); renew it, then release it."""

    def __init__(self, path: Path, generation: int, holder: Holder):
        self.path, self.generation, self.holder = path, generation, holder
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def superseded(self) -> bool:
        """True once another process took a newer generation (we were presumed dead)."""
        return _generation(self.path.parent) > self.generation

    def beat(self) -> bool:
        """Renew the heartbeat; False (and ``lost`` set) when we have been fenced off."""
        if self.superseded():
            self.lost.set()
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:  # the trial's folder was removed under us
            self.lost.set()
            return False
        return True

    def keep_alive(self, on_lost: Callable[[], None] | None = None) -> "Lease":
        """Renew the heartbeat in a daemon thread; ``on_lost`` runs if we are fenced off."""
        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                if not self.beat():
                    if on_lost is not None:
                        on_lost()
                    return

        self._thread = threading.Thread(target=loop, name=f"lease-{self.path.parent.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and let the next claimant in at once (the file stays: generations only grow)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.superseded():
            try:
                write_json(self.path, {**asdict(self.holder), "released": True})
            except OSError:
                pass


def _generations(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _LEASE.match(n)))


def _generation(directory: Path) -> int:
    found = _generations(directory)
    return found[-1] if found else 0


def lease_holder(directory: Path) -> tuple[Holder | None, bool]:
    """The current lease's holder and whether the lease is live (False: released, expired or none)."""
    generation = _generation(directory)
    if not generation:
        return None, False
    path = directory / f"lease.{generation}"
    said = _read_json(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, False
    if said is None:  # being written this instant by a new claimant: treat as live
        return None, age < LEASE_TTL_S
    holder = Holder(**{k: said[k] for k in Holder.__dataclass_fields__ if k in said})
    if said.get("released"):
        return holder, False
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return holder, False
    return holder, age < LEASE_TTL_S


class Ledger:
    """The trial states and leases of one sweep folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of(cls, sweep_folder: str | os.PathLike) -> "Ledger":
        """The ledger of the sweep whose submitit folder this is."""
        return cls((Path(sweep_folder) / DIRNAME).resolve())

    def _dir(self, trial_id: str) -> Path:
        return self.root / trial_id

    def claim(self, trial_id: str, holder: Holder) -> Lease | tuple[Holder | None, str]:
        """Take the trial's lease, or say who holds it: ``(holder, why)`` when we did not get it."""
        directory = self._dir(trial_id)
        directory.mkdir(parents=True, exist_ok=True)
        current, live = lease_holder(directory)
        # A requeued SLURM task is its own predecessor: it need not wait for the old lease to expire.
        requeued = current is not None and bool(holder.job_id) and current.job_id == holder.job_id
        if live and not requeued:
            return current, "held"
        generation = _generation(directory) + 1
        path = directory / f"lease.{generation}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another claimant was faster
            return lease_holder(directory)[0], "raced"
        try:
            os.write(fd, json.dumps(asdict(holder)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        # A claimant that listed the generations long ago may have created ours after a newer one
        # (generations are never reused, so a newer file means we lost): check before running.
        if _generation(directory) != generation:
            return lease_holder(directory)[0], "raced"
        for old in _generations(directory)[:-2]:  # keep the previous one for the record
            (directory / f"lease.{old}").unlink(missing_ok=True)
        return Lease(path, generation, holder)

    def read(self, trial_id: str) -> TrialState:
        """The trial's recorded state (``not submitted`` when the ledger never saw it)."""
        said = _read_json(self._dir(trial_id) / "state.json") or {}
        holder = said.pop("holder", None)
        known = {k: v for k, v in said.items() if k in TrialState.__dataclass_fields__}
        state = TrialState(**known)
        state.holder = Holder(**holder) if isinstance(holder, dict) else None
        return state

    def write(self, trial_id: str, state: TrialState, durable: bool = True) -> None:
        """Record the trial's state (atomically; ``durable``: on disk before returning)."""
        directory = self._dir(trial_id)
        directory.mkdir(parents=True, exist_ok=True)
        state.updated_at = time.time()
        write_json(directory / "state.json", asdict(state), durable)

    def update(self, trial_id: str, durable: bool = True, **changes) -> TrialState:
        """Change some fields of the trial's state and record it."""
        state = self.read(trial_id)
        for key, value in changes.items():
            setattr(state, key, value)
        self.write(trial_id, state, durable)
        return state

    def holder(self, trial_id: str) -> tuple[Holder | None, bool]:
        """Who holds the trial's lease and whether that lease is live."""
        return lease_holder(self._dir(trial_id))

    def known(self) -> list[str]:
        """Trial ids the ledger has a folder for."""
        try:
            return sorted(n for n in os.listdir(self.root) if n != SUBMISSION)
        except FileNotFoundError:
            return []

