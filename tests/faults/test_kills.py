"""Processes killed mid-sweep, re-runs beside orphans, two submissions at once: each trial runs once."""
import pytest

from faults.exactly_once import (assert_exactly_once, kill, ledger_states, running_holders, start, sweep, wait_for,
                                 write_sweep)

pytestmark = pytest.mark.slow


def test_kill_a_worker_and_sweep_run_then_rerun(tmp_path):
    path = write_sweep(tmp_path, epochs=4)
    proc = start("run", str(path), cwd=tmp_path)
    victim = wait_for(lambda: running_holders(path))[0]
    kill(victim)
    kill(proc.pid)
    proc.wait()
    status = sweep("status", str(path), "--format", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert '"interrupted"' in status.stdout or '"finished"' in status.stdout
    # The surviving worker is an orphan now; the re-run must neither run its trial again nor wait forever.
    rerun = sweep("run", str(path), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_exactly_once(path)


def test_rerun_while_an_orphan_is_mid_trial(tmp_path):
    path = write_sweep(tmp_path, epochs=6)
    proc = start("run", str(path), cwd=tmp_path)
    wait_for(lambda: running_holders(path))
    kill(proc.pid)  # the command and nothing else: its workers live on as orphans
    proc.wait()
    orphans = running_holders(path)
    assert orphans
    rerun = sweep("run", str(path), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    held = [s for s in ledger_states(path).values() if s["holder"] and s["holder"]["pid"] in orphans]
    assert held, "the orphans' trials should be recorded as run by them"
    assert_exactly_once(path)


def test_status_counts_only_what_runs(tmp_path):
    path = write_sweep(tmp_path, seeds=5, epochs=4)
    proc = start("run", str(path), cwd=tmp_path)
    wait_for(lambda: running_holders(path))
    status = sweep("status", str(path), "--format", "json", cwd=tmp_path)
    import json

    counts = json.loads(status.stdout)["counts"]
    assert counts.get("running", 0) <= 2, counts  # two workers: never more than two running
    assert counts.get("failed", 0) == 0 and counts.get("queued", 0) + counts.get("running", 0) > 0, counts
    assert proc.wait(timeout=600) == 0
    assert_exactly_once(path)


@pytest.mark.parametrize("existing_store", [False, True])
def test_two_submissions_at_once(tmp_path, existing_store):
    path = write_sweep(tmp_path, seeds=3)
    if existing_store:
        first = sweep("run", str(path), "--set", "seed=[0]", cwd=tmp_path)
        assert first.returncode == 0, first.stdout
    a, b = start("run", str(path), cwd=tmp_path), start("run", str(path), cwd=tmp_path)
    outputs = [(p.wait(timeout=600), p.stdout.read()) for p in (a, b)]
    codes = sorted(code for code, _ in outputs)
    # Either the second was refused while the first ran, or it started after and found nothing to do.
    refused = [out for code, out in outputs if code == 4]
    assert codes in ([0, 4], [0, 0]), outputs
    for out in refused:
        assert "is already being run by pid" in out and "Traceback" not in out
    assert_exactly_once(path)


def test_two_different_sweeps_in_one_fresh_directory(tmp_path):
    paths = [write_sweep(tmp_path, name=n, seeds=2) for n in ("one", "two")]
    for p in paths:  # one store for both, created by whichever gets there first
        p.write_text(p.read_text().replace(f"tracking: sqlite:///{tmp_path}/{p.stem}.db",
                                           f"tracking: sqlite:///{tmp_path}/one.db"))
    procs = [start("run", str(p), cwd=tmp_path) for p in paths]
    outputs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    assert [code for code, _ in outputs] == [0, 0], outputs
    status = sweep("status", str(paths[1]), "--format", "json", cwd=tmp_path)
    assert status.returncode == 0 and '"finished": 4' in status.stdout, status.stdout + status.stderr


def test_cancel_interrupts_a_local_run_and_a_rerun_resumes(tmp_path):
    path = write_sweep(tmp_path, epochs=5)
    proc = start("run", str(path), cwd=tmp_path)
    wait_for(lambda: running_holders(path))
    cancel = sweep("cancel", str(path), cwd=tmp_path)
    assert cancel.returncode == 0 and "interrupted the `sweep run`" in cancel.stdout, cancel.stdout + cancel.stderr
    assert proc.wait(timeout=120) != 0
    import json

    counts = json.loads(sweep("status", str(path), "--format", "json", cwd=tmp_path).stdout)["counts"]
    assert counts.get("running", 0) == 0 and counts.get("interrupted", 0) >= 1, counts
    rerun = sweep("run", str(path), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_exactly_once(path)
