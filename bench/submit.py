#!/usr/bin/env python
"""Time to queue a 1,000-trial sweep on SLURM: our job arrays vs one ``sbatch`` per trial.

    sudo scripts/slurm-local.sh up          # a local cluster (or any cluster you may submit to)
    .venv/bin/python bench/submit.py        # --trials 1000 --repeat 1 --jobs 10

Three ways of putting the same N trials in the queue, each timed from the start until every
trial is queued, all submitted HELD (``--hold``) so that nothing ever runs:

* ``ours (CLI)``: ``sweep run FILE --executor slurm`` as a subprocess, i.e. what a user waits
  for, Python start-up and imports included: load and validate the file, expand the grid, ask
  the store which trials finished, prepare the store, build the payloads, pickle one file per
  trial and submit one ``sbatch`` per job array (MaxArraySize tasks each).
* ``ours (in-process)``: the same functions the CLI calls, called here with modules already
  imported, timed step by step (plan, store, payloads, pickling, sbatch).
* ``baseline``: the users' script: GNU ``parallel -P10 --header :`` running one
  ``sbatch --job-name=... --export=<the trial's settings> run-job.sh`` per grid point.

Each path puts N jobs into slurmctld (array tasks count one each against MaxJobCount) and
they stay counted MinJobAge seconds after scancel; before each submission the benchmark waits,
untimed, until N more fit with a quarter of MaxJobCount left to others.
Each submission is cancelled right after it was timed (``scancel`` of the job ids it printed,
then a check by its unique job name that nothing of it is left). Speed is reported as a ratio
against the baseline measured in the same command, never as an absolute bound.
Exit codes: 0 ok, 1 a submission failed or left jobs behind, 2 SLURM (or GNU parallel) unusable.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_FAILED, EXIT_UNUSABLE = 1, 2
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
# The realistic grid (used when --trials is a multiple of 40): 2 models x 10 ratios x 2 schedules x seeds.
MODELS = ["lenet5", "resnet18"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
ITERATIONS = [1, 2]
FIXED = {"dataset": "synthetic", "prune.method": "l1_global", "train.epochs": 1, "quant": "none"}
# setting -> the variable name the users' run-job.sh reads from --export
EXPORT_NAMES = {"dataset": "dataset", "model": "model", "train.epochs": "epochs",
                "prune.iterations": "pruning_iterations", "prune.method": "pruning_method",
                "prune.ratio": "pruning_ratio", "quant": "quant", "seed": "seed"}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------- the cluster

def refuse(msg: str) -> None:
    print(f"bench/submit.py: {msg}", file=sys.stderr)
    sys.exit(EXIT_UNUSABLE)


def check_cluster(trials: int) -> dict[str, int]:
    """Exit 2 unless SLURM takes jobs and the job records fit; return the limits that matter."""
    hint = "start a local cluster with `sudo scripts/slurm-local.sh up`"
    for tool in ("sbatch", "squeue", "scancel", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            refuse(f"SLURM is not reachable: `{tool}` not found; {hint}")
    proc = run(["scontrol", "ping"], timeout=10)
    if proc is None or proc.returncode != 0:
        out = "" if proc is None else (proc.stdout + proc.stderr).strip()
        refuse(f"SLURM is not reachable: slurmctld does not answer `scontrol ping` ({out[:200] or 'no answer'}); {hint}")
    proc = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
    nodes = [line.split() for line in (proc.stdout if proc else "").splitlines() if line.strip()]
    if not any(len(n) == 2 and n[1] in USABLE_NODE_STATES for n in nodes):
        refuse(f"SLURM has no node that takes jobs (sinfo: {nodes or 'nothing'}); {hint}")
    if shutil.which("parallel") is None:
        refuse("GNU parallel not found (the baseline runs the users' `parallel ... sbatch` script); "
               "install it: `sudo apt-get install -y parallel`")
    proc = run(["scontrol", "show", "config"], timeout=10)
    config = proc.stdout if proc and proc.returncode == 0 else ""

    def setting(name: str, default: int) -> int:
        match = re.search(rf"^{name}\s*=\s*(\d+)", config, re.M)
        return int(match.group(1)) if match else default

    limits = {"MaxArraySize": setting("MaxArraySize", 1001), "MaxJobCount": setting("MaxJobCount", 10000),
              "MinJobAge": setting("MinJobAge", 300)}
    limits["records_now"] = job_records()
    # Every trial counts against MaxJobCount, array task or not, and stays counted MinJobAge
    # seconds after scancel. Leave a quarter of it to whoever else uses the cluster.
    if trials > limits["MaxJobCount"] - reserve(limits):
        refuse(f"{trials} trials do not fit under MaxJobCount={limits['MaxJobCount']} while leaving "
               f"{reserve(limits)} job records to others; use fewer --trials")
    return limits


def reserve(limits: dict[str, int]) -> int:
    """Job records (MaxJobCount) this benchmark never takes: other users and tests need them."""
    return limits["MaxJobCount"] // 4


def job_records() -> int:
    """Jobs slurmctld holds now, each array task counted (as MaxJobCount counts them)."""
    proc = run(["squeue", "-h", "-r", "-t", "all", "-o", "%i"], timeout=60)
    return len(proc.stdout.splitlines()) if proc and proc.returncode == 0 else 0


def wait_for_room(limits: dict[str, int], trials: int) -> str:
    """Wait until `trials` more jobs fit under MaxJobCount with the reserve left; '' or a problem.

    Cancelled jobs keep their record MinJobAge seconds: with --repeat the benchmark would
    otherwise fill slurmctld (sbatch then retries for minutes and fails with "Resource
    temporarily unavailable", for everyone on the cluster).
    """
    limit = limits["MaxJobCount"] - reserve(limits)
    deadline, told = time.monotonic() + limits["MinJobAge"] + 180, False
    while True:
        now = job_records()
        if now + trials <= limit:
            return ""
        if time.monotonic() > deadline:
            return f"slurmctld still holds {now} job records; {trials} more would pass {limit} (MaxJobCount - reserve)"
        if not told:
            say(f"  waiting for slurmctld to purge old job records ({now} held, {trials} more would pass "
                f"{limit}; cancelled jobs stay MinJobAge={limits['MinJobAge']} s)...")
            told = True
        time.sleep(5)


def queued(name: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every queued job or array task with this job name."""
    proc = run(["squeue", "-h", "-r", "-n", name, "-o", "%i|%T|%r"], timeout=60)
    if proc is None or proc.returncode != 0:
        return []
    return [tuple(line.split("|", 2)) for line in proc.stdout.splitlines() if line.count("|") == 2]


def check_held(name: str, trials: int) -> str:
    """A problem with what `name` put in the queue, or '' if all trials wait held."""
    rows = queued(name)
    if len(rows) != trials:
        return f"{len(rows)} queued tasks named {name}, expected {trials}"
    bad = [r for r in rows if r[1] != "PENDING" or "Held" not in r[2]]
    return f"{len(bad)} of them not pending held, e.g. {bad[0]}" if bad else ""


def cancel(ids: list[str], name: str) -> str:
    """scancel exactly these job ids, wait until nothing named `name` is queued; '' or a problem."""
    for start in range(0, len(ids), 500):
        run(["scancel", *ids[start:start + 500]], timeout=120)
    deadline = time.monotonic() + 60
    while True:
        left = [r for r in queued(name) if r[1] not in ("CANCELLED", "COMPLETED")]
        if not left:
            return ""
        if time.monotonic() > deadline:
            return f"{len(left)} jobs named {name} still queued after scancel: {[r[0] for r in left[:5]]}"
        # Anything with our unique name that we did not see (a submission that failed half-way).
        strays = sorted({r[0].split("_")[0] for r in left} - set(ids))
        if strays:
            run(["scancel", *strays], timeout=120)
            ids = ids + strays
        time.sleep(0.5)


# ---------------------------------------------------------------- the sweep

def grid(trials: int) -> dict[str, list]:
    """The axes: 2 models x 10 ratios x 2 schedules x seeds when that gives N, else N seeds."""
    if trials % 40 == 0:
        return {"model": MODELS, "prune.ratio": RATIOS, "prune.iterations": ITERATIONS,
                "seed": list(range(trials // 40))}
    return {"seed": list(range(trials))}


def write_sweep(folder: Path, name: str, job_name: str, axes: dict[str, list]) -> Path:
    import yaml

    spec = {"name": name, "description": "bench/submit.py: held no-op trials, cancelled after timing",
            "grid": axes, "fixed": FIXED,
            "launcher": {"executor": "slurm", "max_parallel": 40, "timeout_min": 10,
                         "folder": str(folder / "submitit"),
                         "slurm": {"additional_parameters": {"hold": True, "job_name": job_name}}}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------- the three paths

class Run:
    def __init__(self, path: str, seconds: float, sbatch_calls: int, ids: list[str], steps=None, error=""):
        self.path, self.seconds, self.sbatch_calls, self.ids = path, seconds, sbatch_calls, ids
        self.steps, self.error = steps or {}, error


def ours_cli(work: Path, uri: str, name: str, axes, trials: int) -> Run:
    """`sweep run FILE --executor slurm` as the user runs it; returns when all are queued."""
    sweep_file = write_sweep(work, name, name, axes)
    sweep_bin = Path(sys.executable).with_name("sweep")
    cmd = ([str(sweep_bin)] if sweep_bin.exists() else [sys.executable, "-m", "runner.cli"])
    t0 = time.perf_counter()
    proc = run(cmd + ["run", str(sweep_file), "--executor", "slurm", "--tracking-uri", uri], timeout=900, cwd=work)
    seconds = time.perf_counter() - t0
    out = "" if proc is None else proc.stdout + proc.stderr
    match = re.search(r"submitted (\d+) trials as job array\(s\) ([\d, ]+);", out)
    if proc is None or proc.returncode != 0 or not match:
        return Run("ours (CLI)", seconds, 0, [], error=f"sweep run failed: {out.strip()[-500:]}")
    arrays = [a.strip() for a in match.group(2).split(",")]
    return Run("ours (CLI)", seconds, len(arrays), arrays,
               error="" if int(match.group(1)) == trials else f"submitted {match.group(1)} of {trials}")


def ours_in_process(work: Path, uri: str, name: str, axes, trials: int) -> Run:
    """The functions `sweep run` calls, in this process, with each step timed."""
    import submitit.core.utils as sutils
    from submitit.slurm.slurm import SlurmExecutor

    from runner.cli import sweep_folder
    from runner.grid import expand
    from runner.launch import EXECUTORS, packed_jobs, plan_for, submit_slurm
    from runner.spec import load_spec
    from runner.status import trial_statuses
    from runner.store import prepare, resolve_uri

    sweep_file = write_sweep(work, name, name, axes)
    spent = {"pickle": 0.0, "sbatch": 0.0, "calls": 0}
    dump, submit_command = sutils.DelayedSubmission.dump, SlurmExecutor._submit_command

    def timed_dump(self, path):
        t = time.perf_counter()
        try:
            return dump(self, path)
        finally:
            spent["pickle"] += time.perf_counter() - t

    def timed_submit(self, command):
        t = time.perf_counter()
        try:
            return submit_command(self, command)
        finally:
            spent["sbatch"] += time.perf_counter() - t
            spent["calls"] += 1

    sutils.DelayedSubmission.dump, SlurmExecutor._submit_command = timed_dump, timed_submit
    try:
        t0 = time.perf_counter()
        spec = load_spec(str(sweep_file))
        target_uri = resolve_uri(uri, spec.tracking)
        folder = sweep_folder(spec)
        _, grid_trials = expand(spec)
        t_expand = time.perf_counter()
        statuses, _ = trial_statuses(grid_trials, spec.name, target_uri, folder)
        todo = [st.trial for st in statuses if st.state in ("not submitted", "failed", "cancelled")]
        t_plan = time.perf_counter()
        target = prepare(target_uri, spec.name)
        t_store = time.perf_counter()
        max_parallel = spec.launcher.get("max_parallel", 2)
        ex = EXECUTORS["slurm"](folder, spec.launcher, max_parallel)
        stage_plan = plan_for(todo, "slurm", max_parallel, folder, spec.launcher)
        packed = packed_jobs(stage_plan, todo, target, "slurm", folder, max_parallel)
        t_payloads = time.perf_counter()
        submitted = [job for job, _ in submit_slurm(ex, packed, stage_plan, folder)]
        t_end = time.perf_counter()
    finally:
        sutils.DelayedSubmission.dump, SlurmExecutor._submit_command = dump, submit_command
    arrays = sorted({str(j.job_id).split("_")[0] for j in submitted})
    submit = t_end - t_payloads
    steps = {"load+validate+expand": t_expand - t0, "store: finished trials?": t_plan - t_expand,
             "store: prepare experiment": t_store - t_plan, "executor+payloads": t_payloads - t_store,
             "submitit: pickle 1 file/trial": spent["pickle"], "sbatch (script + call)": spent["sbatch"],
             "rest of submit (moves, job records)": submit - spent["pickle"] - spent["sbatch"]}
    return Run("ours (in-process)", t_end - t0, spent["calls"], arrays, steps,
               error="" if len(submitted) == trials else f"submitted {len(submitted)} of {trials}")


def baseline(work: Path, name: str, axes, trials: int, jobs: int) -> Run:
    """The users' script: parallel -P<jobs> --header : sbatch --export=<trial> run-job.sh ::: ..."""
    script = work / "run-job.sh"
    script.write_text("#!/bin/bash\n# the users' job script; held, so it never runs\nexit 0\n")
    script.chmod(0o755)
    settings = {**{k: [v] for k, v in FIXED.items()}, **axes}  # single-valued ::: like `::: max_epochs 50`
    export = ",".join(f"{EXPORT_NAMES[k]}={{{EXPORT_NAMES[k]}}}" for k in settings)
    cmd = ["parallel", f"-P{jobs}", "--header", ":", "--will-cite",
           "sbatch", "--hold", "--parsable", f"--job-name={name}", f"--export={export}", str(script)]
    for key, values in settings.items():
        cmd += [":::", EXPORT_NAMES[key], *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)]
    t0 = time.perf_counter()
    proc = run(cmd, timeout=3600, cwd=work)
    seconds = time.perf_counter() - t0
    out = "" if proc is None else proc.stdout
    ids = [line.split(";")[0].strip() for line in out.splitlines() if re.fullmatch(r"\d+(;\S+)?", line.strip())]
    error = ""
    if proc is None or proc.returncode != 0 or len(ids) != trials:
        err = "" if proc is None else proc.stderr.strip()
        error = (f"parallel exit {None if proc is None else proc.returncode}, {len(ids)} of {trials} "
                 f"job ids; {err[-300:]}")
    return Run(f"baseline (parallel -P{jobs}, 1 sbatch/trial)", seconds, len(ids), ids, error=error)


# ---------------------------------------------------------------- main

def warm_up(root: Path, uri: str, tag: str, axes) -> float:
    """Untimed: import what the in-process path needs and create the store; returns the import time.

    Users already have a store; creating a fresh SQLite store runs MLflow's migrations, a
    one-off cost not worth timing. The imports are what `sweep run` pays at every start.
    """
    import logging

    t0 = time.perf_counter()
    from runner.grid import expand
    from runner.launch import EXECUTORS  # noqa: F401  (submitit)
    from runner.spec import load_spec
    from runner.store import prepare

    warm = root / "warmup"
    warm.mkdir()
    expand(load_spec(str(write_sweep(warm, f"bench-warmup-{tag}", f"bench-warmup-{tag}", axes))))
    first_use = time.perf_counter() - t0  # torch/torchvision (to validate model names), mlflow, submitit
    for logger in ("mlflow", "alembic"):  # quiet the new store's migrations (mlflow sets INFO on import)
        logging.getLogger(logger).setLevel(logging.WARNING)
    prepare(uri, f"bench-warmup-{tag}")
    return first_use


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000, help="trials per submission (default 1000)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each path K times, report the median")
    parser.add_argument("--jobs", type=int, default=10, help="baseline: sbatch calls at once (parallel -P)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (sweep files, pickles)")
    args = parser.parse_args(argv)
    if args.trials < 2 or args.repeat < 1 or args.jobs < 1:
        parser.error("--trials >= 2, --repeat >= 1, --jobs >= 1")

    limits = check_cluster(args.trials)
    axes = grid(args.trials)
    shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
    chunks = -(-args.trials // limits["MaxArraySize"])
    say(f"{args.trials} trials ({shape}; {', '.join(f'{k}={v}' for k, v in FIXED.items())}), all submitted held")
    say(f"cluster: MaxArraySize={limits['MaxArraySize']} -> {chunks} array(s) of at most "
        f"{limits['MaxArraySize']}; MaxJobCount={limits['MaxJobCount']} (every array task counts), "
        f"{limits['records_now']} held now, {reserve(limits)} always left to others")

    tag = uuid.uuid4().hex[:8]
    root = Path(tempfile.mkdtemp(prefix=f"bench-submit-{tag}-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    results: dict[str, list[Run]] = {}
    problems: list[str] = []
    try:
        first_use = warm_up(root, uri, tag, axes)
        for rep in range(args.repeat):
            for kind in ("cli", "inproc", "baseline"):
                name = f"bench-{kind}-{tag}-{rep}"
                work = root / name
                work.mkdir()
                ids: list[str] = []
                wait_problem = wait_for_room(limits, args.trials)  # untimed
                if wait_problem:
                    problems.append(wait_problem)
                    break
                try:
                    if kind == "cli":
                        r = ours_cli(work, uri, name, axes, args.trials)
                    elif kind == "inproc":
                        r = ours_in_process(work, uri, name, axes, args.trials)
                    else:
                        r = baseline(work, name, axes, args.trials, args.jobs)
                    ids = r.ids
                    problem = r.error or check_held(name, args.trials)
                    say(f"  run {rep + 1}/{args.repeat} {r.path}: {r.seconds:.2f} s, {r.sbatch_calls} sbatch call(s)"
                        + (f"  PROBLEM: {problem}" if problem else ""))
                    if problem:
                        problems.append(f"{r.path}: {problem}")
                    results.setdefault(r.path, []).append(r)
                except Exception as exc:  # noqa: BLE001  (report it; the queue is still cleaned below)
                    problems.append(f"{kind} run {rep + 1}: {type(exc).__name__}: {str(exc).strip()[-300:]}")
                finally:
                    left = cancel(ids, name)  # also on errors and Ctrl-C: nothing of ours stays queued
                    if left:
                        problems.append(left)
            if problems:
                break  # stop at the first failure: do not keep loading a struggling slurmctld
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    report(results, args, first_use if results else 0.0)
    if problems:
        say("\nPROBLEMS:\n" + "\n".join(f"  {p}" for p in problems))
        return EXIT_FAILED
    say("\nqueue clean: every job this benchmark submitted was cancelled (checked with squeue by job name)")
    return 0


def report(results: dict[str, list[Run]], args, first_use: float) -> None:
    med = {path: statistics.median(r.seconds for r in runs) for path, runs in results.items()}
    spread = {path: f"{min(r.seconds for r in runs):.2f}-{max(r.seconds for r in runs):.2f}"
              for path, runs in results.items()}
    say(f"\ntime until all {args.trials} trials are queued ({'median of ' + str(args.repeat) if args.repeat > 1 else '1 run'})")
    head = f"{'path':<40} {'trials':>6} {'sbatch calls':>12} {'seconds':>8} {'trials/s':>9}"
    say(head + ("  min-max" if args.repeat > 1 else ""))
    say("-" * len(head))
    for path, runs in results.items():
        calls = statistics.median(r.sbatch_calls for r in runs)
        say(f"{path:<40} {args.trials:>6} {calls:>12g} {med[path]:>8.2f} {args.trials / med[path]:>9.0f}"
            + (f"  {spread[path]}" if args.repeat > 1 else ""))
    base = next((p for p in med if p.startswith("baseline")), None)
    if base:
        for ours in ("ours (CLI)", "ours (in-process)"):
            if ours in med:
                say(f"ratio baseline / {ours}: {med[base] / med[ours]:.2f}x")
    inproc = results.get("ours (in-process)")
    if inproc:
        say(f"\nours (in-process), step by step (median seconds; {args.trials} trials):")
        for step in inproc[0].steps:
            value = statistics.median(r.steps[step] for r in inproc)
            say(f"  {step:<42} {value:7.3f}  ({1000 * value / args.trials:.2f} ms/trial)")
        say(f"  (not timed above: imports on first use in this process, {first_use:.2f} s)")
        if "ours (CLI)" in med:
            say(f"  {'CLI minus in-process (start-up, imports)':<42} {med['ours (CLI)'] - med['ours (in-process)']:7.3f}")


if __name__ == "__main__":
    sys.exit(main())
