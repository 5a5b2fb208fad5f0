"""Sweep overhead: our runner vs the seeds' way on the lottery grid of the HPC slides, scaled to digits.

    .venv/bin/python bench/sweep_overhead.py [--epochs 50] [--jobs 2] [--keep DIR]

The grid is the slides' GNU parallel + sbatch loop (MAX_EPOCHS 50, method l1, ratios
0 ... 0.98, iterations 1 and 5, reinit false, seed 1) on ``digits`` with ``lenet_300_100``
and two quant modes (none, dynamic int8): 9 x 2 x 2 = 36 grid points. ``--epochs 5`` is a
quicker run of the same grid, where fixed start-up costs weigh ten times more.

- **ours**: ``sweep run FILE --executor local --max-parallel JOBS`` as a subprocess (start-up
  included): shared stages, packed trials, batched tracking.
- **the seeds' way**: one process per grid point, ``JOBS`` at once (what ``parallel -j JOBS``
  does), each importing torch and mlflow, training its own dense model and pruning
  trajectory (``jobs.trial.execute`` without sharing) and logging scalar by scalar with
  ``mlflow.log_param`` / ``mlflow.log_metric``.

Both write to fresh SQLite stores in the same temporary directory, on the same machine, in
this one command. The script checks that both give the same accuracies for every grid point
(fixed seeds, CPU, one thread per process) and prints both wall times and their ratio, plus
our overhead ratio: sweep wall time / the sum of the trials' own compute time (training,
evaluation, measurement and quantization, i.e. ``compute_time_s`` of every run: MLflow calls,
dataset loading, checkpoint and stage-cache I/O and waits on shared stages are logged apart;
reused levels count once, where they were computed). It also prints the ratio per process
slot (wall time x JOBS / compute), which is 1.0 for JOBS slots kept busy with compute only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RATIOS = [0, 0.1, 0.25, 0.5, 0.8, 0.9, 0.93, 0.97, 0.98]
ITERATIONS = [1, 5]
QUANT = ["none", "dynamic"]


def fixed(epochs: int) -> dict:
    """The settings every grid point shares."""
    return {"dataset": "digits", "model": "lenet_300_100", "prune.method": "l1_global", "prune.rewind": "init",
            "seed": 1, "train.epochs": epochs, "device": "cpu"}


def write_sweep(folder: Path, epochs: int, jobs: int) -> Path:
    """The grid as a sweep file of ours."""
    import yaml

    path = folder / "lottery.yaml"
    path.write_text(yaml.safe_dump({
        "name": "overhead-ours", "tracking": f"sqlite:///{folder}/ours.db",
        "grid": {"prune.ratio": RATIOS, "prune.iterations": ITERATIONS, "quant": QUANT},
        "fixed": fixed(epochs), "launcher": {"folder": str(folder / "submitit"), "max_parallel": jobs}},
        sort_keys=False))
    return path


def one_trial(settings: dict, uri: str, experiment: str) -> None:
    """The seeds' way: one process, one grid point, everything from scratch, scalar logging."""
    import mlflow
    import torch

    from jobs.config import from_flat, to_flat
    from jobs.trial import execute

    torch.set_num_threads(1)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    cfg = from_flat(settings)
    with mlflow.start_run():
        for key, value in to_flat(cfg).items():
            mlflow.log_param(key, value)

        def on_row(row):
            prefix = "" if row["stage"] == "float" else "quant."
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "level":
                    mlflow.log_metric(prefix + key, float(value), step=int(row["level"]))

        def on_curve(points):
            for point in points:
                for key in ("train_loss", "test_accuracy", "lr"):
                    mlflow.log_metric(f"epoch.{key}", float(point[key]), step=int(point["step"]))

        execute(cfg, on_row, on_curve=on_curve)


def seeds_way(folder: Path, epochs: int, jobs: int) -> float:
    """Every grid point as its own process, ``jobs`` at once; returns the wall time."""
    from runner.store import prepare

    uri = f"sqlite:///{folder}/seeds.db"
    prepare(uri, "overhead-seeds")  # a new SQLite store must not be created by 2 processes at once
    points = [{**fixed(epochs), "prune.ratio": r, "prune.iterations": i, "quant": q}
              for r in RATIOS for i in ITERATIONS for q in QUANT]

    def run(point):
        return subprocess.run([sys.executable, __file__, "--one-trial", json.dumps(point), "--uri", uri],
                              capture_output=True, text=True, cwd=folder)

    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        procs = list(pool.map(run, points))
    wall = time.perf_counter() - start
    failed = [p.stderr[-2000:] for p in procs if p.returncode != 0]
    if failed:
        raise SystemExit(f"{len(failed)} baseline trials failed:\n{failed[0]}")
    return wall


def ours(folder: Path, epochs: int, jobs: int) -> tuple[float, str]:
    """``sweep run`` as a user runs it; returns the wall time and its output."""
    path = write_sweep(folder, epochs, jobs)
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "sweep"), "run", str(path), "--executor", "local"],
                          capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


TIMES = ("compute_time_s", "tracking_time_s", "io_time_s", "stage_wait_time_s")


def accuracies(uri: str, experiment: str) -> tuple[dict, dict[str, float]]:
    """Per grid point (ratio, iterations, quant): final float and quant accuracy; sums of the runs' times."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out, times = {}, dict.fromkeys(TIMES, 0.0)
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        p, m = run.data.params, run.data.metrics
        key = (float(p["prune.ratio"]), p["prune.iterations"], p["quant"])
        out[key] = (m["accuracy"], m.get("quant.accuracy"))
        for name in TIMES:
            times[name] += m.get(name, 0.0)
    return out, times


def main() -> None:
    """Run both ways, check they agree, print the times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50, help="per level (the slides: 50)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once, both ways")
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    parser.add_argument("--one-trial", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--uri", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_trial:
        one_trial(json.loads(args.one_trial), args.uri, "overhead-seeds")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"grid: {len(RATIOS)} ratios x {len(ITERATIONS)} schedules x {len(QUANT)} quant modes = "
              f"{len(RATIOS) * len(ITERATIONS) * len(QUANT)} points; digits, lenet_300_100, {args.epochs} epochs "
              f"per level; {args.jobs} processes at once; {os.cpu_count()} cores", flush=True)
        ours_wall, output = ours(folder, args.epochs, args.jobs)
        print(f"ours: {ours_wall:.1f} s   ({[line for line in output.splitlines() if 'level stages' in line][0]})",
              flush=True)
        seeds_wall = seeds_way(folder, args.epochs, args.jobs)
        print(f"seeds' way: {seeds_wall:.1f} s", flush=True)
        mine, times = accuracies(f"sqlite:///{folder}/ours.db", "overhead-ours")
        compute = times["compute_time_s"]
        theirs, _ = accuracies(f"sqlite:///{folder}/seeds.db", "overhead-seeds")
        # Our grid folds ratio 0 into one dense trial per quant mode; the seeds ran it per schedule.
        mismatched = [k for k, v in theirs.items()
                      if mine.get(k if k[0] > 0 else (0.0, "0", k[2])) != v]
        if mismatched:
            raise SystemExit(f"results differ at {mismatched[:5]}")
        print(f"same results: {len(theirs)} grid points, float and quantized accuracy equal")
        print(f"speed-up (seeds' way / ours): {seeds_wall / ours_wall:.1f}x")
        print(f"our trials' time: compute {compute:.1f} s, MLflow {times['tracking_time_s']:.1f} s, dataset and "
              f"state I/O {times['io_time_s']:.1f} s, waiting on shared stages {times['stage_wait_time_s']:.1f} s")
        print(f"overhead ratio (ours wall / sum of trials' compute time {compute:.1f} s): "
              f"{ours_wall / compute:.2f}; per process slot: {ours_wall * args.jobs / compute:.2f}")


if __name__ == "__main__":
    main()
