"""Is a usable SLURM cluster reachable from here? Skip SLURM tests if not, or fail them in CI.

Bring a local cluster up with `sudo scripts/slurm-local.sh up` (see that script).

How a test module uses this (pick one; both are evaluated lazily, when the test runs)::

    from slurm_cluster import requires_slurm

    @requires_slurm
    def test_something(tmp_path): ...

or, as a fixture (it must be imported into the module so pytest can see it)::

    from slurm_cluster import slurm  # noqa: F401  (pytest fixture)

    def test_something(slurm, tmp_path): ...

Without a cluster the test is skipped with a reason saying how to start one. With
LOTTERY_SWEEPS_REQUIRE_SLURM=1 in the environment (set by .ci/run when it brought the
cluster up) the test fails instead: in CI a missing cluster is a failure, never a skip.
`@requires_slurm` reports FAILED; the `slurm` fixture reports an ERROR at setup.
"""
from __future__ import annotations

import functools
import os
import subprocess

import pytest

REQUIRE_ENV = "LOTTERY_SWEEPS_REQUIRE_SLURM"
HINT = "no SLURM cluster: run `sudo scripts/slurm-local.sh up` (needs root)"
# A node in one of these states takes jobs; a trailing "*" (not responding), down, drained... does not.
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, f"`{cmd[0]}` not found"
    except subprocess.TimeoutExpired:
        return 124, f"`{' '.join(cmd)}` timed out after {timeout:g}s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def slurm_available(timeout: float = 5.0) -> tuple[bool, str]:
    """(True, summary) if sinfo shows a node that takes jobs and sacct works; else (False, reason)."""
    # Fails at once when slurmctld is down, where sinfo would keep retrying for ~9 s.
    rc, out = _run(["scontrol", "ping"], timeout)
    if rc != 0:
        return False, "slurmctld does not answer `scontrol ping`: " + (out.splitlines() or ["?"])[0][:200]
    rc, out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout)
    if rc != 0:
        return False, f"sinfo failed (exit {rc}): {out[-300:]}"
    nodes = [line.split() for line in out.splitlines() if line.strip()]
    usable = [n for n in nodes if len(n) == 2 and n[1] in USABLE_NODE_STATES]
    if not usable:
        return False, f"no idle/mixed node in sinfo: {out[-300:] or '(no nodes)'}"
    rc, out = _run(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"], timeout)
    if rc != 0 or "accounting storage is disabled" in out:
        # Without accounting submitit cannot see job states, and job.result() can hang.
        return False, f"sacct does not work (exit {rc}): {out[-300:]}"
    return True, "nodes: " + ", ".join(" ".join(n) for n in usable)


@functools.lru_cache(maxsize=None)
def _cached_status() -> tuple[bool, str]:
    return slurm_available()  # probed once per pytest process


def slurm_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def ensure_slurm() -> None:
    """Return if SLURM is usable; otherwise skip the current test, or fail it when required."""
    ok, why = _cached_status()
    if ok:
        return
    if slurm_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {HINT}; {why}", pytrace=False)
    pytest.skip(f"{HINT}; {why}")


def requires_slurm(test):
    """Decorator for a test function: skip it (or fail it, in CI) when SLURM is unusable."""

    @functools.wraps(test)  # keeps the signature, so pytest still injects the test's fixtures
    def guarded(*args, **kwargs):
        ensure_slurm()
        return test(*args, **kwargs)

    return guarded


@pytest.fixture(scope="session")
def slurm() -> str:
    """Fixture form of `requires_slurm`; its value is a one-line description of the node(s)."""
    ensure_slurm()
    return _cached_status()[1]
