"""Which job ran which trial: an append-only JSON-lines file in the sweep's submitit folder.

`sweep run` returns right after a SLURM submission; `sweep status`, `sweep cancel` and later
runs find the jobs again through this file. Each submission's lines go in one appending
write (``jobs.atomicio``); a torn last line (a crash or a full disk mid-write) is skipped with a
warning.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from jobs import atomicio

FILENAME = "jobs.jsonl"


@dataclass(frozen=True)
class JobRecord:
    """One submission of one trial."""

    trial_id: str
    name: str
    job_id: str
    executor: str
    submitted_at: float
    stdout: str
    stderr: str


def append(folder: Path, records: list[JobRecord]) -> None:
    """Add records for newly submitted jobs."""
    atomicio.append_lines(folder / FILENAME, [json.dumps(asdict(record)) for record in records])


def latest(folder: Path) -> dict[str, JobRecord]:
    """The most recent submission of each trial (a torn or invalid line is skipped)."""
    names = [f.name for f in fields(JobRecord)]
    out: dict[str, JobRecord] = {}
    for line in atomicio.read_jsonl(folder / FILENAME, required=names):
        record = JobRecord(**{name: line[name] for name in names})
        out[record.trial_id] = record
    return out


def record_for(job, trial_id: str, name: str, executor: str) -> JobRecord:
    """A record for a submitit job."""
    return JobRecord(trial_id, name, str(job.job_id), executor, time.time(),
                     str(job.paths.stdout), str(job.paths.stderr))
