"""Atomic writes and tolerant reads of the tool's own files: outcomes, checkpoints, stages, job records.

Writers put the content in a temp file beside the target, flush and fsync it, rename it over
the target and fsync the directory: a reader sees the old file or the new one, never half of
one, even after a crash or a power cut. A full disk (ENOSPC, EDQUOT) removes the temp file and
raises an OSError whose message is ``no space left on <path>`` (its errno kept), so a trial's
error says which file.

Readers treat a file that is there but unreadable (empty, truncated, garbage: left by a crash of
an older tool or a disk fault) as absent: they warn on stderr naming it, move it aside to
``<name>.corrupt`` and return None, so the caller recomputes instead of failing on every re-run.

Light on purpose (the sweep process imports it): torch is imported only inside ``torch_*``.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What torch.load raises on a damaged file that still ends like a zip archive (a truncated one
# does not, and is caught before torch sees it).
TORCH_CORRUPT = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, OverflowError,
                 IndexError, KeyError, TypeError, struct.error, zipfile.BadZipFile)


class Corrupt(ValueError):
    """A file's content is not what its writer writes; the message says why."""


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc``, if any (torch wraps its writer's OSError in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _no_space(path: Path, exc: BaseException) -> OSError | None:
    """An OSError saying ``no space left on <path>`` (errno kept) when ``exc`` comes from a full disk, else None."""
    full = _disk_full(exc)
    if full is None:
        return None
    error = OSError(f"no space left on {path}")  # just that, without an "[Errno 28]" in front
    error.errno = full.errno
    return error


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (and FUSE mounts) refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, fill: Callable[[int], None], durable: bool = True) -> None:
    """Write ``path`` through ``fill(fd)`` on a temp file beside it, then rename it into place.

    ``durable=False`` skips the fsyncs: still never half a file, but a crash may lose the write
    (for bookkeeping that is cheap to lose and written by the thousand, like queued marks).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fill(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = _no_space(path, exc)
        if full is not None:
            raise full from exc
        raise


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short when the disk fills up)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (and durably, unless told not to)."""
    _atomic(path, lambda fd: _write_all(fd, data), durable)


def write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (and durably, unless told not to)."""
    write_bytes(path, text.encode(), durable)


def write_json(path: str | os.PathLike, value: Any, durable: bool = True) -> None:
    """Replace ``path`` with ``value`` as JSON atomically (and durably, unless told not to)."""
    write_text(path, json.dumps(value), durable)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically and durably."""
    import torch

    def fill(fd: int) -> None:
        # Through a Python file, not a path: torch's own writer loses the errno of a full disk.
        with os.fdopen(os.dup(fd), "wb") as fh:
            torch.save(obj, fh)
            fh.flush()

    _atomic(path, fill)


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def discard(path: str | os.PathLike, reason: str, fd: int | None = None) -> None:
    """Warn that ``path`` is corrupt and move it aside to ``<name>.corrupt`` (kept to look at)."""
    path = Path(path)
    print(f"warning: {path} is corrupt ({reason}); ignoring it", file=sys.stderr, flush=True)
    try:
        # Another process may have replaced it with a good file since we read it: keep that one.
        if fd is not None and os.fstat(fd).st_ino != os.stat(path).st_ino:
            return
        os.replace(path, path.with_name(path.name + ".corrupt"))
    except FileNotFoundError:  # another reader moved it first
        pass


def _shape(value: Any, required: Iterable[str], kind: str) -> None:
    """Raise ``Corrupt`` unless ``value`` is a dict (a ``kind``) holding every key of ``required``."""
    if not isinstance(value, dict):
        raise Corrupt(f"not a {kind}")
    missing = [key for key in required if key not in value]
    if missing:
        raise Corrupt(f"no {missing[0]!r}")


def _parse_json(data: bytes, required: Iterable[str]) -> Any:
    """The JSON object in ``data``, or ``Corrupt`` saying what is wrong with it."""
    if not data.strip():
        raise Corrupt("empty file" if not data else "blank")
    try:
        value = json.loads(data.decode())
    except UnicodeDecodeError:
        raise Corrupt("not UTF-8 text") from None
    except ValueError as exc:
        raise Corrupt(f"invalid JSON: {exc}") from None
    _shape(value, required, "JSON object")
    return value


def read_json(path: str | os.PathLike, required: Iterable[str] = ()) -> dict | None:
    """The JSON object in ``path`` (holding the ``required`` keys); None when missing or corrupt."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    with fh:
        try:
            return _parse_json(fh.read(), required)
        except Corrupt as exc:
            discard(path, str(exc), fh.fileno())
            return None


def _whole_torch_file(fh) -> None:
    """Raise ``Corrupt`` unless the open file ``fh`` ends like the zip archive torch.save writes."""
    # Its directory is at its end: a truncated file has none (torch.load would fail on it in
    # many different ways, an OSError among them).
    if not zipfile.is_zipfile(fh):
        raise Corrupt("empty file" if os.fstat(fh.fileno()).st_size == 0 else "truncated or not a torch file")
    fh.seek(0)


def torch_exists(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a whole torch file (cheap: its end only); a cut-short one is moved aside."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            _whole_torch_file(fh)
        except Corrupt as exc:
            discard(path, str(exc), fh.fileno())
            return False
    return True


def torch_load(path: str | os.PathLike, required: Iterable[str] = ()) -> dict | None:
    """The dict ``torch_save`` wrote to ``path`` (holding the ``required`` keys); None when missing or corrupt."""
    import torch

    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    with fh:
        try:
            _whole_torch_file(fh)
            try:
                value = torch.load(fh, map_location="cpu", weights_only=False)
            except TORCH_CORRUPT as exc:
                raise Corrupt(_first_line(exc)) from None
            _shape(value, required, "dict")
            return value
        except Corrupt as exc:
            discard(path, str(exc), fh.fileno())
            return None


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append ``lines`` to a JSON-lines file in one write on an O_APPEND descriptor, then fsync.

    One write keeps concurrent appenders' lines whole; a crash or a full disk can still leave a
    torn last line, which ``read_jsonl`` skips and the next append starts a new line after.
    """
    path = Path(path)
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
    if not data:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)  # read: its last byte
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # close a torn last line, or ours would be glued to it
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        full = _no_space(path, exc)
        if full is not None:
            raise full from exc
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a JSON-lines file (see ``append_lines``)."""
    append_lines(path, [line])


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """The JSON objects of a JSON-lines file, in order; a torn or invalid line is skipped with a warning."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    required = tuple(required)
    out = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append(_parse_json(line, required))
        except Corrupt as exc:
            print(f"warning: {path} line {number} is corrupt ({exc}); ignoring it", file=sys.stderr, flush=True)
    return out
