"""A sweep file in, an MLflow store and a CSV out: debug and local executors, end to end."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.pruning import target_sparsity
from runner.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, name: str = "tiny", extra: str = "") -> Path:
    """A 4-trial digits sweep plus, via include, one trial that fails (its data is missing)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        description: end-to-end test sweep
        tracking: sqlite:///{tmp_path}/store/mlflow.db
        grid:
          prune.ratio: [0, 0.8]
          quant: [none, static]
        fixed:
          dataset: digits
          model: lenet_300_100
          prune.method: l1_global
          prune.iterations: 2
          train.epochs: 2
        launcher:
          folder: {tmp_path}/submitit
        """) + extra)
    return path


FAILING = """\
include:
  - dataset: mnist
    dataset.root: {root}
    prune.ratio: 0
    quant: none
"""


def runs(uri: str, name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def debug_sweep(tmp_path_factory):
    """Run the tiny sweep once with the debug executor; several tests read its results."""
    tmp = tmp_path_factory.mktemp("e2e")
    path = write_sweep(tmp, extra=FAILING.format(root=tmp / "no-data-here"))
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "debug"])
    return tmp, path, result, f"sqlite:///{tmp}/store/mlflow.db"


def test_run_records_every_trial(debug_sweep):
    tmp, path, result, uri = debug_sweep
    assert result.exit_code == 1, result.output  # one trial failed
    assert "finished 4, skipped 0, failed 1" in result.output
    client, found = runs(uri, "tiny")
    assert sorted(r.info.status for r in found) == ["FAILED"] + ["FINISHED"] * 4
    for run in found:
        assert run.data.tags["sweep"] == "tiny" and len(run.data.tags["trial_id"]) == 12
        assert run.data.tags["executor"] == "debug"
        assert run.data.params["model"] == "lenet_300_100"
        assert {"prune.ratio", "train.epochs", "quant.backend", "seed"} <= set(run.data.params)
    failed = next(r for r in found if r.info.status == "FAILED")
    assert "DatasetMissingError" in failed.data.tags["error"]
    trace = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp)))
    assert "Traceback" in trace.read_text() and "dataset.download" in trace.read_text()
    pruned = [r for r in found if r.data.params["prune.ratio"] == "0.8"]
    assert len(pruned) == 2
    for run in pruned:
        history = client.get_metric_history(run.info.run_id, "sparsity")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
        assert {"accuracy", "loss", "nonzero_params", "flops", "train_time_s"} <= set(run.data.metrics)
    static = next(r for r in pruned if r.data.params["quant"] == "static")
    assert {"quant.accuracy", "quant.size_bytes", "quant.latency_ms"} <= set(static.data.metrics)
    assert static.data.metrics["quant.size_bytes"] < 0.5 * static.data.metrics["size_bytes"]


def test_export_is_tidy(debug_sweep):
    tmp, path, _, _ = debug_sweep
    out = tmp / "results.csv"
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    # dense/none 1 row, dense/static 2, pruned/none 3 levels, pruned/static 3 + 1, failed 1
    assert len(df) == 11
    assert df["trial_id"].nunique() == 5
    assert {"prune.ratio", "quant", "level", "stage", "accuracy", "sparsity", "status"} <= set(df.columns)
    ok = df[df["status"] == "FINISHED"]
    float_rows = ok[ok["stage"] == "float"]
    for _, row in float_rows.iterrows():
        expected = target_sparsity(row["prune.ratio"], 2, row["level"]) if row["prune.ratio"] else 0.0
        assert row["sparsity"] == pytest.approx(expected, abs=1e-3)
    assert (ok["accuracy"] > 0.5).all()  # chance is 0.1 on digits
    quant_rows = ok[ok["stage"] == "static"]
    assert len(quant_rows) == 2 and quant_rows["size_bytes"].notna().all()
    assert df.loc[df["status"] == "FAILED", "level"].isna().all()


def test_rerun_skips_finished_trials(debug_sweep):
    tmp, path, _, uri = debug_sweep
    plan = CliRunner().invoke(main, ["plan", str(path), "--format", "json"])
    import json

    rows = json.loads(plan.output)["trials"]
    assert sum(r["finished"] for r in rows) == 4 and len(rows) == 5
    again = CliRunner().invoke(main, ["run", str(path), "--executor", "debug"])
    assert "finished 0, skipped 4, failed 1" in again.output
    _, found = runs(uri, "tiny")
    assert sum(r.info.status == "FINISHED" for r in found) == 4
    assert sum(r.info.status == "FAILED" for r in found) == 2  # the failing trial was retried


def test_dry_run_submits_nothing(tmp_path):
    path = write_sweep(tmp_path, name="dry")
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0 and result.output.count("would run") == 4
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_local_executor_runs_trials_as_processes(tmp_path):
    path = write_sweep(tmp_path, name="local")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # The console script, as users run it (it exits without interpreter teardown).
    proc = subprocess.run([str(Path(sys.executable).parent / "sweep"), "run", str(path), "--executor", "local",
                           "--max-parallel", "2", "--set", "prune.ratio=[0.8]"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished 2, skipped 0, failed 0" in proc.stdout
    assert "Traceback" not in proc.stderr
    _, found = runs(f"sqlite:///{tmp_path}/store/mlflow.db", "local")
    assert sorted(r.info.status for r in found) == ["FINISHED", "FINISHED"]
    for run in found:  # where each trial's time went
        assert run.data.metrics["compute_time_s"] > 0 and run.data.metrics["tracking_time_s"] > 0
        assert run.data.metrics["stage_wait_time_s"] >= 0 and run.data.metrics["io_time_s"] > 0  # data, checkpoints
    # The workers' controllers wrote to the sweep folder, not to our (piped) stdout.
    assert (tmp_path / "submitit" / "local-controllers.log").exists()
    # The two trials differ only in quantization: one trajectory, so one worker process (started
    # by submitit) ran both, and the second loaded the first's levels instead of training them.
    logs = list((tmp_path / "submitit").glob("*_log.out"))
    assert len(logs) == 1
    assert sorted(r.data.tags.get("reused_levels", "") for r in found) == ["", "0-2"]


@pytest.mark.slow
def test_local_workers_mode_refuses_a_store_it_cannot_create_before_starting_workers(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where the store's directory should be")
    path = write_sweep(tmp_path, name="nostore")
    path.write_text(path.read_text().replace(f"sqlite:///{tmp_path}/store/mlflow.db",
                                             f"sqlite:///{tmp_path}/not-a-dir/mlflow.db"))
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "local", "--set", "prune.ratio=[0.8]"])
    # One line with the cause and what to do, exit 3 (a store error), and no worker started.
    assert result.exit_code == 3, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"{tmp_path}/not-a-dir/mlflow.db does not exist and cannot be created" in error[0]
    assert "finished 0, skipped" not in result.output and not list(tmp_path.rglob("claims/*.creator"))


@pytest.mark.slow
def test_job_error_is_the_last_line_of_the_jobs_traceback(tmp_path):
    import submitit

    from runner.launch import job_error

    job = submitit.LocalExecutor(folder=tmp_path).submit(int, "bad value")  # fails in a real local job
    with pytest.raises(Exception) as failed:
        job.result()
    assert job_error(failed.value) == "ValueError: invalid literal for int() with base 10: 'bad value'"
    assert job_error(RuntimeError("one\ntwo")) == "two"
    assert job_error(RuntimeError()) == "RuntimeError"
