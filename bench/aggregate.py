#!/usr/bin/env python
"""Time ``sweep export`` on a 10,000-trial store against reading every metric history.

    .venv/bin/python bench/aggregate.py          # --trials 10000 --levels 20 --store bench/.cache/aggregate

1. Build (or reuse, when it was built with the same parameters) a SQLite store of N FINISHED
   trials x L levels, written through ``jobs.tracking.TrialRun``, the code the jobs log with:
   params = the resolved settings of real grid points (``runner.grid`` over a sweep file),
   metrics = one results row per level (+ the quantized stage), the ``results.csv`` and
   ``config.json`` artifacts. The values are generated; no model is trained.
2. Time the export three ways, in this one command:
   * ``runs_frame`` in-process (modules already imported), the function behind ``sweep export``;
   * ``sweep export NAME -o FILE`` as a subprocess (Python start-up and imports included),
     for .parquet and .csv;
   * the naive way: ``search_runs``, then ``MlflowClient.get_metric_history`` per run and
     metric key, turned into the same rows. On all runs when that takes under
     ``--naive-budget`` seconds (estimated from a first sample), otherwise on a random sample
     of runs, extrapolated linearly to N and printed as extrapolated.
3. Check that both ways give the same values on the runs the naive way read (exit 1 if not),
   and print the wall times and the ratios naive / ours.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP = "aggregate-bench"
FORMAT_VERSION = 1  # bump when the generated store changes, so that cached stores are rebuilt
# A realistic grid: 5 models x 4 methods x 5 ratios x 4 quant modes = 400 trials per seed.
GRID = {"model": ["lenet_300_100", "lenet5", "conv2", "conv4", "resnet20"],
        "prune.method": ["l1_global", "l1_local", "random_global", "random_local"],
        "prune.ratio": [0.5, 0.8, 0.9, 0.95, 0.98],
        "quant": ["none", "dynamic", "static", "w8_channel"]}
FIXED = {"dataset": "cifar10", "dataset.root": "/shared/data", "train.epochs": 30, "train.lr": 0.1,
         "train.batch_size": 128, "train.lr_schedule": "cosine", "prune.rewind": "init"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def sweep_file(store: Path, trials: int, levels: int) -> Path:
    """A sweep file whose grid has at least ``trials`` unique trials of ``levels`` levels each."""
    per_seed = math.prod(len(v) for v in GRID.values())
    grid = {**GRID, "seed": list(range(math.ceil(trials / per_seed)))}
    path = store / "aggregate.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "name": SWEEP, "tracking": f"sqlite:///{store / 'mlflow.db'}", "grid": grid,
        "fixed": {**FIXED, "prune.iterations": levels - 1}}, indent=1))
    return path


def rows_for(trial_id: str, settings: dict, levels: int) -> list[dict]:
    """Generated results rows with the keys ``jobs.trial.float_row`` / ``quant_row`` write."""
    rng = random.Random(int(hashlib.sha256(trial_id.encode()).hexdigest()[:12], 16))
    total = rng.randrange(200_000, 11_000_000)
    flops = total * rng.randrange(2, 60)
    rows = []
    for level in range(levels):
        left = (1 - settings["prune.ratio"]) ** (level / max(levels - 1, 1))
        nonzero = int(total * left)
        row = {"level": level, "stage": "float", "accuracy": rng.uniform(0.5, 0.95), "top5": rng.uniform(0.9, 1.0),
               "loss": rng.uniform(0.1, 2.0), "sparsity": 1 - left, "nonzero_params": nonzero,
               "total_params": total, "size": total + 1000, "size_nonzero": nonzero + 1000,
               "compression_ratio": (total + 1000) / (nonzero + 1000), "macs": flops // 2,
               "macs_nonzero": int(flops * left) // 2, "flops": flops, "flops_nonzero": int(flops * left),
               "theoretical_speedup": 1 / left, "train_time_s": rng.uniform(30, 900),
               "size_bytes": 4 * total + 5000, "sparse_size_bytes": 8 * nonzero + 5000,
               "peak_rss_bytes": rng.randrange(900_000_000, 3_000_000_000)}
        if level == levels - 1:
            row.update(latency_ms=rng.uniform(0.01, 5), latency_ms_b1=rng.uniform(0.1, 9),
                       latency_ms_b32=rng.uniform(1, 90))
        rows.append(row)
    if settings["quant"] != "none":
        rows.append({"level": levels - 1, "stage": settings["quant"], "accuracy": rng.uniform(0.5, 0.95),
                     "top5": rng.uniform(0.9, 1.0), "loss": rng.uniform(0.1, 2.0), "sparsity": rows[-1]["sparsity"],
                     "flops": flops, "size_bytes": total + 9000, "latency_ms": rng.uniform(0.01, 5),
                     "latency_ms_b1": rng.uniform(0.1, 9), "latency_ms_b32": rng.uniform(1, 90),
                     "output_mse": rng.uniform(0, 0.01), "top1_agreement": rng.uniform(0.95, 1),
                     "peak_rss_bytes": rng.randrange(900_000_000, 3_000_000_000)})
    return rows


def write_trials(target, trials: list[tuple[str, str, dict]], levels: int, worker: int) -> int:
    """Log each trial the way a job does: params, its results rows, artifacts, FINISHED."""
    from jobs.tracking import TrialRun

    start = time.perf_counter()
    for i, (tid, name, settings) in enumerate(trials, 1):
        run = TrialRun(target, tid, name, settings, {"executor": "bench", "device_used": "cpu"})
        rows = rows_for(tid, settings, levels)
        run.log_rows(rows)
        run.finish(rows, settings)
        if i % 500 == 0:
            say(f"  worker {worker}: {i}/{len(trials)} trials, {time.perf_counter() - start:.0f} s")
    return len(trials)


def build(store: Path, trials: int, levels: int, workers: int) -> None:
    """Create the store and log ``trials`` trials into it from ``workers`` processes."""
    from runner.grid import expand
    from runner.spec import load_spec
    from runner.store import prepare

    for name in ("mlflow.db", "params.json", "aggregate.yaml"):
        (store / name).unlink(missing_ok=True)
    shutil.rmtree(store / "mlruns", ignore_errors=True)
    store.mkdir(parents=True, exist_ok=True)
    spec = load_spec(sweep_file(store, trials, levels))
    _, grid = expand(spec)
    chosen = [(t.id, t.name, t.flat) for t in grid[:trials]]
    target = prepare(spec.tracking, spec.name)  # SQLite must be created by one process
    say(f"building {store}: {len(chosen)} trials x {levels} levels from {workers} processes ...")
    start = time.perf_counter()
    chunks = [chosen[w::workers] for w in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = sum(pool.map(write_trials, [target] * workers, chunks, [levels] * workers, range(workers)))
    say(f"built {done} trials in {time.perf_counter() - start:.0f} s")
    (store / "params.json").write_text(json.dumps({"trials": trials, "levels": levels, "version": FORMAT_VERSION}))


def naive_frame(client, runs: list) -> "pd.DataFrame":
    """The rows the naive way gets: one ``get_metric_history`` per run and metric key."""
    import pandas as pd

    records = []
    for run in runs:
        rows: dict[tuple[int, str], dict] = {}
        for key in run.data.metrics:
            stage = run.data.params["quant"] if key.startswith("quant.") else "float"
            name = key[len("quant."):] if stage != "float" else key
            for m in client.get_metric_history(run.info.run_id, key):
                rows.setdefault((m.step, stage), {})[name] = m.value
        for (level, stage), values in rows.items():
            records.append({"run_id": run.info.run_id, "level": level, "stage": stage, **values})
    return pd.DataFrame(records)


def compare(ours, naive) -> list[str]:
    """Differences between our frame and the naive one on the runs the naive way read."""
    import numpy as np

    from analysis.export import ID_COLUMNS
    from jobs.config import SETTINGS

    keys = ["run_id", "level", "stage"]
    mine = ours[ours["run_id"].isin(set(naive["run_id"]))].copy()
    mine["level"] = mine["level"].astype(int)
    mine, theirs = mine.set_index(keys).sort_index(), naive.set_index(keys).sort_index()
    if list(mine.index) != list(theirs.index):
        return [f"rows differ: {len(mine)} ours vs {len(theirs)} naive"]
    metrics = {c for c in mine.columns if c not in ID_COLUMNS and c not in SETTINGS} | set(theirs.columns)
    problems = []
    for col in sorted(metrics):
        a = mine[col].to_numpy(dtype=float) if col in mine else np.full(len(mine), np.nan)
        b = theirs[col].to_numpy(dtype=float) if col in theirs else np.full(len(theirs), np.nan)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if not same.all():
            problems.append(f"{col}: {int((~same).sum())} values differ, e.g. {a[~same][:3]} vs {b[~same][:3]}")
    return problems


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def cli_export(uri: str, out: Path) -> float:
    """``sweep export`` as a subprocess, until it returns."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "export", SWEEP, "--tracking-uri", uri, "-o", str(out)],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        say(proc.stdout + proc.stderr)
        raise SystemExit(1)
    say(f"  {proc.stdout.strip()}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000, help="finished trials in the store (default 10000)")
    parser.add_argument("--levels", type=int, default=20, help="levels per trial, dense included (default 20)")
    parser.add_argument("--store", type=Path, default=REPO / "bench" / ".cache" / "aggregate",
                        help="directory of the cached store (default bench/.cache/aggregate)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the store even if it matches")
    parser.add_argument("--workers", type=int, default=2, help="processes writing the store (default 2)")
    parser.add_argument("--naive-sample", type=int, default=None, metavar="K",
                        help="time the naive way on K random runs and extrapolate (default: all runs if the "
                             "estimate is under --naive-budget, else 300)")
    parser.add_argument("--naive-budget", type=float, default=120.0,
                        help="seconds the naive way may take on all runs by default (default 120)")
    parser.add_argument("--repeat", type=int, default=3, help="in-process runs_frame timings, median (default 3)")
    parser.add_argument("--build-only", action="store_true", help="build the store and stop")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of runs_frame")
    args = parser.parse_args()
    if args.levels < 2:
        parser.error("--levels must be at least 2 (the dense level and one pruning level)")
    store = args.store.resolve()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    wanted = {"trials": args.trials, "levels": args.levels, "version": FORMAT_VERSION}
    params = store / "params.json"
    if not args.rebuild and params.exists() and json.loads(params.read_text()) == wanted:
        say(f"reusing {store} ({args.trials} trials x {args.levels} levels)")
    else:
        build(store, args.trials, args.levels, args.workers)
    if args.build_only:
        return 0

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from analysis.export import runs_frame

    say(f"\nours, in-process: runs_frame({SWEEP!r}), {args.repeat}x")
    times = []
    for _ in range(args.repeat):
        frame, seconds = timed(runs_frame, uri, SWEEP)
        times.append(seconds)
        say(f"  {len(frame)} rows x {frame.shape[1]} columns, {frame['trial_id'].nunique()} trials in {seconds:.2f} s")
    ours = statistics.median(times)
    if frame["trial_id"].nunique() != args.trials or (frame["status"] != "FINISHED").any():
        say(f"FAIL: expected {args.trials} FINISHED trials")
        return 1
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(runs_frame, uri, SWEEP)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)

    from analysis.export import export

    writes = {}
    for suffix in ("parquet", "csv"):
        _, writes[suffix] = timed(export, frame, store / f"inprocess.{suffix}")
    say(f"  writing it in-process: .parquet {writes['parquet']:.2f} s, .csv {writes['csv']:.2f} s")

    say("\nours, CLI: sweep export (subprocess)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import runner.cli, analysis.export"], check=True, env=env)
    imports = time.perf_counter() - start
    say(f"  Python start-up and imports alone (runner.cli, analysis.export, hence mlflow): {imports:.2f} s")
    cli = {}
    for suffix in ("parquet", "csv"):
        cli[suffix] = cli_export(uri, store / f"export.{suffix}")
        say(f"  -o export.{suffix}: {cli[suffix]:.2f} s")

    say("\nnaive: search_runs, then get_metric_history per run and metric key")
    client = MlflowClient(uri)
    (runs, search_s) = timed(lambda: list(client.search_runs([client.get_experiment_by_name(SWEEP).experiment_id],
                                                             max_results=50_000)))
    say(f"  search_runs: {len(runs)} runs in {search_s:.2f} s")
    rng = random.Random(0)
    sample = args.naive_sample
    if sample is None:
        probe = rng.sample(runs, min(50, len(runs)))
        _, probe_s = timed(naive_frame, client, probe)
        estimate = search_s + probe_s / len(probe) * len(runs)
        sample = len(runs) if estimate <= args.naive_budget else min(300, len(runs))
        say(f"  estimate for all {len(runs)} runs from {len(probe)}: {estimate:.0f} s "
            f"({'under' if sample == len(runs) else 'over'} the {args.naive_budget:.0f} s budget)")
    sampled = runs if sample >= len(runs) else rng.sample(runs, sample)
    calls = sum(len(r.data.metrics) for r in sampled)
    naive, hist_s = timed(naive_frame, client, sampled)
    extrapolated = len(sampled) < len(runs)
    naive_total = search_s + hist_s / len(sampled) * len(runs)
    say(f"  {calls} get_metric_history calls for {len(sampled)} runs in {hist_s:.2f} s "
        f"({hist_s / calls * 1000:.2f} ms per call)")
    if extrapolated:
        say(f"  EXTRAPOLATED to all {len(runs)} runs: {search_s:.2f} + {hist_s:.2f} x {len(runs)}/{len(sampled)} "
            f"= {naive_total:.0f} s")
    else:
        say(f"  measured on all {len(runs)} runs: {naive_total:.1f} s")

    problems = compare(frame, naive)
    if problems:
        say("FAIL: the two ways disagree:\n  " + "\n  ".join(problems[:20]))
        return 1
    say(f"\nsame values: {len(naive)} rows of {naive['run_id'].nunique()} runs, "
        f"{naive.shape[1] - 3} metric columns, equal in both frames")
    kind = "extrapolated" if extrapolated else "measured"
    say(f"\nload average while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    say(textwrap.dedent(f"""
        | path | s for {args.trials} trials x {args.levels} levels | ratio naive / path |
        |---|---|---|
        | `runs_frame` in-process (median of {args.repeat}) | {ours:.2f} | {naive_total / ours:.0f}x |
        | `sweep export -o .parquet` (subprocess) | {cli['parquet']:.2f} | {naive_total / cli['parquet']:.0f}x |
        | `sweep export -o .csv` (subprocess) | {cli['csv']:.2f} | {naive_total / cli['csv']:.0f}x |
        | naive: `get_metric_history` per run and key ({kind}{'' if not extrapolated else f' from {len(sampled)} runs'}) | {naive_total:.1f} | 1x |"""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
