"""Divergence is an outcome: a non-finite loss fails the trial with its own message, and nothing
on the way (measurements, metrics, rich's markup) chokes on NaN or swallows what it says."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import TensorDataset

from jobs.checkpoint import Checkpoint
from jobs.config import TrainConfig
from jobs.measure import layer_stats, weight_histograms
from jobs.train import Diverged, make_loader, train

ROOT = Path(__file__).resolve().parents[1]
DIVERGED = re.compile(r"diverged at level \d+ epoch \d+ \(loss (nan|inf)\)")
CPU = torch.device("cpu")


def write_sweep(tmp: Path, name: str, axes: dict[str, str], fixed: dict[str, str] | None = None) -> Path:
    """A digits / LeNet-300-100 sweep (1 epoch unless ``fixed`` says) with its store and folder under ``tmp``."""
    fixed = {"dataset": "digits", "model": "lenet_300_100", "train.epochs": "1", **(fixed or {})}
    lines = [f"name: {name}", f"tracking: sqlite:///{tmp}/store/mlflow.db", "grid:",
             *(f"  {k}: {v}" for k, v in axes.items()), "fixed:", *(f"  {k}: {v}" for k, v in fixed.items()),
             "launcher:", f"  folder: {tmp}/submitit"]
    path = tmp / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_runs(tmp: Path, name: str):
    """The store's client and the sweep's runs, diverged first."""
    client = MlflowClient(f"sqlite:///{tmp}/store/mlflow.db")
    exp = client.get_experiment_by_name(name)
    found = client.search_runs([exp.experiment_id])
    return client, sorted(found, key=lambda r: r.data.tags.get("diverged") != "true")


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m runner.cli ARGS`` in ``tmp``, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def diverging_sweep(tmp_path_factory):
    """One trial at lr 1e6 (diverges in its first epoch) beside a sane one, through the real CLI."""
    tmp = tmp_path_factory.mktemp("divergence")
    path = write_sweep(tmp, "diverging", {"train.lr": "[0.05, 1e6]"})
    return tmp, path, cli(tmp, "run", path.name, "--executor", "debug")


def test_diverging_trial_fails_with_its_message_and_the_sane_one_finishes(diverging_sweep):
    tmp, _, result = diverging_sweep
    assert result.returncode == 1, result.stdout + result.stderr
    assert "finished 1, skipped 0, failed 1" in result.stdout
    failure = next(line for line in result.stderr.splitlines() if "FAILED" in line)
    assert DIVERGED.search(failure) and "lr=1000000.0" in failure, result.stderr
    client, (diverged, sane) = sweep_runs(tmp, "diverging")
    assert diverged.info.status == "FAILED" and sane.info.status == "FINISHED"
    assert diverged.data.tags["diverged"] == "true" and "diverged" not in sane.data.tags
    assert DIVERGED.fullmatch(diverged.data.tags["error"]), diverged.data.tags["error"]
    assert failure.endswith(diverged.data.tags["error"])
    assert diverged.data.params["train.lr"] == "1000000.0"
    # The non-finite loss is logged, not dropped: the curve ends on it.
    losses = client.get_metric_history(diverged.info.run_id, "epoch.train_loss")
    assert len(losses) == 1 and not math.isfinite(losses[0].value)
    trace = Path(client.download_artifacts(diverged.info.run_id, "traceback.txt", str(tmp)))
    assert "Diverged" in trace.read_text()
    # Final, not interrupted: nothing is left for a re-run to resume.
    trial_id = diverged.data.tags["trial_id"]
    assert not Checkpoint(tmp / "submitit" / "checkpoints" / trial_id).path.exists()


def test_status_reports_the_divergence(diverging_sweep):
    tmp, path, _ = diverging_sweep
    listed = cli(tmp, "status", path.name, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    states = {t["name"]: t for t in json.loads(listed.stdout)["trials"]}
    failed = next(t for name, t in states.items() if "lr=1000000.0" in name)
    assert failed["state"] == "diverged" and DIVERGED.fullmatch(failed["error"]), failed
    table = cli(tmp, "status", path.name)
    assert table.returncode == 0, table.stderr
    assert failed["error"] in table.stdout
    # Deterministic training would diverge again: a plain re-run leaves it, --retry-failed takes it.
    again = cli(tmp, "run", path.name, "--executor", "debug", "--dry-run")
    assert again.returncode == 0 and "would run" not in again.stdout, again.stdout
    retry = cli(tmp, "run", path.name, "--executor", "debug", "--dry-run", "--retry-failed")
    assert retry.stdout.count("would run") == 1 and failed["trial_id"] in retry.stdout, retry.stdout


def test_completed_levels_keep_their_rows_when_a_later_level_diverges(tmp_path, monkeypatch):
    # lr alone cannot make level 1 diverge but not level 0: poison the weights level 1 starts from.
    import jobs.trial
    from runner.cli import main

    real_train = jobs.trial.train

    def poisoned(model, *args, level=None, **kwargs):
        if level == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        return real_train(model, *args, level=level, **kwargs)

    monkeypatch.setattr(jobs.trial, "train", poisoned)
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, "later", {"prune.ratio": "[0.5]"}, {"prune.iterations": "2", "train.epochs": "2"})
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "debug"])
    assert result.exit_code == 1, result.output
    assert "diverged at level 1 epoch 0 (loss nan)" in result.output
    client, (run,) = sweep_runs(tmp_path, "later")
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
    assert run.data.tags["error"] == "diverged at level 1 epoch 0 (loss nan)"
    assert run.data.tags["last_level"] == "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0]
    rows = pd.read_csv(client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path)))
    assert rows["level"].tolist() == [0] and rows["accuracy"].iloc[0] > 0.5
    # Level 0's two epochs, then level 1's first epoch: its loss NaN, logged.
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch.train_loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses[:2]) and math.isnan(losses[2])


def test_qat_divergence_names_the_final_level(tmp_path, monkeypatch):
    # train() inside quantize() does not know the level; the trial names it. (A real QAT run at a
    # reckless rate tends to fail in its fake-quant observers before any loss is computed.)
    import jobs.quantization
    from runner.cli import main

    def diverging(model, loader, cfg, device, **kwargs):
        raise Diverged(None, 0, math.inf)

    monkeypatch.setattr(jobs.quantization, "train", diverging)
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, "qat", {"quant": "[qat]"})
    result = CliRunner().invoke(main, ["run", str(path), "--executor", "debug"])
    assert result.exit_code == 1, result.output
    client, (run,) = sweep_runs(tmp_path, "qat")
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
    assert run.data.tags["error"] == "diverged at level 0 epoch 0 (loss inf)"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0]


def test_train_stops_at_the_diverging_epoch():
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 4, (256,))
    loader = make_loader(TensorDataset(x, y), 16, shuffle=True, seed=0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    epochs, steps = [], []
    with pytest.raises(Diverged) as raised:
        train(model, loader, TrainConfig(epochs=3, lr=1e6), CPU, level=4,
              on_epoch=lambda epoch, loss, optimizer, seconds: epochs.append((epoch, loss)),
              on_step=steps.append)
    assert (raised.value.level, raised.value.epoch) == (4, 0)
    assert DIVERGED.fullmatch(str(raised.value)) and str(raised.value).startswith("diverged at level 4 epoch 0")
    # on_epoch sees the diverged epoch (its curve point), and on the CPU the epoch stops at the first bad batch.
    assert len(epochs) == 1 and not math.isfinite(epochs[0][1])
    assert 1 < len(steps) < len(loader)


def test_a_sane_lr_does_not_diverge():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(8, 4))
    losses = []
    train(model, make_loader(TensorDataset(x, y), 16, shuffle=True), TrainConfig(epochs=2, lr=0.05), CPU,
          on_epoch=lambda epoch, loss, optimizer, seconds: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_weight_histograms_report_non_finite_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[0, :3] = math.nan
        model[0].weight[1, :2] = math.inf
        model[0].weight[2, :1] = -math.inf
        model[2].weight.fill_(math.nan)  # no finite weight at all
    hist = weight_histograms(model, bins=10)
    assert list(hist.columns) == ["layer", "bin_left", "bin_right", "count"]
    first, last = hist[hist["layer"] == "0"], hist[hist["layer"] == "2"]
    finite = first[first["bin_left"].map(math.isfinite)]
    assert len(finite) == 10 and finite["count"].sum() == 8 * 16 - 6
    odd = first[~first["bin_left"].map(math.isfinite)]
    assert odd["count"].tolist() == [3, 2, 1]
    assert odd["bin_left"].isna().iloc[0] and odd["bin_left"].iloc[1:].tolist() == [math.inf, -math.inf]
    assert len(last) == 1 and last["bin_left"].isna().all() and last["count"].tolist() == [64]
    # Counts still add up to each layer's nonzero weights (NaN and inf are nonzero).
    nonzero = layer_stats(model, (8,)).set_index("layer")["nonzero"].to_dict()
    assert hist.groupby("layer")["count"].sum().to_dict() == nonzero


def test_every_float_measurement_takes_a_nan_model():
    from jobs.measure import dense_flops, latency
    from jobs.trial import float_row

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
        model[3].weight[0, 0] = math.inf
    batches = [(torch.randn(8, 1, 8), torch.randint(0, 4, (8,)))]
    row = float_row(model, 0, (1, 8), batches, CPU, dense_flops(model, (1, 8)), 0.0)
    assert math.isnan(row["loss"]) and row["nonzero_params"] == row["total_params"]
    assert set(latency(model, (1, 8), batch_sizes=(1,), repeats=1, warmup=0)) == {"latency_ms_b1"}


def test_status_table_keeps_brackets_in_messages(tmp_path, monkeypatch):
    import runner.status
    from runner.cli import main
    from runner.status import TrialStatus

    message = "ValueError: autodetected range of [nan, nan] is not finite [bold]"

    def statuses(trials, sweep, uri, folder):
        return [TrialStatus(trials[0], "failed", error=message, log="[log]")], None

    monkeypatch.setattr(runner.status, "trial_statuses", statuses)
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, "brackets[1]", {"train.lr": "[0.05]"})
    result = CliRunner().invoke(main, ["status", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert message in result.output and "[log]" in result.output and "brackets[1]" in result.output


def test_progress_line_keeps_brackets(capsys):
    from runner.cli import _with_progress

    _with_progress(1, lambda progress: progress(SimpleNamespace(name="digits-[nan, nan]-[bold]"), "failed"))
    assert "failed: digits-[nan, nan]-[bold]" in capsys.readouterr().out
