"""Export: the fast paths build exactly the frame of the plain per-run loop, on SQLite and a server."""
import socket
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from analysis import export
from analysis.export import ID_COLUMNS, load, runs_frame
from jobs.config import SETTINGS, TrialConfig, to_flat
from jobs.tracking import RESULTS_ARTIFACT, TrialRun
from runner.cli import main
from runner.store import find_experiment_id, prepare, trial_runs


def reference_frame(uri: str, experiment: str) -> pd.DataFrame:
    """The plain loop (the export before the fast paths): download each table, assign per run, concat."""
    exp_id = find_experiment_id(uri, experiment)
    if exp_id is None:
        raise LookupError(experiment)
    client = MlflowClient(uri)
    frames = []
    for tid, run in sorted(trial_runs(uri, exp_id).items()):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                table = pd.read_csv(client.download_artifacts(run.info.run_id, RESULTS_ARTIFACT, tmp))
            except Exception:
                table = None
        if table is None or table.empty:
            table = pd.DataFrame([{"level": None, "stage": None}])
        settings = {k: export._typed(k, v) for k, v in sorted(run.data.params.items())}
        ident = {"sweep": experiment, "trial_id": tid, "run_id": run.info.run_id,
                 "run_name": run.data.tags.get("mlflow.runName", ""), "status": run.info.status,
                 "error": run.data.tags.get("error")}
        frames.append(table.assign(**ident, **settings))
    if not frames:
        return pd.DataFrame(columns=ID_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    first = [c for c in ID_COLUMNS if c in frame] + [c for c in SETTINGS if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def settings(**changes) -> dict:
    flat = to_flat(TrialConfig())
    flat.update(changes)
    return flat


def float_rows(levels: int, seed: float) -> list[dict]:
    return [{"level": lv, "stage": "float", "accuracy": 0.9 - 0.01 * lv - seed / 1000, "loss": 0.3 + lv / 7,
             "sparsity": 1 - 0.5 ** lv, "nonzero_params": 1000 // 2 ** lv} for lv in range(levels)]


def quant_row(level: int) -> dict:
    return {"level": level, "stage": "static", "accuracy": 0.81, "loss": 0.5, "size_bytes": 1234,
            "output_mse": 1e-4}


def write_store(uri: str, sweep: str, offset: int = 0, full: bool = True) -> dict[str, str]:
    """A small sweep through TrialRun: finished, quantized, failed without a table, resumed, retried.

    ``full=False``: only the first two trials, for the stores that test combining."""
    target = prepare(uri, sweep)
    ids = {}

    def trial(name: str, flat: dict, rows: list[dict] | None, fail: bool = False) -> TrialRun:
        run = TrialRun(target, f"{name}{offset:03d}"[:12], f"{sweep}-{name}", flat, {"executor": "debug"})
        ids[name] = run.run_id
        if rows is not None:
            run.log_rows(rows)
            (run.fail(rows, flat, "Traceback\nRuntimeError: boom") if fail else run.finish(rows, flat))
        return run

    trial("dense", settings(seed=offset), float_rows(1, 0))
    trial("pruned", settings(**{"prune.ratio": 0.75, "prune.iterations": 2, "seed": 1}), float_rows(3, 1))
    if not full:
        return ids
    trial("static", settings(**{"prune.ratio": 0.5, "prune.iterations": 1, "quant": "static"}),
          float_rows(2, 2) + [quant_row(1)])
    trial("nodata", settings(dataset="mnist"), [], fail=True)  # died before its first level: no results.csv
    # Interrupted after level 0, then resumed in the same run: level 0 must not be logged twice.
    flat = settings(**{"prune.ratio": 0.9, "prune.iterations": 2, "seed": 3})
    first = trial("resumed", flat, None)
    first.log_row(float_rows(1, 3)[0])
    again = TrialRun(target, first.client.get_run(first.run_id).data.tags["trial_id"], f"{sweep}-resumed",
                     flat, {"executor": "debug"}, resume_run_id=first.run_id)
    again.log_rows(float_rows(3, 3))
    again.finish(float_rows(3, 3), flat)
    # Failed with a partial table, then finished in a new run: the finished one is exported.
    flat = settings(**{"prune.ratio": 0.5, "prune.iterations": 2, "seed": 4})
    trial("retried", flat, float_rows(1, 4), fail=True)
    ids["retried-failed"] = ids["retried"]
    trial("retried", flat, float_rows(3, 4))
    # Logged by an older version: one setting missing, one unknown, one int setting not an int.
    old = settings(seed=5, **{"prune.iterations": "none"})
    del old["train.momentum"]
    trial("old", {**old, "legacy.knob": "x"}, float_rows(1, 5))
    return ids


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two SQLite stores: sweeps a and b in the first, c in the second."""
    tmp = tmp_path_factory.mktemp("export")
    one, two = f"sqlite:///{tmp}/one/mlflow.db", f"sqlite:///{tmp}/two/mlflow.db"
    ids = {"a": write_store(one, "a"), "b": write_store(one, "b", offset=1, full=False),
           "c": write_store(two, "c", offset=2, full=False)}
    return tmp, one, two, ids


def test_fast_paths_equal_the_plain_loop(stores):
    _, uri, _, ids = stores
    expected = reference_frame(uri, "a")
    for sql in (True, False):
        for local in (True, False):
            pd.testing.assert_frame_equal(export._frame(uri, "a", sql=sql, local=local), expected)
    frame = runs_frame(uri, "a")
    pd.testing.assert_frame_equal(frame, expected)
    # 1 + 3 + (2 + quant) + failed placeholder + 3 resumed + 3 retried + 1 old
    assert len(frame) == 15 and frame["trial_id"].nunique() == 7
    nodata = frame[frame["run_id"] == ids["a"]["nodata"]]
    assert len(nodata) == 1 and nodata["status"].item() == "FAILED" and nodata["level"].isna().all()
    assert nodata["error"].item() == "RuntimeError: boom"
    resumed = frame[frame["run_id"] == ids["a"]["resumed"]]
    assert list(resumed["level"]) == [0, 1, 2] and (resumed["status"] == "FINISHED").all()
    assert ids["a"]["retried-failed"] not in set(frame["run_id"])
    assert frame.loc[frame["run_id"] == ids["a"]["retried"], "status"].eq("FINISHED").all()
    static = frame[frame["stage"] == "static"]
    assert len(static) == 1 and static["output_mse"].item() == 1e-4 and static["quant"].item() == "static"
    old = frame[frame["run_id"] == ids["a"]["old"]]
    assert old["legacy.knob"].item() == "x" and old["train.momentum"].isna().all()
    assert frame["prune.iterations"].dtype == object  # ints, and "none" that is not one
    assert list(frame.columns[:len(ID_COLUMNS)]) == ID_COLUMNS


def test_resumed_run_logged_each_level_once(stores):
    _, uri, _, ids = stores
    client = MlflowClient(uri)
    run = client.get_run(ids["a"]["resumed"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy")) == [0, 1, 2]
    assert run.data.tags["last_level"] == "2" and run.data.tags["resumed"] == "true"


def test_log_rows_packs_batches_under_the_limit(stores, monkeypatch):
    tmp, uri, _, _ = stores
    run = TrialRun(prepare(uri, "batches"), "batches00001", "batches", settings(), {})
    sizes = []
    real = run.client.log_batch
    monkeypatch.setattr(run.client, "log_batch",
                        lambda *a, **k: sizes.append(len(k["metrics"]) + len(k["tags"])) or real(*a, **k))
    wide = [{"level": lv, "stage": "float", **{f"m{i}": float(i * lv) for i in range(60)}} for lv in range(40)]
    run.log_rows(wide[:3])
    run.log_rows(wide)  # levels 0-2 are skipped, the other 37 x 60 metrics go in 3 batches
    assert sizes == [181, 961, 961, 301] and max(sizes) <= 1000
    assert sorted(m.step for m in run.client.get_metric_history(run.run_id, "m7")) == list(range(40))
    assert run.client.get_run(run.run_id).data.tags["last_level"] == "39"


def test_several_sweeps_combine(stores, monkeypatch):
    tmp, one, two, _ = stores
    frame = load([(one, "a"), (one, "b"), (two, "c")])
    parts = [reference_frame(one, "a"), reference_frame(one, "b"), reference_frame(two, "c")]
    assert list(frame["sweep"].drop_duplicates()) == ["a", "b", "c"]
    assert frame.groupby("sweep").size().to_dict() == {p["sweep"][0]: len(p) for p in parts}
    for part in parts:
        mine = frame[frame["sweep"] == part["sweep"][0]].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[part.columns], part, check_dtype=False)
    # A sweep file brings its own store; a bare name is looked up in ./mlflow.db.
    sweep = tmp / "c.yaml"
    sweep.write_text(f"name: c\ntracking: {two}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp / "one")
    out = tmp / "out" / "all.parquet"
    result = CliRunner().invoke(main, ["export", "a", str(sweep), "b", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = pd.read_parquet(out)
    assert list(written["sweep"].drop_duplicates()) == ["a", "c", "b"] and len(written) == len(frame)
    missing = CliRunner().invoke(main, ["export", "a", "nope", "--tracking-uri", one, "-o", str(tmp / "x.csv")])
    assert missing.exit_code == 1 and "no experiment named 'nope'" in missing.output
    with pytest.raises(LookupError):
        runs_frame(two, "a")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_export_through_a_server(tmp_path, monkeypatch):
    from runner.ui import start_server, stop_server

    monkeypatch.chdir(tmp_path)  # the server keeps proxied artifacts under ./mlartifacts
    db = f"sqlite:///{tmp_path}/mlflow.db"
    write_store(db, "local", full=False)  # artifacts beside the database: file:// URIs, read in place
    port = free_port()
    server = start_server(db, port)
    try:
        http = f"http://127.0.0.1:{port}"
        write_store(http, "served")  # created through the server: mlflow-artifacts:/ URIs, downloaded
        run = MlflowClient(http).search_runs([find_experiment_id(http, "served")], max_results=1)[0]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert (tmp_path / "mlartifacts").is_dir()
        pd.testing.assert_frame_equal(runs_frame(http, "served"), reference_frame(http, "served"))
        pd.testing.assert_frame_equal(runs_frame(http, "local"), runs_frame(db, "local"))
        pd.testing.assert_frame_equal(runs_frame(http, "local"), reference_frame(http, "local"))
        both = load([(http, "served"), (db, "local")])
        assert both.groupby("sweep")["trial_id"].nunique().to_dict() == {"served": 7, "local": 2}
    finally:
        stop_server(server)
