"""A trial stopped at any point resumes from its checkpoint, in the same MLflow run, with the same numbers."""
import time

import pytest
from mlflow.tracking import MlflowClient

from jobs.checkpoint import Checkpoint
from jobs.config import from_flat, to_flat
from jobs.tracking import TrialRun
from jobs.task import TrialJob
from jobs.trial import execute, run_trial
from runner.store import prepare

SETTINGS = {"dataset": "synthetic", "dataset.train_size": 256, "prune.ratio": 0.8, "prune.iterations": 2,
            "prune.method": "random_global", "train.epochs": 2, "quant": "dynamic", "seed": 5}


class Preempted(BaseException):
    """Stands in for the process being killed: not an Exception, so nothing records a failure."""


def numbers(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("train_time", "latency", "peak_"))} for r in rows]


def interrupt_after(level, stage="float"):
    def on_row(row):
        if row["level"] == level and row["stage"] == stage:
            raise Preempted

    return on_row


@pytest.mark.parametrize("level", [0, 1])
def test_execute_resumes_at_the_last_level(tmp_path, level):
    cfg = from_flat(SETTINGS)
    expected = numbers(execute(cfg).rows)
    checkpoint = Checkpoint(tmp_path)
    with pytest.raises(Preempted):
        execute(cfg, interrupt_after(level), checkpoint)
    state = checkpoint.load()
    # the level's row was produced but the "level done" checkpoint not yet written
    assert (state["level"], state["epoch"]) == (level, 2)
    resumed = []
    rows = execute(cfg, resumed.append, checkpoint).rows
    assert numbers(rows) == expected
    assert [r["level"] for r in resumed] == [r["level"] for r in expected[level:]]


class StopAfterSaving(Checkpoint):
    """A checkpoint whose process dies right after writing a given (level, epoch)."""

    def __init__(self, directory, level, epoch):
        super().__init__(directory)
        self.stop_at = (level, epoch)

    def save(self, state):
        super().save(state)
        if (state["level"], state["epoch"]) == self.stop_at:
            raise Preempted


@pytest.mark.parametrize("level,epoch", [(0, 1), (1, 1), (2, 1), (3, 0)])
def test_execute_resumes_mid_level_with_optimizer_state(tmp_path, level, epoch):
    cfg = from_flat(SETTINGS)
    expected = numbers(execute(cfg).rows)
    with pytest.raises(Preempted):
        execute(cfg, checkpoint=StopAfterSaving(tmp_path, level, epoch))
    state = Checkpoint(tmp_path).load()
    assert (state["level"], state["epoch"]) == (level, epoch)
    if epoch:
        assert state["optimizer"] is not None  # momentum buffers survive the interruption
    assert state["masked"] == (level > 0)
    assert numbers(execute(cfg, checkpoint=Checkpoint(tmp_path)).rows) == expected


class Recording(Checkpoint):
    """A checkpoint that remembers the (level, epoch) of every write, each taking ``cost`` seconds."""

    def __init__(self, directory, cost=0.0):
        super().__init__(directory)
        self.writes, self.cost = [], cost

    def save(self, state):
        super().save(state)
        time.sleep(self.cost)
        self.writes.append((state["level"], state["epoch"]))


def test_checkpoints_within_a_level_are_spaced_out_and_every_level_end_is_kept(tmp_path):
    cfg = from_flat(SETTINGS)
    every_epoch = Recording(tmp_path / "a")
    expected = numbers(execute(cfg, checkpoint=every_epoch).rows)
    # 2 epochs at each of levels 0..2, then each level's end: (level + 1, 0).
    assert every_epoch.writes == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    # A write of 0.25 s spaces writes 5 s apart (20 times its cost): these levels take far less.
    spaced = Recording(tmp_path / "b", cost=0.25)
    assert numbers(execute(cfg, checkpoint=spaced, checkpoint_every_s=3600).rows) == expected
    assert spaced.writes == [(1, 0), (2, 0), (3, 0)]
    # Stopped mid-level, a spaced-out trial resumes from its last level end to the same numbers.
    with pytest.raises(Preempted):
        execute(cfg, checkpoint=StopAfterSaving(tmp_path / "c", 2, 0), checkpoint_every_s=3600)
    assert numbers(execute(cfg, checkpoint=Checkpoint(tmp_path / "c"), checkpoint_every_s=3600).rows) == expected


def test_run_trial_resumes_in_the_same_run_without_duplicate_steps(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    target = prepare(uri, "resume")
    job = TrialJob("abc123", "resume-trial", to_flat(from_flat(SETTINGS)), target,
                   checkpoint_dir=str(tmp_path / "ckpt"))
    # First attempt: dies right after logging level 1 (before checkpointing it).
    run = TrialRun(target, job.trial_id, job.name, job.settings, {})
    checkpoint = Checkpoint(job.checkpoint_dir)

    def log_then_die(row):
        run.log_row(row)
        if row["level"] == 1:
            raise Preempted

    checkpoint.save_run_id(run.run_id)
    with pytest.raises(Preempted):
        execute(from_flat(job.settings), log_then_die, checkpoint)
    # Second attempt, as a requeued job would run it.
    outcome = run_trial(job)
    assert outcome["status"] == "FINISHED" and outcome["run_id"] == run.run_id
    client = MlflowClient(uri)
    runs = client.search_runs([target.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["resumed"] == "true"
    for key in ("accuracy", "sparsity", "loss"):
        steps = [m.step for m in client.get_metric_history(run.run_id, key)]
        assert sorted(steps) == [0, 1, 2], key  # level 1 logged once, not twice
    assert [m.step for m in client.get_metric_history(run.run_id, "quant.accuracy")] == [2]
    assert not checkpoint.path.exists()  # cleared once the trial finished
    # Same numbers as an uninterrupted run of the same trial.
    expected = numbers(execute(from_flat(SETTINGS)).rows)
    final = runs[0].data.metrics
    assert final["accuracy"] == pytest.approx(expected[2]["accuracy"], abs=0)
    assert final["quant.accuracy"] == pytest.approx(expected[3]["accuracy"], abs=0)


def test_failed_trial_clears_its_checkpoint_and_records_the_error(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    target = prepare(uri, "fails")
    settings = {**to_flat(from_flat(SETTINGS)), "dataset": "mnist",
                "dataset.root": str(tmp_path / "nothing")}
    job = TrialJob("f00", "fails", settings, target, checkpoint_dir=str(tmp_path / "ckpt"))
    outcome = run_trial(job)
    assert outcome["status"] == "FAILED" and "DatasetMissingError" in outcome["error"]
    assert not Checkpoint(job.checkpoint_dir).path.exists()


def test_a_job_stopped_before_its_first_checkpoint_keeps_its_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    target = prepare(uri, "early")
    job = TrialJob("e1", "early", to_flat(from_flat(SETTINGS)), target, checkpoint_dir=str(tmp_path / "ckpt"))
    # The first attempt created its run, remembered it, and died before any epoch ended.
    run = TrialRun(target, job.trial_id, job.name, job.settings, {})
    Checkpoint(job.checkpoint_dir).save_run_id(run.run_id)
    outcome = run_trial(job)
    assert outcome["run_id"] == run.run_id
    found = MlflowClient(uri).search_runs([target.experiment_id])
    assert [r.info.status for r in found] == ["FINISHED"]
