"""Sweeps on a real SLURM cluster: arrays, fire and forget, status, cancel, retry, preemption, time
limits and 32 trials writing to one SQLite store at once.

Needs the local cluster (`scripts/slurm-local.sh up`, root); CI brings it up and sets
LOTTERY_SWEEPS_REQUIRE_SLURM=1 so these tests fail instead of skipping there.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.config import SETTINGS, from_flat
from jobs.trial import execute
from runner import scheduler
from runner.cli import main
from runner.spec import load_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm")]
ROOT = Path(__file__).resolve().parents[1]
FINAL = ("accuracy", "loss", "sparsity", "nonzero_params", "quant.accuracy", "quant.loss")


def write(tmp: Path, name: str, body: str, **launcher) -> Path:
    """A sweep file for the local cluster, with its store and submitit folder in ``tmp``."""
    opts = {"executor": "slurm", "max_parallel": 8, "folder": str(tmp / f"submitit-{name}"), "timeout_min": 10,
            **launcher}
    slurm = {"partition": "debug", "cpus_per_task": 1, **opts.pop("slurm", {})}
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\ntracking: sqlite:///{tmp}/{name}.db\n" + textwrap.dedent(body)
                    + "launcher: " + json.dumps({**opts, "slurm": slurm}) + "\n")
    return path


def sweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `sweep` command as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def status(path: Path) -> dict:
    proc = sweep("status", str(path), "--format", "json", cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {proc.stdout[:500]!r} (stderr {proc.stderr[-500:]!r})") from None


def wait_until(path: Path, predicate, timeout: float = 300, every: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = status(path)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"timed out waiting; last status: {json.dumps(current)[:2000]}"
        time.sleep(every)


def runs(path: Path, name: str):
    client = MlflowClient(f"sqlite:///{path.parent}/{name}.db")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


QUICK = """\
grid:
  seed: [0, 1, 2, 3]
fixed:
  dataset: synthetic
  dataset.train_size: 64
  train.epochs: 1
  prune.ratio: 0.5
"""


def test_fire_and_forget_then_status(tmp_path):
    path = write(tmp_path, "faf", QUICK)
    start = time.monotonic()
    proc = sweep("run", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60  # returns after submitting, not after running
    assert "submitted 4 trials as job array(s)" in proc.stdout and "sweep status" in proc.stdout
    array = proc.stdout.split("job array(s) ")[1].split(";")[0]
    records = (tmp_path / "submitit-faf" / "jobs.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["job_id"] for r in records) == [f"{array}_{i}" for i in range(4)]
    final = wait_until(path, lambda s: s["counts"].get("finished") == 4)
    assert all(t["job_id"].startswith(array + "_") for t in final["trials"])
    assert all(t["last_level"] == "1" and t["elapsed"] for t in final["trials"])
    _, found = runs(path, "faf")
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 4
    assert {r.data.tags["slurm_job_id"] for r in found} == {array}
    assert {r.data.tags["executor"] for r in found} == {"slurm"}
    again = sweep("run", str(path), cwd=tmp_path)
    assert "nothing to do" in again.stdout
    # Without accounting (no sacct on PATH) status still answers from the store and squeue,
    # and says what it cannot know.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "scontrol", "scancel"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "status", str(path), "--format", "json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    blind = json.loads(proc.stdout)
    assert blind["counts"] == {"finished": 4} and "sacct unavailable" in blind["note"]


def test_arrays_are_chunked_under_max_array_size(tmp_path, monkeypatch):
    path = write(tmp_path, "chunks", QUICK)
    monkeypatch.setattr(scheduler, "max_array_size", lambda default=1001: 3)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(path), "--wait"])
    assert result.exit_code == 0, result.output
    arrays = result.output.split("job array(s) ")[1].split(";")[0].split(", ")
    assert len(arrays) == 2  # 4 trials in arrays of at most 3
    jobs = [json.loads(line)["job_id"] for line in (tmp_path / "submitit-chunks" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j.split("_")[0] for j in jobs) == sorted([arrays[0]] * 3 + [arrays[1]])
    assert "finished 4, skipped 0, failed 0" in result.output


SLOW_AND_FAST = """\
grid:
  train.epochs: [1, 40]
fixed:
  dataset: synthetic
  dataset.train_size: 256
  model: resnet18
"""


def test_cancel_then_retry_failed_resumes(tmp_path):
    path = write(tmp_path, "cancel", SLOW_AND_FAST, checkpoint_every_s=0)  # progress to keep within seconds
    assert sweep("run", str(path), cwd=tmp_path).returncode == 0
    current = wait_until(path, lambda s: {t["state"] for t in s["trials"]} >= {"running"}
                         and any(t["state"] == "running" and "train.epochs=40" in t["name"] for t in s["trials"]))
    slow = next(t for t in current["trials"] if "train.epochs=40" in t["name"])
    time.sleep(8)  # let it train (and checkpoint) a few epochs
    proc = sweep("cancel", str(path), "--trial", slow["trial_id"], cwd=tmp_path)
    assert proc.returncode == 0 and f"cancelled {slow['trial_id']}" in proc.stdout, proc.stdout + proc.stderr
    after = wait_until(path, lambda s: next(t for t in s["trials"] if t["trial_id"] == slow["trial_id"])["state"]
                       == "cancelled")
    assert next(t for t in after["trials"] if t["trial_id"] != slow["trial_id"])["state"] in ("finished", "running",
                                                                                               "queued")
    wait_until(path, lambda s: s["counts"].get("finished") == 1)
    dry = sweep("run", str(path), "--retry-failed", "--dry-run", cwd=tmp_path)
    assert dry.stdout.count("would run") == 1 and slow["trial_id"] in dry.stdout
    checkpoint = tmp_path / "submitit-cancel" / "checkpoints" / slow["trial_id"] / "checkpoint.pt"
    assert checkpoint.exists()  # the cancelled trial kept its progress
    proc = sweep("run", str(path), "--retry-failed", "--wait", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished 1, skipped 1, failed 0" in proc.stdout
    _, found = runs(path, "cancel")
    assert sorted(r.info.status for r in found) == ["FINISHED", "FINISHED"]  # resumed in the same run
    resumed = next(r for r in found if r.data.tags["trial_id"] == slow["trial_id"])
    assert resumed.data.tags.get("resumed") == "true"


INTERRUPTED = """\
fixed:
  dataset: synthetic
  dataset.train_size: 256
  model: resnet18
  train.epochs: 8
  prune.ratio: 0.6
  prune.iterations: 2
  prune.method: random_global
  quant: dynamic
  seed: 7
"""


def _final(path, name):
    client, found = runs(path, name)
    assert len(found) == 1, [r.info.status for r in found]
    run = found[0]
    for key in ("accuracy", "sparsity"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1, 2], (name, key, steps)  # every level once, none twice
    return run.info.status, {k: run.data.metrics[k] for k in FINAL}, run.data.tags


def test_requeue_and_time_limit_resume_with_identical_results(tmp_path):
    # A checkpoint every epoch (not every minute): each 1-minute allocation must make progress.
    requeued = write(tmp_path, "requeued", INTERRUPTED, checkpoint_every_s=0)
    # SLURM signals USR2 about 30 s before the 1-minute limit; submitit checkpoints and requeues.
    limited = write(tmp_path, "limited", INTERRUPTED, timeout_min=1, max_requeues=30, checkpoint_every_s=0,
                    slurm={"signal_delay_s": 30})
    for path in (requeued, limited):
        proc = sweep("run", str(path), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Requeue the running trial once it has checkpointed some progress.
    progress = tmp_path / "submitit-requeued" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(progress.glob("*/checkpoint.pt")):
        assert time.monotonic() < deadline, "the trial never checkpointed"
        time.sleep(0.5)
    job_id = status(requeued)["trials"][0]["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Meanwhile, the same trial uninterrupted, in this process, with the job's one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = execute(from_flat(load_spec(requeued).fixed)).rows
    finally:
        torch.set_num_threads(threads)
    expected = {"accuracy": reference[2]["accuracy"], "loss": reference[2]["loss"],
                "sparsity": reference[2]["sparsity"], "nonzero_params": reference[2]["nonzero_params"],
                "quant.accuracy": reference[3]["accuracy"], "quant.loss": reference[3]["loss"]}
    for path, name in ((requeued, "requeued"), (limited, "limited")):
        wait_until(path, lambda s: s["counts"].get("finished") == 1 or s["counts"].get("failed"), timeout=600)
        run_status, metrics, tags = _final(path, name)
        assert run_status == "FINISHED"
        assert tags.get("resumed") == "true", f"{name} was never interrupted"
        assert metrics == pytest.approx(expected, abs=0), name  # identical to the uninterrupted run
        job_id = status(path)["trials"][0]["job_id"]
        info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        restarts = int(info.split("Restarts=")[1].split()[0])
        assert restarts >= 1, f"{name}: SLURM never requeued job {job_id}"


def test_32_concurrent_trials_into_one_sqlite_store(tmp_path):
    body = """\
    grid:
      seed: [%s]
    fixed:
      dataset: synthetic
      dataset.train_size: 64
      train.epochs: 1
      prune.ratio: 0.7
      prune.iterations: 3
      quant: dynamic
    """ % ", ".join(map(str, range(32)))
    path = write(tmp_path, "many", body, max_parallel=32, timeout_min=30)
    proc = sweep("run", str(path), "--wait", cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished 32, skipped 0, failed 0" in proc.stdout
    client, found = runs(path, "many")
    assert len(found) == 32 and len({r.data.tags["trial_id"] for r in found}) == 32
    for run in found:
        assert run.info.status == "FINISHED"
        assert len(run.data.params) == len(SETTINGS)
        for key in ("accuracy", "loss", "sparsity", "nonzero_params", "flops", "train_time_s", "size_bytes"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2, 3], key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "quant.accuracy")] == [3]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [
            "config.json", "curves.csv", "layers.csv", "results.csv", "weight_histograms.csv"]
    # They really ran at once: at some instant all 32 array tasks were running.
    array = found[0].data.tags["slurm_job_id"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", array, "--parsable2"],
                         capture_output=True, text=True, check=True).stdout
    spans = [line.split("|")[1:] for line in out.splitlines() if "_" in line.split("|")[0]]
    assert len(spans) == 32
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, "not all 32 tasks overlapped"


SHARED = """\
grid:
  prune.ratio: [0.5, 0.8]
  quant: [none, dynamic]
fixed:
  dataset: synthetic
  dataset.train_size: 64
  train.epochs: 2
  prune.iterations: 2
  seed: 3
"""


def _sacct_spans(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines() if line.strip()}


def test_a_shared_dense_model_is_a_stage_job_the_trials_arrays_depend_on(tmp_path):
    path = write(tmp_path, "stages", SHARED)
    proc = sweep("run", str(path), "--wait", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dense stages first: 1 stage job(s)" in proc.stdout
    assert "level stages: 5 to train (naive 12)" in proc.stdout
    assert "finished 4, skipped 0, failed 0" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "submitit-stages" / "jobs.jsonl").read_text().splitlines()]
    stage = next(r for r in records if r["trial_id"].startswith("stage:"))
    trials = [r for r in records if not r["trial_id"].startswith("stage:")]
    assert len(trials) == 4 and len({r["job_id"] for r in trials}) == 2  # one array task per trajectory
    spans = _sacct_spans([stage["job_id"].split("_")[0]] + sorted({r["job_id"].split("_")[0] for r in trials}))
    assert spans[stage["job_id"]][2] == "COMPLETED"
    stage_end = spans[stage["job_id"]][1]
    for record in trials:  # the dependency held: no trial job started before the stage ended
        assert spans[record["job_id"]][0] >= stage_end, (record, spans)
    _, found = runs(path, "stages")
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 4
    key = stage["trial_id"].split(":", 1)[1]
    reused = sorted(r.data.tags.get("reused_levels") for r in found)
    assert reused == ["0", "0", "0-2", "0-2"]  # the dense model from the stage job; each trajectory once
    assert {r.data.tags["reused_from"] for r in found if r.data.tags["reused_levels"] == "0"} == {key}
