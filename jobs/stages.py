"""Stages shared between trials: content-addressed level states, computed once per sweep.

A trial is a chain of stages: the dense model (level 0), then one stage per pruning level,
then its quantization. Level ``k``'s state depends only on the settings that shape levels
``0..k``: the dense model on dataset, model, training settings, seed and device (plus the
late-rewinding point it must capture), a pruning level also on every ``prune.*`` setting.
So the dense model of a (dataset, model, seed, training) is the same for every prune method,
ratio and quant mode, and a pruning trajectory the same for every quant mode. ``level_keys``
names each level by a hash of exactly those settings; ``StageCache`` keeps the states of
shared levels on disk under the sweep's folder, and a trial that finds one resumes from it
instead of training again (the state is the one a checkpoint at that level boundary holds).

Caveats:
- The cache folder must be on a filesystem every node sees (like the checkpoints).
- Computing a shared level takes a lock file beside it (``flock``); a second process that
  needs the same level waits for it (``wait=True``) or, where waiting would idle a GPU,
  computes it itself without saving (``wait=False``). The locks need a filesystem with
  working ``flock`` (local disks and NFSv4 do; some Lustre mounts need ``-o flock``).
- Entries stay after the sweep, so a later sweep run that adds ratios or quant modes reuses
  the dense models; delete ``<folder>/stages/`` to reclaim the space.
- Entries are written atomically (``jobs.atomicio``). A corrupt one (truncated by a disk fault
  or a crash of an older tool) is moved aside to ``<key>.pt.corrupt`` with a warning naming it,
  and the level is computed again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from jobs import atomicio
from jobs.config import SETTINGS, TrialConfig, identity

# Bump when the content of a level state changes, so old entries are not reused.
STAGE_FORMAT = 1
DENSE_SECTIONS = ("dataset", "model", "train")
DENSE_TOP = ("seed", "device")


def _section(key: str) -> str:
    return key.split(".")[0]


def _digest(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def levels_of(cfg: TrialConfig) -> int:
    """The number of pruning levels of a trial (0 for a dense trial)."""
    return cfg.prune.iterations if cfg.prune.ratio > 0 else 0


def _late_rewind(cfg: TrialConfig) -> str | None:
    """``epoch:N``/``step:N`` rewinding needs the dense run to capture its weights at N."""
    kind, _, at = cfg.prune.rewind.partition(":")
    if levels_of(cfg) > 0 and kind in ("epoch", "step") and int(at or 0) > 0:
        return cfg.prune.rewind
    return None


def dense_key(cfg: TrialConfig) -> str:
    """Hash of the settings that determine the trained dense model (level 0)."""
    ident = identity(cfg)
    dense = {k: v for k, v in ident.items() if _section(k) in DENSE_SECTIONS or k in DENSE_TOP}
    return "d-" + _digest({"format": STAGE_FORMAT, "settings": dense, "capture": _late_rewind(cfg)})


def level_keys(cfg: TrialConfig) -> list[str]:
    """One key per level ``0..levels``: level k's key names the state after training level k."""
    keys = [dense_key(cfg)]
    ident = identity(cfg)
    prune = {k: v for k, v in ident.items() if _section(k) == "prune"}
    for level in range(1, levels_of(cfg) + 1):
        keys.append("p-" + _digest({"dense": keys[0], "prune": prune, "level": level}))
    return keys


def training_epochs(cfg: TrialConfig) -> list[int]:
    """Epochs trained at each level (the work a level stage costs)."""
    retrain = cfg.prune.retrain_epochs
    return [cfg.train.epochs] + [cfg.train.epochs if retrain < 0 else retrain] * levels_of(cfg)


def unassigned_settings() -> list[str]:
    """Settings that belong to no stage (a new top-level setting must be given one)."""
    return [k for k in SETTINGS if not (_section(k) in DENSE_SECTIONS + ("prune", "quant") or k in DENSE_TOP)]


class StageCache:
    """Level states on disk, one file per key, written atomically; a lock file per key."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)

    def _path(self, key: str, suffix: str = "pt") -> Path:
        return self.root / f"{key}.{suffix}"

    def has(self, key: str) -> bool:
        """True when the level state ``key`` is on disk, whole (a truncated one is moved aside)."""
        # Checked (cheaply) so that a trial does not pick a level it cannot load over one below it that it can.
        return atomicio.torch_exists(self._path(key))

    def load(self, key: str, part: str = "pt") -> dict[str, Any] | None:
        """The stored state (``part="final.pt"``: the final-level measurements), or None (a corrupt one moved aside)."""
        return atomicio.torch_load(self._path(key, part))

    def save(self, key: str, state: dict[str, Any], part: str = "pt") -> None:
        """Store ``state`` under ``key`` so that readers never see half a file."""
        atomicio.torch_save(state, self._path(key, part))

    @contextlib.contextmanager
    def lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold ``key``'s lock; yields False (without waiting) if ``wait`` is off and it is taken."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._path(key, "lock"), "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
