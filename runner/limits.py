"""Bounds that keep validation finite and reject input that cannot run, before anything runs.

Each check returns a problem (the text after ``must be``/``is``) or None, so that the caller
words the error with its own file, line and key.
"""
from __future__ import annotations

import math
import os
import re
import reprlib
from typing import Any

from jobs.naming import folder_name  # noqa: F401  (re-exported: runner.spec uses it)

# Sweep files are hand-written and a few KB (the shipped ones are under 2 KB); a 10,000-value
# axis written out is about 60 KB. PyYAML's pure-Python scanner reads ~100 KB/s on a loaded
# machine, so this keeps the worst-case parse near a second.
MAX_FILE_BYTES = 128 * 1024
# The deepest real path is include[i].prune.ratio[j] (6 levels); deeper nesting only serves
# to exhaust the recursion of the composer (20k nested '[' overflowed it).
MAX_DEPTH = 32
# Values after alias expansion: a 1 KB "billion laughs" chain expands to 10^9.
MAX_VALUES = 100_000
# Grid points before expansion; raised per sweep with launcher.max_trials, up to the ceiling
# (expanding a million points takes minutes and a few GB, which is a decision, not a typo).
DEFAULT_MAX_TRIALS = 10_000
MAX_TRIALS_CEILING = 1_000_000
MAX_NAME = 200  # the folder name is the name plus a hash; file names stop at 255 bytes
MAX_TEXT = 4096  # PATH_MAX: the longest path or shell line worth passing on
INT32 = 2**31 - 1  # SLURM and torch store counts in 32-bit fields
MAX_SEED = 2**32 - 1  # numpy's seed range; torch takes more, numpy does not
# The lottery-ticket paper's longest schedule is ~30 levels (20% per level to 99.9%); each level
# retrains the model, so 100 is generous, while 10^6 levels is a typo that would run forever.
MAX_ITERATIONS = 100
MAX_CUDA_INDEX = 1023

# Stores every job can reach (what jobs/storeguard.py serves, less bare paths and in-memory SQLite,
# which each job would resolve or create on its own). Databases may name a driver: postgresql+psycopg2://.
TRACKING_SCHEMES = ("sqlite:///", "file://", "http://", "https://", "postgresql://", "mysql://", "mssql://",
                    "databricks")
_DRIVER = re.compile(r"(postgresql|mysql|mssql)\+[A-Za-z0-9_]+://")

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 8, 6, 3


def shown(value: Any) -> str:
    """A short repr for messages: a 100,000-value list must not become a 1 MB error line."""
    return _REPR.repr(value)


def printable(text: object, limit: int = 100) -> str:
    """User text for a message: control characters and lone surrogates escaped, long text cut."""
    text = str(text)
    cut = text[:limit]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return out + ("..." if len(text) > limit else "")


def _bad_char(text: str, allow: str = "") -> str | None:
    """The first character that cannot travel in a name, a path or an #SBATCH line, described."""
    for i, c in enumerate(text):
        if c in allow:
            continue
        code = ord(c)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"control character {repr(c)[1:-1]} at position {i}"
        if 0xD800 <= code <= 0xDFFF:
            return f"lone surrogate \\u{code:04x} at position {i} (not encodable as UTF-8)"
    return None


def text_problem(text: str, limit: int = MAX_TEXT, allow: str = "") -> str | None:
    """Why a string cannot be used (control characters, surrogates, length), or None."""
    bad = _bad_char(text, allow)
    if bad:
        return f"contains a {bad}; control characters and line breaks are not allowed"
    if len(text) > limit:
        return f"is {len(text)} characters long; at most {limit}"
    return None


def number_problem(value: Any, upper: int = INT32) -> str | None:
    """Floats must be finite and integers fit the 32-bit fields they end up in."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > upper:
        return f"must be at most {upper}" if value > 0 else f"must be at least {-upper}"
    return None


def _device_ok(value: str) -> bool:
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d{1,4}))?", value)
    return bool(match) and (match.group(1) is None or int(match.group(1)) <= MAX_CUDA_INDEX)


def _layer_rates_ok(value: str) -> bool:
    """Every ``name:factor`` names a layer once, with a finite factor > 0 (``output:.`` crashed a trial)."""
    names = set()
    for item in (part.strip() for part in value.split(",") if part.strip()):
        name, sep, factor = (x.strip() for x in item.partition(":"))
        try:
            number = float(factor)
        except ValueError:
            return False
        if not sep or not name or name in names or not (math.isfinite(number) and number > 0):
            return False
        names.add(name)
    return True


# Tighter than jobs/config.py's checks; each is applied after the schema's own.
SETTING_BOUNDS = {
    "prune.iterations": (lambda v: 1 <= v <= MAX_ITERATIONS, f"in 1..{MAX_ITERATIONS}"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED} (numpy's seed range)"),
    "device": (_device_ok, f"auto, cpu, cuda or cuda:N with N in 0..{MAX_CUDA_INDEX}"),
    "prune.layer_rates": (_layer_rates_ok, "name:factor pairs, comma-separated, each layer once, "
                                           "factors finite and > 0"),
}


def setting_problem(key: str, value: Any) -> str | None:
    """Why a setting value is out of bounds beyond its schema (finite, 32-bit, sane text), or None."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            return f"{shown(value)} {problem}"
    elif key != "seed":
        problem = number_problem(value)
        if problem:
            return f"{shown(value)} is not allowed; {problem}"
    bound = SETTING_BOUNDS.get(key)
    if bound and not bound[0](value):
        return f"{shown(value)} is not allowed; must be {bound[1]}"
    return None


def tracking_problem(uri: str) -> str | None:
    """A tracking URI must name a store MLflow can share between jobs: a known scheme and a target."""
    problem = text_problem(uri)
    if problem:
        return problem
    if re.fullmatch(r"databricks(-uc)?(://\S+)?", uri):  # a profile, or none: the default one
        return None
    driver = _DRIVER.match(uri)
    scheme = driver.group(0) if driver else next((s for s in TRACKING_SCHEMES[:-1] if uri.startswith(s)), None)
    if scheme is None:
        return (f"unknown store '{printable(uri)}'; allowed schemes: {', '.join(TRACKING_SCHEMES)} "
                "(databases also with a driver, e.g. postgresql+psycopg2://)")
    if not uri[len(scheme):].strip("/"):
        return f"'{printable(uri)}' names no database, host or path after {scheme}"
    return None


def folder_problem(folder: str) -> str | None:
    """A job folder must be a real, non-root path: '' is the working dir's files, '/' the whole disk."""
    if not folder.strip():
        return f"{shown(folder)} is empty; give a folder for the job logs or leave folder out"
    if os.path.normpath(folder).strip("/") == "":
        return f"{shown(folder)} is the filesystem root; give a folder of its own"
    return None


def setup_problem(lines: list) -> str | None:
    """Each setup entry is one shell line: a newline inside one would start an unchecked command."""
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            return "expected a list of shell lines (text)"
        problem = text_problem(line)
        if problem:
            return f"line {i + 1} {shown(line)} {problem}"
    return None


def parameters_problem(params: dict) -> str | None:
    """Each extra #SBATCH option must stay one line with a plain option name."""
    for key, value in params.items():
        problem = parameter_problem(key, value)
        if problem:
            return problem if problem.startswith("option name") else f"{printable(key)}: {problem}"
    return None


def parameter_problem(key: Any, value: Any) -> str | None:
    """An additional #SBATCH option: a plain option name and one scalar value on one line."""
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", key):
        return f"option name '{printable(key)}' is not an #SBATCH option name (letters, digits, - and _)"
    if isinstance(value, (dict, list)) or value is None:
        return f"expected text, a number or true/false, got {shown(value)}"
    problem = text_problem(value) if isinstance(value, str) else number_problem(value)
    if problem and not isinstance(value, str):
        problem = f"is not allowed; {problem}"
    return problem and f"{shown(value)} {problem}"


def grid_size(axes: dict[str, list], include: list[dict[str, list]]) -> int:
    """Grid points before expansion: the product of the axes plus each include rule's sub-grid."""
    size = math.prod(len(v) for v in axes.values())
    for rule in include:
        size += math.prod(len(v) for v in {**axes, **rule}.values())
    return size
