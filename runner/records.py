"""Which job ran which trial: an append-only JSON-lines file in the sweep's submitit folder.

`sweep run` returns right after a SLURM submission; `sweep status`, `sweep cancel` and later
runs find the jobs again through this file.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / FILENAME, "a") as fh:
        for record in records:
            fh.write(json.dumps(asdict(record)) + "\n")


def latest(folder: Path) -> dict[str, JobRecord]:
    """The most recent submission of each trial."""
    path = folder / FILENAME
    if not path.exists():
        return {}
    out: dict[str, JobRecord] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = JobRecord(**json.loads(line))
            out[record.trial_id] = record
    return out


def record_for(job, trial_id: str, name: str, executor: str) -> JobRecord:
    """A record for a submitit job."""
    return JobRecord(trial_id, name, str(job.job_id), executor, time.time(),
                     str(job.paths.stdout), str(job.paths.stderr))
