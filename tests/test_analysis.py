"""`analysis` on a real store: the tidy frame, the grouping over seeds, the flags, `sweep summary`.

One tiny digits sweep (2 seeds; pruning, int8 and weight-only quantization, layers pruned in
isolation, and a trial that fails after its dense level) runs once per test session with the
debug executor; `tests/test_report.py` reads the same store.
"""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from analysis.summary import aggregate, describe, select, summarize
from runner.cli import main

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-analysis"
SWEEP = """\
name: {name}
description: analysis test sweep
tracking: sqlite:///{tmp}/store/mlflow.db
grid:
  prune.ratio: [0, 0.8]
  seed: [0, 1]
fixed:
  dataset: digits
  dataset.train_size: 512
  model: lenet_300_100
  prune.method: l1_global
  prune.iterations: 2
  train.epochs: 1
include:
  - prune.ratio: 0.8
    quant: [static, w2, w4, w2_channel, w4_channel]
  - prune.ratio: 0.5
    prune.scope: isolate
    prune.iterations: 1
    prune.rewind: none
    prune.retrain_epochs: 0
  # fails at level 1, after logging its dense level: 1 epoch never reaches epoch 3
  - prune.ratio: 0.8
    prune.rewind: "epoch:3"
    seed: 0
launcher:
  folder: {tmp}/submitit
"""


def analysis_store(tmp_path_factory):
    """Run the sweep once per session (both test files use it): (sweep file, store URI, run output)."""
    tmp = tmp_path_factory.getbasetemp() / "analysis-store"
    path, uri = tmp / "tiny.yaml", f"sqlite:///{tmp}/store/mlflow.db"
    done = tmp / "ran.txt"
    if not done.exists():
        tmp.mkdir(exist_ok=True)
        path.write_text(SWEEP.format(name=NAME, tmp=tmp))
        import torch

        # Tiny models on a shared machine: a second spinning OpenMP thread only slows them down.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = CliRunner().invoke(main, ["run", str(path), "--executor", "debug"])
        finally:
            torch.set_num_threads(threads)
        done.write_text(result.output)
    return path, uri, done.read_text()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, uri, output = analysis_store(tmp_path_factory)
    from analysis import runs_frame
    from runner.grid import expand
    from runner.spec import load_spec

    trials = expand(load_spec(path))[1]
    return path, uri, output, runs_frame(uri, NAME), trials


def test_the_sweep_ran_with_one_failure(store):
    _, _, output, frame, trials = store
    assert f"finished {len(trials) - 1}, skipped 0, failed 1" in output
    assert frame["trial_id"].nunique() == len(trials)


def test_frame_rows_and_columns(store):
    _, _, _, frame, trials = store
    expected = 0
    for t in trials:
        if t.config.prune.rewind == "epoch:3":
            expected += 1  # its dense level, then it failed
        else:
            levels = t.config.prune.iterations if t.config.prune.ratio > 0 else 0
            expected += levels + 1 + (t.config.quant.mode != "none")
    assert len(frame) == expected
    assert list(frame.columns[:8]) == ["sweep", "trial_id", "run_id", "run_name", "status", "error", "level", "stage"]
    assert {"prune.ratio", "quant", "seed", "accuracy", "sparsity", "theoretical_speedup", "output_mse"} <= set(frame)
    assert set(frame["stage"]) == {"float", "static", "w2", "w4", "w2_channel", "w4_channel"}


def test_final_level_and_stage_pick_one_row_per_finished_trial(store):
    _, _, _, frame, trials = store
    rows = select(frame[frame["status"] == "FINISHED"])
    assert rows["trial_id"].is_unique and len(rows) == len(trials) - 1
    by_id = {t.id: t.config for t in trials}
    for _, row in rows.iterrows():
        cfg = by_id[row["trial_id"]]
        assert row["stage"] == ("float" if cfg.quant.mode == "none" else cfg.quant.mode)
        assert row["level"] == (cfg.prune.iterations if cfg.prune.ratio > 0 else 0)


def _numpy_groups(rows, by, metric):
    return {k if isinstance(k, tuple) else (k,): g[metric].dropna().to_numpy()
            for k, g in rows.groupby(by, dropna=False)}


def test_summary_matches_numpy_on_the_real_store(store):
    _, _, _, frame, _ = store
    table = summarize(frame, by=["prune.ratio", "quant"], metrics=["accuracy", "sparsity"])
    rows = select(frame[frame["status"] == "FINISHED"])
    for metric in ("accuracy", "sparsity"):
        groups = _numpy_groups(rows, ["prune.ratio", "quant"], metric)
        for _, row in table.iterrows():
            values = groups.get((row["prune.ratio"], row["quant"]), np.array([]))
            assert row[f"{metric}_count"] == len(values)
            if len(values):
                assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            if len(values) > 1:
                assert row[f"{metric}_std"] == pytest.approx(values.std(ddof=1))


def test_failed_trial_is_flagged_and_never_averaged_in(store):
    _, _, _, frame, _ = store
    failed = frame[frame["status"] == "FAILED"]
    assert failed["trial_id"].nunique() == 1 and failed["accuracy"].notna().all()  # it logged level 0
    tid = failed["trial_id"].iloc[0]
    table = summarize(frame, by=["prune.ratio"], level=0)
    row = table[table["prune.ratio"] == 0.8].iloc[0]
    finished = frame[(frame["status"] == "FINISHED") & (frame["prune.ratio"] == 0.8) & (frame["level"] == 0)]
    assert row["accuracy_count"] == len(finished)
    assert row["accuracy_mean"] == pytest.approx(finished["accuracy"].mean())
    assert row["failed"] == 1 and tid in row["failed_trials"] and "failed" in row["flag"]
    # its own group (rewind epoch:3) has nothing to average and says why
    own = summarize(frame, by=["prune.rewind"])
    own = own[own["prune.rewind"] == "epoch:3"].iloc[0]
    assert own["accuracy_count"] == 0 and math.isnan(own["accuracy_mean"]) and tid in own["flag"]
    assert (summarize(frame)["flag"] != "").sum() == 1


def test_missing_seeds_are_flagged(store, tmp_path):
    path, _, _, frame, trials = store
    from runner.grid import expand
    from runner.spec import load_spec

    # the same sweep planned with a third seed: every group but the failed one lacks seed 2
    more = expand(load_spec(path, ["seed=[0, 1, 2]"]))[1]
    planned = pd.DataFrame([{"sweep": NAME, "trial_id": t.id, **t.flat} for t in more])
    table = summarize(frame, planned=planned)
    ok = table[table["failed"] == 0]
    assert (ok["missing_seeds"] == "2").all() and ok["flag"].str.contains("missing seeds 2").all()
    # without a plan, a group whose seed-1 trial is absent misses seed 1
    drop = next(t.id for t in trials if t.config.quant.mode == "w4" and t.config.seed == 1)
    table = summarize(frame[frame["trial_id"] != drop], by=["quant"])
    assert table.set_index("quant").loc["w4", "missing_seeds"] == "1"


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.one_of(finite, st.just(math.nan))), min_size=1, max_size=40))
def test_aggregate_matches_numpy_and_scipy(pairs):
    rows = pd.DataFrame(pairs, columns=["group", "value"])
    table = aggregate(rows, ["group"], ["value"]).set_index("group")
    for group, part in rows.groupby("group"):
        values = part["value"].dropna().to_numpy()
        got = table.loc[group]
        assert got["value_count"] == len(values)
        if not len(values):
            assert math.isnan(got["value_mean"])
            continue
        assert got["value_mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-9)
        if len(values) < 2:
            assert math.isnan(got["value_std"]) and math.isnan(got["value_ci95_low"])
            continue
        assert got["value_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-9)
        if np.std(values) > 0:  # scipy's interval of a zero-width scale is nan, not a point
            low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                               scale=scipy.stats.sem(values))
            assert (got["value_ci95_low"], got["value_ci95_high"]) == pytest.approx((low, high), rel=1e-7, abs=1e-7)


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.booleans(), finite), min_size=1, max_size=30))
def test_failed_trials_never_enter_the_mean(trials):
    frame = pd.DataFrame([{"sweep": "s", "trial_id": f"t{i}", "run_id": "", "run_name": "", "error": None,
                           "status": "FINISHED" if ok else "FAILED", "level": 0, "stage": "float",
                           "prune.ratio": float(group), "seed": seed, "accuracy": value}
                          for i, (group, seed, ok, value) in enumerate(trials)])
    table = summarize(frame, by=["prune.ratio"]).set_index("prune.ratio")
    for group, part in frame.groupby("prune.ratio"):
        done = part[part["status"] == "FINISHED"]
        row = table.loc[group]
        assert row["accuracy_count"] == len(done) and row["failed"] == (part["status"] == "FAILED").sum()
        stats = describe(done["accuracy"])
        assert row["accuracy_mean"] == pytest.approx(stats["mean"], nan_ok=True)
        if len(done):
            assert row["accuracy_mean"] == pytest.approx(done["accuracy"].mean())
        assert set(str(s) for s in row["missing_seeds"].split(",") if s) == \
            {str(s) for s in set(frame["seed"]) - set(done["seed"]) - set(part.loc[part["status"] == "FAILED", "seed"])}


def test_sweep_summary_command(store, tmp_path):
    path, uri, _, frame, _ = store
    result = CliRunner().invoke(main, ["summary", str(path), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    failed = frame.loc[frame["status"] == "FAILED", "trial_id"].iloc[0]
    assert "1 flagged" in result.output and failed in result.output
    written = pd.read_csv(tmp_path / "s.csv")
    assert {"accuracy_mean", "accuracy_std", "accuracy_count", "accuracy_ci95_low", "flag"} <= set(written)
    assert written["accuracy_count"].sum() + written["failed"].sum() == frame["trial_id"].nunique()
    # experiment name + store, several metrics, Markdown and Parquet
    for out in ("s.md", "s.parquet"):
        result = CliRunner().invoke(main, ["summary", NAME, "--tracking-uri", uri, "--by", "prune.ratio,quant",
                                           "--metric", "accuracy", "--metric", "latency_ms", "--level", "all",
                                           "--stage", "all", "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "s.md").read_text().startswith("| prune.ratio | quant | level |")
    assert "latency_ms_mean" in pd.read_parquet(tmp_path / "s.parquet")
    result = CliRunner().invoke(main, ["summary", str(path), "-o", str(tmp_path / "s.txt")])
    assert result.exit_code == 2 and "use a .csv, .md or .parquet file" in result.output


def test_several_sweeps_combine_into_one_summary(store, tmp_path):
    path, uri, _, frame, _ = store
    other = tmp_path / "other.yaml"
    other.write_text(textwrap.dedent(f"""\
        name: tiny-other
        tracking: {uri}
        grid:
          seed: [0, 1]
        fixed: {{dataset: digits, dataset.train_size: 128, model: lenet_300_100, train.epochs: 1}}
        launcher: {{folder: {tmp_path}/submitit}}
        """))
    assert CliRunner().invoke(main, ["run", str(other), "--executor", "debug"]).exit_code == 0
    # a file and the same sweep by name count once
    result = CliRunner().invoke(main, ["summary", str(path), str(other), NAME, "--tracking-uri", uri,
                                       "-o", str(tmp_path / "both.csv")])
    assert result.exit_code == 0, result.output
    both = pd.read_csv(tmp_path / "both.csv")
    assert both.columns[0] == "sweep" and set(both["sweep"]) == {NAME, "tiny-other"}
    mine = both[both["sweep"] == NAME]
    assert mine["accuracy_count"].sum() + mine["failed"].sum() == frame["trial_id"].nunique()
    assert both.loc[both["sweep"] == "tiny-other", "accuracy_count"].tolist() == [2]


@pytest.mark.parametrize("args, message", [
    (["--by", "prune.ratio,bogus"], "error: --by: unknown axis 'bogus'; allowed: "),
    (["--metric", "acuracy"], "(did you mean 'accuracy'?)"),
    (["--level", "last"], "error: --level: unknown level 'last'; allowed: N (an integer), all, final"),
    (["--stage", "w3"], "error: --stage: unknown stage 'w3'; allowed: "),
])
def test_unknown_names_are_one_line_errors(store, args, message):
    path = store[0]
    result = CliRunner().invoke(main, ["summary", str(path), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_import_analysis_is_light():
    code = textwrap.dedent("""
        import sys, analysis
        assert not {'matplotlib', 'mlflow', 'torch'} & set(sys.modules), sorted(sys.modules)
        analysis.summarize, analysis.FIGURES
        assert 'matplotlib.pyplot' not in sys.modules and 'mlflow' not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
