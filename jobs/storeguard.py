"""Guarding the tracking store: one-line ``StoreError``s, checks before MLflow opens it, a creation lock.

No MLflow import, so the submitting side stays light. MLflow on its own is slow to fail and
vague: it retries opening a SQLite file it cannot open for about 100 s, its HTTP client
retries a dead server for about 16 minutes, and a write it cannot make surfaces as a
SQLAlchemy "autoflush" message. Here the same conditions fail at once, in one line that
names the store, the cause and what to do.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

EXIT_STORE = 3
PROBE_TIMEOUT_S = 5.0
LOCK_TIMEOUT_S = 300.0
ELSEWHERE = "choose another store with --tracking-uri"
# MLflow's defaults (7 retries, backoff factor 2, 120 s per request) wait about 16 minutes on a dead server.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
KNOWN_SCHEMES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks",
                 "databricks-uc", "uc"}


class StoreError(Exception):
    """A tracking store that cannot be used: one line naming the store, the cause and what to do."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def describe(uri: str) -> str:
    """How a message names the store: its file, or its server."""
    path = sqlite_path(uri)
    if path is not None:
        return f"the store {path}"
    if not uri:
        return "the tracking store"
    if uri.startswith(("http://", "https://")):
        return f"the tracking server {uri.rstrip('/')}"
    return f"the store {uri}"


def no_store(uri: str) -> StoreError:
    """The error for a SQLite store that does not exist (reading must not create it)."""
    return StoreError(f"there is no store at {sqlite_path(uri) or uri} — run a sweep first, or {ELSEWHERE}")


# --- what an exception says, in one line ----------------------------------------------------------

def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and every cause or context behind it, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _cause(exc: BaseException) -> str:
    """The innermost plain reason: sqlite's or the OS's own words, not the wrappers' preambles."""
    for inner in reversed(list(_chain(exc))):
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
        if type(inner).__module__ == "sqlite3" and str(inner):
            return str(inner).splitlines()[0]
    for line in str(exc).splitlines():
        # SQLAlchemy prefixes the real message with advice about autoflush or its own class name.
        line = re.sub(r"^\(raised as a result of Query-invoked autoflush.*?\)\s*", "", line.strip())
        line = re.sub(r"^\([\w.]+\)\s*", "", line)
        if line and not line.startswith(("[SQL:", "[parameters:", "(Background on this error")):
            return line[:300]
    return type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    """The OS error number somewhere in the chain, if any."""
    return next((e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno), None)


def _text(exc: BaseException) -> str:
    return " ".join(str(e) for e in _chain(exc)).lower()


def _says(exc: BaseException, *needles: str) -> bool:
    text = _text(exc)
    return any(n in text for n in needles)


def translate(exc: BaseException, uri: str, fallback: bool = True) -> StoreError | None:
    """The StoreError an exception from the store at ``uri`` amounts to (None: no store condition, no fallback)."""
    if isinstance(exc, StoreError):
        return exc
    store, cause, code = describe(uri), _cause(exc), _errno(exc)
    if code == errno.ENOSPC or _says(exc, "database or disk is full", "no space left"):
        where = sqlite_path(uri) or uri or "the tracking store"
        return StoreError(f"the disk holding {where} is full ({cause}) — free some space, or {ELSEWHERE}")
    if code == errno.EROFS or _says(exc, "readonly database", "read-only file system"):
        return StoreError(f"{store} is read-only ({cause}) — make it writable, or {ELSEWHERE}")
    if code in (errno.EACCES, errno.EPERM) or _says(exc, "permission denied", "operation not permitted"):
        return StoreError(f"{store} cannot be written or read here ({cause}) — fix its permissions, or {ELSEWHERE}")
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST) and sqlite_path(uri) is not None:
        return StoreError(f"the directory of {store} does not exist and cannot be created ({cause}) — "
                          f"create it, or {ELSEWHERE}")
    if _says(exc, "unable to open database"):
        return StoreError(f"{store} cannot be opened ({cause}) — check that its directory exists and is "
                          f"writable, or {ELSEWHERE}")
    if _says(exc, "out-of-date database schema"):
        return StoreError(f"{store} was written by an older MLflow ({cause.split('.')[0]}) — back it up and run "
                          f"`mlflow db upgrade {uri}`, or {ELSEWHERE}")
    if _says(exc, "file is not a database", "malformed", "_alembic_tmp", "no such table",
             "online migration expected") or re.search(r"table \w+ already exists", _text(exc)):
        return StoreError(f"{store} is damaged or not an MLflow store ({cause}) — move it aside (a new one "
                          f"is created in its place), or {ELSEWHERE}")
    if _says(exc, "database is locked", "database is busy"):
        return StoreError(f"{store} stayed locked by other writers ({cause}) — try again; for hundreds of "
                          "writers use an mlflow server (README, Tracking)")
    if _says(exc, "connection refused", "max retries exceeded", "failed to establish", "timed out",
             "connection reset", "name or service not known", "temporary failure in name resolution"):
        return StoreError(f"{store} does not answer ({cause}) — start it, or {ELSEWHERE}")
    if _says(exc, "unsupported uri", "could not find a registered", "unexpected uri scheme"):
        return _scheme_error(uri)
    return StoreError(f"{store} failed: {cause}") if fallback else None


class _Quiet(logging.Filter):
    """Drops MLflow's database-error logs in the threads that are inside ``quiet_mlflow``."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_QUIET = _Quiet()
logging.getLogger("mlflow.store.db.utils").addFilter(_QUIET)


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Silence MLflow's "SQLAlchemy database error" logs, tracebacks included, in this thread.

    MLflow logs every database error with its traceback and then raises it; the raised error
    is what counts (one line from ``translate``, its whole chain wherever a traceback is kept).
    """
    _Quiet.local.depth = getattr(_Quiet.local, "depth", 0) + 1
    try:
        yield
    finally:
        _Quiet.local.depth -= 1


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Raise whatever the store at ``uri`` raises inside as one StoreError, without MLflow's traceback logs."""
    try:
        with quiet_mlflow():
            yield
    except Exception as exc:
        raise translate(exc, uri) from exc


# --- checks before MLflow opens the store ----------------------------------------------------------

_checked: set[str] = set()


def _scheme_error(uri: str) -> StoreError:
    return StoreError(f"unsupported tracking URI '{uri}' — use sqlite:///path/to/mlflow.db, "
                      "http(s)://host:port (an mlflow server) or a database URL (postgresql://, mysql://, mssql://)")


def _scheme_known(scheme: str) -> bool:
    """A scheme MLflow or one of its installed plugins serves (``postgresql+psycopg2`` counts as postgresql)."""
    if scheme.split("+", 1)[0] in KNOWN_SCHEMES:
        return True
    from importlib.metadata import entry_points

    return any(ep.name == scheme for ep in entry_points(group="mlflow.tracking_store"))


def check_uri(uri: str) -> None:
    """Refuse an unknown scheme and a tracking server that does not answer, before MLflow waits on it.

    Also bounds MLflow's HTTP retries (unless the user set them), for this process and the
    jobs it starts, so that a server that dies later fails a call in seconds, not minutes.
    """
    if uri in _checked:
        return
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ("file" if uri.startswith("file:") else "")
    if not _scheme_known(scheme):
        raise _scheme_error(uri)
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise StoreError(f"'{uri}' is not a SQLite file URI — write sqlite:///relative/path.db or "
                         "sqlite:////absolute/path.db")
    if scheme in ("http", "https"):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        probe_server(uri)
    _checked.add(uri)


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise StoreError unless something answers HTTP at ``uri`` within ``timeout`` seconds."""
    import socket
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (401, 404 behind a proxy...): MLflow reports what it says
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            why = f"no answer within {timeout:g} s"
        elif isinstance(reason, socket.gaierror):
            why = f"unknown host: {reason.strerror or reason}"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        else:
            why = str(reason)
        raise StoreError(f"{describe(uri)} does not answer ({why}) — start it, or {ELSEWHERE}") from None


def _connect(path: Path, read_only: bool):
    import sqlite3
    from urllib.parse import quote

    mode = "?mode=ro" if read_only else ""
    # Wait as long as MLflow does (busy_timeout 20 s) on a store other trials are writing.
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}{mode}", uri=True, timeout=20,
                           isolation_level=None)


def has_schema(uri: str) -> bool:
    """Whether an existing SQLite store can be read and holds MLflow's tables (StoreError if it cannot be read).

    A store without them is one whose creation never finished: reading it through MLflow would
    create the tables, which only ``jobs.tracking.prepare_store`` may do (under the lock).
    """
    path = sqlite_path(uri)
    if path is None:
        return True
    try:
        db = _connect(path, read_only=True)
        try:
            names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except Exception as exc:
        raise translate(exc, uri) from exc
    return {"experiments", "alembic_version"} <= names


def check_writable(uri: str) -> None:
    """Raise StoreError unless an existing SQLite store takes a write (rolled back: nothing changes)."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return  # creating it will tell; its directory was writable enough for the lock file
    try:
        db = _connect(path, read_only=False)
        try:
            # A real write: read-only files, directories (no journal) and mounts refuse it, for root too.
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE _lottery_sweeps_write_check (x)")
            db.execute("ROLLBACK")
        finally:
            db.close()
    except Exception as exc:
        raise translate(exc, uri) from exc


# --- the creation lock -----------------------------------------------------------------------------

_held: dict[Path, int] = {}


def _open_lock(lock: Path, required: bool, uri: str) -> int | None:
    """A descriptor on the lock file; None when a reader cannot have one (a read-only place)."""
    try:
        if required:
            lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        try:
            return os.open(lock, os.O_RDONLY)  # another user's lock file: flock works on it all the same
        except OSError:
            if required and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StoreError(f"{describe(uri)} cannot be written: its directory {lock.parent} is read-only "
                                 f"({exc.strerror.lower()}) — make it writable, or {ELSEWHERE}") from exc
            if required:
                raise translate(exc, uri) from exc
            return None  # nobody can create a store here, so there is no creation to wait for


@contextlib.contextmanager
def store_lock(uri: str, required: bool = True) -> Iterator[None]:
    """Hold ``<db>.lock`` (an exclusive flock) while MLflow may create or migrate a SQLite store.

    Processes creating (or migrating) one SQLite store at once corrupt it for good, so every
    process that opens it first holds this lock: the creator (``required``: StoreError if the
    lock file cannot be made) and readers (without it where it cannot be made: a read-only
    place, where nobody creates anything). Other stores need none. Re-entrant within a
    process (flock locks are per open file, so a second one would wait on the first).
    """
    import fcntl

    path = sqlite_path(uri)
    lock = None if path is None else path.resolve().with_name(path.name + ".lock")
    if lock is not None and lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    fd = None if lock is None else _open_lock(lock, required, uri)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    break  # a filesystem without locks (some NFS mounts): SQLite is unsafe there anyway (README)
                if time.monotonic() > deadline:
                    raise StoreError(f"another process has held {lock} for {LOCK_TIMEOUT_S:.0f} s while creating "
                                     f"the store — see which with `fuser {lock}`, or {ELSEWHERE}") from None
                time.sleep(0.05)
        _held[lock] = 1
        try:
            yield
        finally:
            del _held[lock]
    finally:
        os.close(fd)  # releases the lock
