"""The one error type a malformed sweep raises: it knows the file, line and key path."""
from __future__ import annotations

import difflib
import functools
import re
import sys
from typing import Iterable

from jobs.storeguard import EXIT_STORE, StoreError

EXIT_SPEC = 2


def _one_line(text: object) -> str:
    """Join a message that spans lines (YAML and OS errors may) into one line."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


class SpecError(Exception):
    """A sweep file (or a --set override) that cannot run, with where and what is allowed."""

    def __init__(self, source: str, line: int | None, key: str | None, message: str):
        self.source, self.line = source, line
        self.key = _one_line(key) if key else key
        self.message = _one_line(message)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


def allowed(choices: Iterable[str], got: object) -> str:
    """Describe the allowed values, with a 'did you mean' for a near miss."""
    choices = sorted(str(c) for c in choices)
    text = "allowed: " + ", ".join(choices)
    close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.6)
    if close:
        text += f" (did you mean '{close[0]}'?)"
    return text


def spec_errors(fn):
    """Turn SpecError (exit code 2) and StoreError (exit code 3) into one clear line on stderr, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            import click

            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_SPEC)
        except StoreError as exc:
            import click

            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(EXIT_STORE)

    return wrapper
