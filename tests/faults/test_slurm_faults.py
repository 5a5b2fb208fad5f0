"""A SLURM array task killed mid-trial on the local cluster: the trial reads as interrupted and a re-run completes it once."""
import json

import pytest

from faults.exactly_once import assert_exactly_once, kill, ledger_states, sweep, wait_for, write_sweep
from slurm_cluster import slurm  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]


def _states(path):
    proc = sweep("status", str(path), "--format", "json", cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_killed_array_task_is_interrupted_then_resumed_once(tmp_path):
    path = write_sweep(tmp_path, seeds=2, epochs=8, executor="slurm", timeout_min=10,
                       slurm={"partition": "debug", "cpus_per_task": 1})
    proc = sweep("run", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    victim = wait_for(lambda: next((s for s in ledger_states(path).values()
                                    if s["state"] == "running" and s["holder"]["job_id"]), None), timeout=300)
    job = victim["holder"]["job_id"]
    kill(victim["holder"]["pid"])  # as the OOM killer does: the task dies, SLURM records it FAILED
    interrupted = wait_for(lambda: [t for t in _states(path)["trials"] if t["state"] == "interrupted"], timeout=300)
    assert any(t["job_id"] == job for t in interrupted), interrupted
    assert "a re-run resumes it" in interrupted[0]["error"]
    rerun = sweep("run", str(path), "--wait", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    wait_for(lambda: _states(path)["counts"].get("finished") == 4, timeout=300)
    assert_exactly_once(path)
