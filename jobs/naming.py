"""Folder names for sweep names: shared by the sweep folder (runner) and the artifact folder (jobs)."""
from __future__ import annotations

import hashlib
import re

# A name that is already a safe folder name keeps it; anything else gets a hash of the exact
# name after a '+', a character safe names never contain, so the two kinds cannot collide.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def folder_name(name: str) -> str:
    """A file-system-safe, collision-free folder name for a sweep name (never '.', '..' or hidden)."""
    if _SAFE_NAME.fullmatch(name):
        return name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "sweep"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{slug}+{digest}"
