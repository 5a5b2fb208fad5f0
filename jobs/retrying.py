"""Retrying transient store errors; no MLflow import, so the submitting side stays light.

Many trials write to one store at once. SQLite answers contention with "database is locked",
so every write goes through ``retry`` (exponential backoff) instead of failing the trial.
Conditions that waiting does not change (a read-only or full store, a file SQLite cannot open)
fail at once, as a one-line ``jobs.storeguard.StoreError`` naming the cause.
"""
from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from jobs.storeguard import quiet_mlflow, translate

T = TypeVar("T")
RESULTS_ARTIFACT = "results.csv"
_TRANSIENT = ("database is locked", "database is busy", "disk i/o error",
              "connection refused", "connection reset", "timed out", "temporarily unavailable")
# Checked first: MLflow wraps e.g. "database or disk is full" as TEMPORARILY_UNAVAILABLE, and
# "unable to open database" (a missing or read-only directory) once cost 100 s of retries.
_PERMANENT = ("readonly database", "read-only file system", "permission denied", "operation not permitted",
              "unable to open database", "database or disk is full", "no space left", "file is not a database",
              "malformed")


def _transient(exc: Exception) -> bool:
    """Whether trying again may succeed: contention or a passing network fault, not a permanent state."""
    text = str(exc).lower()
    return not any(s in text for s in _PERMANENT) and any(s in text for s in _TRANSIENT)


def _uri_of(fn: Callable) -> str:
    """The store a bound MlflowClient method talks to, for the error message ('' if unknown)."""
    client = getattr(getattr(fn, "__self__", None), "_tracking_client", None)
    return str(getattr(client, "tracking_uri", "") or "")


def retry(fn: Callable[..., T], *args, attempts: int = 12, base_delay: float = 0.05, **kwargs) -> T:
    """Call ``fn`` and retry transient store errors with jittered exponential backoff.

    A store condition that persists (permanent, or transient to the last attempt) is raised as
    a StoreError; any other error as it is.
    """
    for attempt in range(attempts):
        try:
            with quiet_mlflow():  # its traceback logs say what the error raised below says
                return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy errors in several exception types
            if attempt == attempts - 1 or not _transient(exc):
                store_error = translate(exc, _uri_of(fn), fallback=False)
                if store_error is None:
                    raise
                raise store_error from exc
            time.sleep(min(base_delay * 2 ** attempt, 5.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")
