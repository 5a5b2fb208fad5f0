"""Science check: do winning tickets beat random re-initialisation at high sparsity?

Iterative global magnitude pruning of LeNet-300-100 on the bundled 8x8 digits, with the
surviving weights rewound to their initial values (`init`, the lottery ticket) or given a new
random initialisation (`reinit`, the control of Frankle & Carbin 2019), over several seeds.
Every level of a trial is one point of the curve: one trial with 10 levels gives accuracy at
10 sparsities. Runs through the sweep runner itself (debug executor, a temporary MLflow
store) and reads the results back with the exporter.

    .venv/bin/python bench/lottery_digits.py [--seeds 5] [--epochs 15] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.export import runs_frame  # noqa: E402
from runner.grid import expand  # noqa: E402
from runner.launch import EXECUTORS, packed_jobs, plan_for  # noqa: E402
from runner.local import run_local  # noqa: E402
from runner.spec import load_spec  # noqa: E402
from runner.store import prepare  # noqa: E402


def sweep_file(folder: Path, seeds: int, epochs: int, iterations: int, ratio: float) -> Path:
    """The experiment as a sweep file."""
    path = folder / "lottery_digits.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: lottery-digits
        grid:
          prune.rewind: [init, reinit]
          seed: {list(range(seeds))}
        fixed:
          dataset: digits
          model: lenet_300_100
          train.epochs: {epochs}
          train.optimizer: adam
          train.lr: 0.0012
          train.batch_size: 60
          prune.method: l1_global
          prune.ratio: {ratio}
          prune.iterations: {iterations}
          prune.layer_rates: "output:0.5"
        """))
    return path


def main() -> None:
    """Run the comparison and print accuracy by sparsity for both rewinds and their gap."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.99)
    parser.add_argument("--csv", type=Path, default=None, help="also write the aggregated curves here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = load_spec(sweep_file(folder, args.seeds, args.epochs, args.iterations, args.ratio))
        _, trials = expand(spec)
        target = prepare(f"sqlite:///{folder}/mlflow.db", spec.name)
        start = time.perf_counter()
        ex = EXECUTORS["debug"](folder / "submitit", {}, 1)
        stage_plan = plan_for(trials, "debug", 1, folder / "submitit", {})
        packed = packed_jobs(stage_plan, trials, target, "debug", folder / "submitit", 1)
        summary = run_local(ex, "debug", packed, target, folder / "submitit", 1)
        elapsed = time.perf_counter() - start
        frame = runs_frame(target.uri, spec.name)
    if summary.failed:
        raise SystemExit(f"trials failed: {summary.failed}")
    frame = frame[frame["stage"] == "float"]
    curves = (frame.groupby(["prune.rewind", "level"])
              .agg(weights_left=("sparsity", lambda s: 100 * (1 - s.mean())),
                   accuracy=("accuracy", "mean"), std=("accuracy", "std"), n=("accuracy", "size"))
              .reset_index())
    init = curves[curves["prune.rewind"] == "init"].set_index("level")
    reinit = curves[curves["prune.rewind"] == "reinit"].set_index("level")
    print(f"{len(trials)} trials ({args.seeds} seeds x init/reinit), {args.iterations} levels, "
          f"{args.epochs} epochs per level, {elapsed:.0f} s")
    print(f"{'level':>5} {'weights left %':>15} {'init acc':>14} {'reinit acc':>14} {'gap (pp)':>9}")
    for level in init.index:
        a, b = init.loc[level], reinit.loc[level]
        print(f"{level:>5} {a.weights_left:>15.1f} {a.accuracy * 100:>8.2f} ±{a['std'] * 100:4.1f} "
              f"{b.accuracy * 100:>8.2f} ±{b['std'] * 100:4.1f} {(a.accuracy - b.accuracy) * 100:>9.2f}")
    high = init.index[init.weights_left <= 10]
    gap = (init.loc[high, "accuracy"] - reinit.loc[high, "accuracy"]).mean() * 100
    print(f"mean gap at <= 10% weights left: {gap:+.2f} percentage points "
          f"({'tickets beat re-initialisation' if gap > 0 else 'no advantage for tickets'})")
    if args.csv:
        curves.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
