"""Retrying transient store errors; no MLflow import, so the submitting side stays light.

Many trials write to one store at once. SQLite answers contention with "database is locked",
so every write goes through ``retry`` (exponential backoff) instead of failing the trial.
"""
from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")
RESULTS_ARTIFACT = "results.csv"
_TRANSIENT = ("database is locked", "database is busy", "disk i/o error", "unable to open database",
              "connection refused", "connection reset", "timed out", "temporarily unavailable")


def retry(fn: Callable[..., T], *args, attempts: int = 12, base_delay: float = 0.05, **kwargs) -> T:
    """Call ``fn`` and retry transient store errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy errors in several exception types
            if attempt == attempts - 1 or not any(s in str(exc).lower() for s in _TRANSIENT):
                raise
            time.sleep(min(base_delay * 2 ** attempt, 5.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")
