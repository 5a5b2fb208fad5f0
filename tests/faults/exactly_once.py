"""Shared by the fault-injection tests: tiny sweeps run as a user runs them, and the exactly-once check.

The check reads the SQLite store itself, not only MLflow's API: one FINISHED run per trial,
no (run, key, step) metric row twice, no run left RUNNING, and the exported CSV with exactly
one row per trial, level and stage.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def write_sweep(tmp: Path, name: str = "faults", seeds: int = 4, epochs: int = 3, **launcher) -> Path:
    """A digits / LeNet-300-100 sweep of ``2 * seeds`` trials, its store and folder under ``tmp``."""
    opts = {"executor": "local", "max_parallel": 2, "folder": str(tmp / f"submitit-{name}"),
            "checkpoint_every_s": 0, **launcher}
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\ntracking: sqlite:///{tmp}/{name}.db\n" + textwrap.dedent(f"""\
        grid:
          seed: {list(range(seeds))}
          quant: [none, dynamic]
        fixed:
          dataset: digits
          model: lenet_300_100
          prune.ratio: 0.8
          prune.iterations: 2
          train.epochs: {epochs}
          train.batch_size: 64
        """) + "launcher: " + json.dumps(opts) + "\n")
    return path


def env() -> dict:
    """The environment of a user's shell: this checkout importable, no store URI inherited."""
    out = {**os.environ, "PYTHONPATH": str(ROOT)}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def sweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `sweep` command to its end."""
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env(), timeout=timeout)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """Start the `sweep` command in the background (its own process group, like a terminal job)."""
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env(), start_new_session=True)


def ledger_states(path: Path) -> dict[str, dict]:
    """The ledger's state of each trial of the sweep file's folder (``jobs.ledger``)."""
    root = Path(json.loads(path.read_text().split("launcher: ", 1)[1])["folder"]) / "ledger"
    out = {}
    for entry in root.glob("*/state.json") if root.exists() else []:
        try:
            out[entry.parent.name] = json.loads(entry.read_text())
        except ValueError:
            pass
    return out


def wait_for(predicate, timeout: float = 240, every: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for the sweep to get there"
        time.sleep(every)


def running_holders(path: Path) -> list[int]:
    """Pids of the processes the ledger has running a trial right now."""
    return [s["holder"]["pid"] for s in ledger_states(path).values() if s["state"] == "running" and s.get("holder")]


def kill(pid: int) -> None:
    """kill -9, as the OOM killer or a dying node does."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def expected_trials(path: Path) -> set[str]:
    """The sweep's trial ids, from `sweep plan`."""
    proc = sweep("plan", str(path), "--format", "json", cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    return {t["trial_id"] for t in json.loads(proc.stdout)["trials"]}


def assert_exactly_once(path: Path, name: str = "faults") -> pd.DataFrame:
    """Every trial finished exactly once, in the database and in the exported CSV."""
    trials = expected_trials(path)
    db = sqlite3.connect(path.parent / f"{name}.db")
    finished = db.execute("""select t.value, count(*) from runs r join tags t on t.run_uuid = r.run_uuid
                             and t.key = 'trial_id' where r.status = 'FINISHED' group by t.value""").fetchall()
    assert dict(finished) == {t: 1 for t in trials}, f"FINISHED runs per trial: {finished}"
    running = db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
    assert running == 0, f"{running} runs left RUNNING"
    doubled = db.execute("""select run_uuid, key, step, count(*) from metrics group by run_uuid, key, step
                            having count(*) > 1 limit 5""").fetchall()
    assert not doubled, f"metric rows written twice (run, key, step, count): {doubled}"
    out = path.parent / f"{name}.csv"
    proc = sweep("export", str(path), "-o", str(out), cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(out)
    assert set(frame["trial_id"]) == trials
    assert not frame.duplicated(["trial_id", "level", "stage"]).any()
    per_trial = frame.groupby("trial_id").apply(len, include_groups=False)
    want = {tid: 3 + (q != "none") for tid, q in frame.groupby("trial_id")["quant"].first().items()}
    assert per_trial.to_dict() == want, "rows per trial: levels 0-2 float, plus the final quantized level"
    return frame
