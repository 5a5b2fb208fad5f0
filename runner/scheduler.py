"""What SLURM knows: array size limit, job states (squeue, then sacct), cancelling.

Every query degrades instead of failing: without accounting (`sacct` unavailable) states of
jobs that already left the queue are unknown, and callers say so.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
CANCELLED = {"CANCELLED"}
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None


def max_array_size(default: int = 1001) -> int:
    """The cluster's MaxArraySize (array indices must stay below it)."""
    proc = _run(["scontrol", "show", "config"])
    if proc is not None and proc.returncode == 0:
        match = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M)
        if match:
            return int(match.group(1))
    return default


def _expand(job_id: str) -> list[str]:
    """``123_[0-3,7%2]`` (a pending array's compressed form) → ``123_0 ... 123_3, 123_7``."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.group(1), match.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def job_states(job_ids: list[str], since: float | None = None) -> tuple[dict[str, dict], str | None]:
    """Per job id: {state, elapsed}; plus a note on what could not be known.

    ``since`` (epoch seconds, the first submission) keeps sacct from reporting older jobs that
    reused the same ids (a cluster whose state directory was reset numbers jobs from 1 again).
    """
    if not job_ids:
        return {}, None
    parents = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, dict] = {}
    note = None
    window = []
    if since is not None:
        window = ["-S", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))]
    proc = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Elapsed", *window, "-j", ",".join(parents)])
    if proc is not None and proc.returncode == 0 and "accounting storage is disabled" not in proc.stdout + proc.stderr:
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3:
                for jid in _expand(parts[0]):
                    states[jid] = {"state": parts[1].split()[0], "elapsed": parts[2]}
    else:
        note = "sacct unavailable: states of jobs that left the queue are unknown"
    # squeue is authoritative for what is still queued or running.
    proc = _run(["squeue", "-h", "-r", "-o", "%i|%T|%M", "-j", ",".join(parents)])
    # Jobs that left the controller make squeue fail with "Invalid job id": none is queued.
    gone = proc is not None and "invalid job id" in proc.stderr.lower()
    if proc is not None and (proc.returncode == 0 or gone):
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3:
                for jid in _expand(parts[0]):
                    states[jid] = {"state": parts[1], "elapsed": parts[2]}
    elif note is None:
        note = "squeue unavailable"
    else:
        note = "neither sacct nor squeue answered: scheduler states unknown"
    return states, note


def cancel(job_ids: list[str]) -> tuple[bool, str]:
    """scancel the given jobs (array tasks as ``123_4``)."""
    if not job_ids:
        return True, ""
    proc = _run(["scancel", *job_ids])
    if proc is None:
        return False, "scancel not found"
    return proc.returncode == 0, proc.stderr.strip()
