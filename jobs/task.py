"""What executors pickle and run: light to import on purpose.

submitit installs its SIGUSR2 handler (checkpoint and requeue) only after unpickling the job.
Unpickling must therefore not import torch or mlflow: a job that receives the time-limit
signal while still importing would otherwise die instead of being requeued. The heavy
imports happen inside ``TrialTask.__call__``, after the handler is in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit


OUTCOME_FILENAME = "outcome.json"
# A trial's outcome when another live process holds its ledger lease (``jobs.ledger``).
HELD = "HELD"


@dataclass(frozen=True)
class TrackingTarget:
    """Where a trial logs: store URI, experiment id and the sweep's name.

    ``experiment_id`` is None only in a workers-mode pack whose store a worker prepares (see
    ``PackJob.prepare_store``); each worker fills it in before running anything.
    """

    uri: str
    experiment_id: str | None
    sweep: str


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial; small and picklable."""

    trial_id: str
    name: str
    settings: dict[str, Any]
    target: TrackingTarget
    tags: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    checkpoint_dir: str | None = None
    # Shared stages (jobs.stages): where level states live, which levels to store for others,
    # and whether to wait for a shared level another process is computing.
    stage_dir: str | None = None
    save_levels: tuple[int, ...] = ()
    wait_for_stages: bool = True
    # Seconds between checkpoints within a level (always at a level's end); 0: every epoch.
    checkpoint_every_s: float = 0.0
    # The sweep's ledger (``jobs.ledger``): the trial is claimed there before it runs.
    ledger_dir: str | None = None

    @property
    def outcome_file(self) -> Path:
        """Where the trial's outcome lands once it ended, under its pack's token (``jobs.packs``)."""
        return Path(self.checkpoint_dir or ".") / OUTCOME_FILENAME


@dataclass(frozen=True)
class PackJob:
    """Several trials run one after another in one process (one import, one allocation).

    ``token`` names this submission: a requeued pack skips the trials it already ran under the
    same token, and resumes the interrupted one from its checkpoint.
    """

    trials: tuple[TrialJob, ...]
    token: str
    # Lanes run at the same time in one allocation (indices into ``trials``, each lane in
    # order, on its own share of the cores and its own GPU); one lane: all in sequence.
    lanes: tuple[tuple[int, ...], ...] = ()
    # Workers mode: several jobs get the same pack and token and each runs the groups
    # (indices into ``trials``, in order) it claims first in ``claim_dir``, so work is shared
    # out as slots free up and each worker imports once.
    claim_dir: str | None = None
    groups: tuple[tuple[int, ...], ...] = ()
    # Workers mode: the first worker to claim ``<claim_dir>/<token>.creator`` creates the
    # tracking store and the experiment (trials' targets have no experiment id yet), then
    # writes ``<token>.ready`` with the id or the error; the others start on that file and
    # give up if the creator ended without writing it.
    prepare_store: bool = False

    @property
    def ready_file(self) -> Path:
        """Where a workers-mode pack's store is said to be ready, or why it is not (``prepare_store``)."""
        return Path(self.claim_dir or ".") / f"{self.token}.ready"

    @property
    def stop_file(self) -> Path:
        """Present once the workers' ``sweep run`` was stopped: they claim nothing more."""
        return Path(self.claim_dir or ".") / f"{self.token}.stop"


@dataclass(frozen=True)
class StageJob:
    """Compute one shared dense stage (level 0) into the stage cache, before its trials start."""

    key: str
    settings: dict[str, Any]
    stage_dir: str
    checkpoint_dir: str
    threads: int | None = None


class TrialTask(submitit.helpers.Checkpointable):
    """A trial as a submitit Checkpointable: on preemption or time limit it is requeued.

    Its state is already on disk (saved after every epoch), so requeuing needs nothing more
    than submitting the same job again; the new process resumes from the checkpoint.
    """

    def __call__(self, job: TrialJob | PackJob | StageJob) -> dict[str, Any] | list[dict[str, Any]]:
        """Run the trial, the pack of trials or the stage (see ``jobs.trial``, ``jobs.packs``)."""
        from jobs import packs, trial

        if isinstance(job, PackJob):
            return packs.run_pack(job)
        if isinstance(job, StageJob):
            return trial.run_stage(job)
        return trial.run_trial(job)
