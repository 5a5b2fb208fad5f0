"""Shared stages: level keys, the plan (packs, stored levels, work saved), and equal results."""
import json
import textwrap
from pathlib import Path

import pytest
import submitit
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.config import from_flat
from jobs.stages import dense_key, level_keys, unassigned_settings
from runner.cli import main
from runner.grid import expand
from runner.plan import plan
from runner.spec import validate

BASE = {"dataset": "digits", "model": "lenet_300_100", "prune.method": "l1_global", "prune.ratio": 0.5,
        "prune.iterations": 2, "quant": "none", "seed": 0}


def keys(**changes):
    return level_keys(from_flat({**BASE, **changes}))


def test_every_setting_belongs_to_a_stage():
    assert unassigned_settings() == []


def test_level_keys_are_pinned():
    # A change here re-trains every cached stage: bump STAGE_FORMAT on purpose, never by accident.
    assert keys() == ["d-40aecab11a0b7893", "p-0dfb204eb9bc4cca", "p-df9957bc6055e155"]


def test_dense_model_is_shared_across_pruning_and_quantization():
    dense = keys()[0]
    assert keys(**{"prune.ratio": 0.9})[0] == dense
    assert keys(**{"prune.method": "random_global", "prune.iterations": 5})[0] == dense
    assert keys(quant="static")[0] == dense
    assert keys(**{"prune.ratio": 0.0})[0] == dense
    for change in ({"seed": 1}, {"train.epochs": 3}, {"model": "lenet5"}, {"dataset": "synthetic"},
                   {"train.lr": 0.1}, {"device": "cpu"}):
        assert keys(**change)[0] != dense, change


def test_trajectory_is_shared_across_quant_modes_only():
    base = keys()
    assert keys(quant="dynamic") == base
    assert keys(quant="w4_channel", **{"quant.backend": "qnnpack"}) == base
    ratio = keys(**{"prune.ratio": 0.9})
    assert ratio[0] == base[0] and not set(ratio[1:]) & set(base[1:])
    assert keys(**{"prune.rewind": "reinit"})[1:] != base[1:]
    assert keys(**{"prune.iterations": 3})[1] != base[1]  # another per-level amount


def test_late_rewinding_needs_its_own_dense_run():
    # The dense run must capture the weights at the rewinding point, so it is another stage.
    assert keys(**{"prune.rewind": "epoch:1"})[0] != keys()[0]
    assert dense_key(from_flat({**BASE, "prune.ratio": 0.0, "prune.rewind": "epoch:1"})) == keys()[0]


def sweep_spec(tmp_path, grid, fixed=None, name="stages"):
    raw = {"name": name, "grid": grid, "fixed": {"dataset": "digits", "prune.iterations": 2, **(fixed or {})}}
    return validate(raw, str(tmp_path / "s.yaml"), {})


def test_plan_groups_quant_modes_and_counts_the_work_saved(tmp_path):
    spec = sweep_spec(tmp_path, {"prune.ratio": [0, 0.5, 0.8], "quant": ["none", "dynamic"]})
    _, trials = expand(spec)
    p = plan(trials, trials_per_job=1)
    assert len(trials) == 6 and len(p.packs) == 3  # dense group + one group per trajectory
    for pack in p.packs:
        assert len({tuple(p.keys[t.id]) for t in pack.trials}) == 1
        assert sorted(t.config.quant.mode for t in pack.trials) == ["dynamic", "none"]
    # Naive: 2 dense trials x 1 level + 4 pruned trials x 3 levels; shared: 1 dense + 2 x 2 levels.
    assert p.work["naive_level_stages"] == 14 and p.work["level_stages"] == 5
    assert p.work["naive_epochs"] == 2 * 14 and p.work["epochs"] == 2 * 5
    assert p.work["naive_dense"] == 6 and p.work["dense"] == 1
    # Every trial stores the dense model (other trajectories need it), pruned ones their last level.
    for t in trials:
        assert p.save_levels[t.id] == ((0,) if t.config.prune.ratio == 0 else (0, 2))
    naive = plan(trials, 1, shared=False)
    assert naive.work["level_stages"] == naive.work["naive_level_stages"] == 14
    assert all(levels == () for levels in naive.save_levels.values())


def test_packs_merge_groups_up_to_trials_per_job_and_stage_jobs_cover_split_dense_models(tmp_path):
    spec = sweep_spec(tmp_path, {"prune.ratio": [0, 0.5, 0.8], "quant": ["none", "dynamic"], "seed": [0, 1]})
    _, trials = expand(spec)
    p = plan(trials, trials_per_job=4, stage_jobs=True)
    # 6 groups of 2 (quant modes of one trajectory), ordered by dense model, 4 trials a pack.
    assert [len(pack.trials) for pack in p.packs] == [4, 4, 4]
    pack_of = {t.id: i for i, pack in enumerate(p.packs) for t in pack.trials}
    for t in trials:  # a trajectory is never split between jobs
        assert all(pack_of[u.id] == pack_of[t.id] for u in trials if p.keys[u.id] == p.keys[t.id])
    # Each seed's dense model is used by two packs: one stage job each, which those packs wait for.
    assert len(p.stage_jobs) == 2
    assert [len(pack.needs) for pack in p.packs] == [1, 2, 1]
    assert {t.config.seed for t in p.stage_jobs.values()} == {0, 1}
    assert plan(trials, 4, cached=set(p.stage_jobs), stage_jobs=True).stage_jobs == {}


SWEEP = """\
name: {name}
tracking: sqlite:///{tmp}/store/mlflow.db
grid:
  prune.ratio: [0, 0.5, 0.8]
  quant: [none, static]
fixed:
  dataset: digits
  dataset.train_size: 400
  prune.iterations: 2
  prune.method: l1_global
  train.epochs: 1
launcher:
  folder: {tmp}/{name}
"""
TIMINGS = ("latency", "time_s", "rss", "cuda")


def results(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        metrics = {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMINGS)}
        out[run.data.tags["trial_id"]] = (metrics, run.data.tags)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("executor, launcher", [("debug", []), ("local", [])])
def test_shared_stages_give_the_results_of_trials_run_alone(tmp_path, executor, launcher, one_thread):
    shared = tmp_path / "shared.yaml"
    shared.write_text(SWEEP.format(name="shared", tmp=tmp_path))
    alone = tmp_path / "alone.yaml"
    alone.write_text(SWEEP.format(name="alone", tmp=tmp_path))
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    runner = CliRunner()
    options = [f"--launcher={o}" for o in launcher] + ["--max-parallel", "2"]
    out = runner.invoke(main, ["run", str(shared), "--executor", executor, *options])
    assert out.exit_code == 0, out.output
    assert "level stages: 5 to train (naive 14)" in out.output
    out = runner.invoke(main, ["run", str(alone), "--executor", "debug", "--launcher", "share_stages=false"])
    assert out.exit_code == 0, out.output
    got, want = results(uri, "shared"), results(uri, "alone")
    assert set(got) == set(want) and len(got) == 6
    for tid, (metrics, tags) in got.items():
        assert metrics.keys() == want[tid][0].keys()
        assert metrics == want[tid][0], tid  # fixed seeds on the CPU: exactly the same numbers
    reused = [tags for _, tags in got.values() if "reused_from" in tags]
    # The dense model is trained once and each trajectory once: 5 of the 6 trials reuse levels.
    assert len(reused) == 5
    assert {t["reused_levels"] for t in reused} == {"0", "0-2"}
    assert all(t["reused_from"] in got for t in reused)
    assert not any("reused_from" in tags for _, tags in want.values())
    stored = sorted(p.name for p in (tmp_path / "shared" / "stages").glob("*.pt"))
    assert len([n for n in stored if not n.endswith(".final.pt")]) == 3  # 1 dense + 2 final levels


def test_a_pack_runs_on_past_a_failing_trial_and_a_requeued_pack_skips_what_it_ran(tmp_path, one_thread):
    from jobs.task import PackJob, TrialJob
    from jobs.packs import run_pack
    from runner.store import prepare

    target = prepare(f"sqlite:///{tmp_path}/mlflow.db", "packs")
    good = {**BASE, "dataset.train_size": 200, "train.epochs": 1, "prune.iterations": 1}
    bad = {**good, "dataset": "mnist", "dataset.root": str(tmp_path / "missing")}
    jobs = tuple(TrialJob(f"t{i}", f"t{i}", settings, target, checkpoint_dir=str(tmp_path / f"ck{i}"))
                 for i, settings in enumerate([good, bad, {**good, "seed": 1}]))
    outcomes = run_pack(PackJob(jobs, "token-1"))
    assert [o["status"] for o in outcomes] == ["FINISHED", "FAILED", "FINISHED"]
    assert "mnist" in outcomes[1]["error"].lower()
    client = MlflowClient(target.uri)
    count = len(client.search_runs([target.experiment_id]))
    assert count == 3
    # The same submission requeued: nothing runs again, the same outcomes come back.
    assert run_pack(PackJob(jobs, "token-1")) == outcomes
    assert len(client.search_runs([target.experiment_id])) == count
    marker = json.loads((tmp_path / "ck0" / "outcome.json").read_text())
    assert marker["token"] == "token-1"


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _worker_pack(tmp_path, sweep, settings, token="tok", store=None):
    from jobs.task import PackJob, TrackingTarget, TrialJob

    uri = f"sqlite:///{store or tmp_path / 'mlflow.db'}"
    job = TrialJob("w0", "w0", settings, TrackingTarget(uri, None, sweep), checkpoint_dir=str(tmp_path / "ck"))
    return PackJob((job,), token, claim_dir=str(tmp_path / "claims"), groups=((0,),), prepare_store=True)


def test_the_first_worker_creates_the_store_and_the_others_log_to_its_experiment(tmp_path, one_thread):
    import dataclasses

    from jobs.packs import run_pack

    settings = {**BASE, "dataset.train_size": 200, "train.epochs": 1, "prune.iterations": 1}
    pack = _worker_pack(tmp_path, "ready", settings)
    assert not (tmp_path / "mlflow.db").exists()
    outcomes = run_pack(pack)  # the first worker: claims the creation, creates, says ready
    assert [o["status"] for o in outcomes] == ["FINISHED"], outcomes
    said = json.loads((tmp_path / "claims" / "tok.ready").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert said["experiment_id"] == client.get_experiment_by_name("ready").experiment_id
    (run,) = client.search_runs([said["experiment_id"]])
    assert {"compute_time_s", "tracking_time_s", "stage_wait_time_s", "io_time_s"} <= set(run.data.metrics)
    # A second worker of the same submission finds the creation claimed and the store ready.
    other = dataclasses.replace(pack, trials=(dataclasses.replace(pack.trials[0], trial_id="w1", name="w1",
                                                                  checkpoint_dir=str(tmp_path / "ck1")),))
    assert [o["status"] for o in run_pack(other)] == ["FINISHED"]
    assert len(client.search_runs([said["experiment_id"]])) == 2


def test_workers_give_up_when_the_store_cannot_be_prepared(tmp_path):
    from jobs.packs import run_pack

    # The worker that claimed the creation died before saying anything.
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "tok.creator").write_text(str(_dead_pid()))
    with pytest.raises(RuntimeError, match="ended before it was ready"):
        run_pack(_worker_pack(tmp_path, "gone", BASE))
    assert not (tmp_path / "mlflow.db").exists()  # a waiting worker never creates the store itself
    # The creation failed: the creator raises, and every other worker says why.
    blocked = tmp_path / "no-dir"
    blocked.write_text("a file where the store's directory should be")
    pack = _worker_pack(tmp_path, "broken", BASE, token="tok2", store=blocked / "mlflow.db")
    with pytest.raises(Exception) as raised:
        run_pack(pack)
    said = json.loads((tmp_path / "claims" / "tok2.ready").read_text())
    assert said["error"].startswith(type(raised.value).__name__)
    with pytest.raises(RuntimeError, match="could not be prepared: " + type(raised.value).__name__):
        run_pack(pack)


def test_a_pack_interrupted_mid_trial_resumes_that_trial(tmp_path, monkeypatch, one_thread):
    import jobs.trial as trial
    from jobs.packs import run_pack
    from jobs.task import PackJob, TrialJob
    from runner.store import prepare

    target = prepare(f"sqlite:///{tmp_path}/mlflow.db", "requeue")
    settings = {**BASE, "dataset.train_size": 200, "train.epochs": 2, "prune.iterations": 1}
    jobs = tuple(TrialJob(f"t{i}", f"t{i}", {**settings, "seed": i}, target, checkpoint_dir=str(tmp_path / f"ck{i}"))
                 for i in range(2))
    real_train = trial.train

    def interrupted(*args, **kwargs):
        # The second trial is stopped after its first epoch, as a time-limit signal would.
        on_epoch = kwargs["on_epoch"]

        def stop_after_first(epoch, *rest):
            on_epoch(epoch, *rest)
            raise submitit.core.utils.UncompletedJobError("time limit")
        return real_train(*args, **{**kwargs, "on_epoch": stop_after_first})

    first = trial.run_trial(jobs[0])
    assert first["status"] == "FINISHED"
    (tmp_path / "ck0").mkdir(exist_ok=True)
    (tmp_path / "ck0" / "outcome.json").write_text(json.dumps({"token": "tok", "outcome": first}))
    monkeypatch.setattr(trial, "train", interrupted)
    stopped = run_pack(PackJob(jobs, "tok"))
    assert stopped[0] == first and stopped[1]["status"] == "FAILED"
    assert (tmp_path / "ck1" / "checkpoint.pt").exists()
    monkeypatch.setattr(trial, "train", real_train)
    outcomes = run_pack(PackJob(jobs, "tok"))
    assert outcomes[0] == first  # not run again
    assert outcomes[1]["status"] == "FINISHED"
    client = MlflowClient(target.uri)
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([target.experiment_id])}
    assert len(runs) == 2 and runs["t1"].data.tags.get("resumed") == "true"
    steps = [m.step for m in client.get_metric_history(runs["t1"].info.run_id, "epoch.test_accuracy")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # 2 levels x 2 epochs, none twice


@pytest.mark.slow
def test_pack_lanes_run_at_the_same_time_on_their_share_of_the_cores(tmp_path):
    from jobs.task import PackJob, TrialJob
    from jobs.packs import run_pack
    from runner.store import prepare

    target = prepare(f"sqlite:///{tmp_path}/mlflow.db", "lanes")
    settings = {**BASE, "dataset.train_size": 400, "train.epochs": 3, "prune.iterations": 1}
    jobs = tuple(TrialJob(f"t{i}", f"t{i}", {**settings, "seed": i}, target, threads=2,
                          checkpoint_dir=str(tmp_path / f"ck{i}")) for i in range(2))
    outcomes = run_pack(PackJob(jobs, "tok", lanes=((0,), (1,))))
    assert [o["trial_id"] for o in outcomes] == ["t0", "t1"]
    assert [o["status"] for o in outcomes] == ["FINISHED", "FINISHED"]
    runs = MlflowClient(target.uri).search_runs([target.experiment_id])
    assert {r.data.tags["torch_threads"] for r in runs} == {"1"}  # 2 slots shared by 2 lanes
    (a, b) = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert b[0] < a[1], "the lanes did not overlap"


def test_lanes_keep_trajectory_groups_whole_and_balance_them(tmp_path):
    from runner.launch import lanes_of

    spec = sweep_spec(tmp_path, {"prune.ratio": [0, 0.5, 0.8], "quant": ["none", "dynamic"]})
    _, trials = expand(spec)
    p = plan(trials, trials_per_job=6)
    assert len(p.packs) == 1
    lanes = lanes_of(p.packs[0], p.keys, 2)
    assert sorted(len(lane) for lane in lanes) == [2, 4]
    for lane in lanes:
        groups = {tuple(p.keys[p.packs[0].trials[i].id]) for i in lane}
        assert all(sum(tuple(p.keys[t.id]) == g for t in p.packs[0].trials) ==
                   sum(tuple(p.keys[p.packs[0].trials[i].id]) == g for i in lane) for g in groups)
    assert lanes_of(p.packs[0], p.keys, 1) == ()
