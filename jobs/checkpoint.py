"""A trial's resumable state on disk: written at every epoch and level boundary, atomically.

The directory must be on a filesystem that every node sees (with SLURM a requeued job may
start on another node). One file per trial, keyed by trial id, replaced on every save.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILENAME = "checkpoint.pt"
RUN_FILENAME = "run_id"


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
        """The MLflow run of this trial's unfinished attempt, if one started."""
        return self.run_path.read_text().strip() if self.run_path.exists() else None

    def save_run_id(self, run_id: str) -> None:
        """Remember the run at once: a job stopped before its first epoch resumes the same run."""
        self.run_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.run_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(run_id)
        os.replace(tmp, self.run_path)

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None when the trial starts fresh."""
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` so that a crash mid-write leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """Remove the checkpoint (the trial finished, or failed for good)."""
        self.path.unlink(missing_ok=True)
        self.run_path.unlink(missing_ok=True)
