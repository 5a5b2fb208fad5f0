"""A trial's resumable state on disk: written at every epoch and level boundary, atomically.

The directory must be on a filesystem that every node sees (with SLURM a requeued job may
start on another node). One file per trial, keyed by trial id, replaced on every save
(``jobs.atomicio``). A corrupt checkpoint (a disk fault, or a crash of an older tool) is moved
aside with a warning and the trial starts over: from the stage cache where it has its levels,
else from scratch.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import atomicio

FILENAME = "checkpoint.pt"
RUN_FILENAME = "run_id"
# Keys every saved state has (``jobs.trial.execute``): a file without them is not a checkpoint.
REQUIRED = ("level", "epoch", "model")
RUN_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]*")  # an MLflow run id (a uuid4 hex today), whole


def rng_state() -> dict[str, Any]:
    """Every RNG a trial uses, so a resumed trial draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """Save, load and clear one trial's state under ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / FILENAME
        self.run_path = Path(directory) / RUN_FILENAME

    def run_id(self) -> str | None:
        """The MLflow run of this trial's unfinished attempt, if one started (a torn id: None, a new run)."""
        try:
            text = self.run_path.read_text().strip()
        except FileNotFoundError:
            return None
        if RUN_ID.fullmatch(text):
            return text
        atomicio.discard(self.run_path, "empty file" if not text else "not an MLflow run id")
        return None

    def save_run_id(self, run_id: str) -> None:
        """Remember the run at once: a job stopped before its first epoch resumes the same run."""
        atomicio.write_text(self.run_path, run_id)

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None when the trial starts fresh (none, or a corrupt one moved aside)."""
        return atomicio.torch_load(self.path, REQUIRED)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` so that a crash mid-write leaves the previous checkpoint intact."""
        atomicio.torch_save(state, self.path)

    def clear(self) -> None:
        """Remove the checkpoint (the trial finished, or failed for good)."""
        self.path.unlink(missing_ok=True)
        self.run_path.unlink(missing_ok=True)
