"""The ``sweep`` command: validate, plan, run, export and browse a sweep."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runner.errors import spec_errors


def _load(file: str, overrides=(), launcher_overrides=()):
    from runner.spec import load_spec

    return load_spec(file, list(overrides), list(launcher_overrides))


def _console():
    from rich.console import Console

    return Console(stderr=False, soft_wrap=True)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a setting (YAML value; a list makes it an axis). Repeatable.")
uri_option = click.option("--tracking-uri", default=None,
                          help="MLflow store (default: MLFLOW_TRACKING_URI, the file's tracking, ./mlflow.db).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run pruning and quantization sweeps from one YAML file, locally or on SLURM."""


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@spec_errors
def validate(file, overrides):
    """Check a sweep file without running or logging anything."""
    from runner.grid import expand

    spec = _load(file, overrides)
    size, trials = expand(spec)
    click.echo(f"{file}: ok ({size} grid points, {len(trials)} unique trials)")


def _plan_rows(spec, uri):
    from runner.grid import expand
    from runner.store import finished_trials

    size, trials = expand(spec)
    done = finished_trials(uri, spec.name)
    rows = [{"trial_id": t.id, "name": t.name, **t.axes, "finished": t.id in done} for t in trials]
    return size, trials, rows


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@set_option
@uri_option
@spec_errors
def plan(file, fmt, overrides, tracking_uri):
    """Show the grid: its size, the unique trials and which already finished."""
    from runner.store import resolve_uri

    spec = _load(file, overrides)
    uri = resolve_uri(tracking_uri, spec.tracking)
    size, trials, rows = _plan_rows(spec, uri)
    from runner.launch import plan_for, uses_workers

    executor = spec.launcher.get("executor", "local")
    todo = [t for t, r in zip(trials, rows) if not r["finished"]]
    stage_plan = plan_for(todo, executor, spec.launcher.get("max_parallel", 2), sweep_folder(spec), spec.launcher)
    if fmt == "json":
        click.echo(json.dumps({"sweep": spec.name, "grid_size": size, "trials": rows,
                               "work": {**stage_plan.work, "jobs": len(stage_plan.packs),
                                        "stage_jobs": len(stage_plan.stage_jobs)}}, indent=2))
        return
    if fmt == "csv":
        import pandas as pd

        click.echo(pd.DataFrame(rows).to_csv(index=False), nl=False)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{spec.name}: {size} grid points, {len(trials)} unique trials, "
                               f"{sum(r['finished'] for r in rows)} finished"))
    columns = list(rows[0]) if rows else ["trial_id", "name", "finished"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(("yes" if v else "no") if k == "finished" else escape(str(v)) for k, v in row.items()))
    _console().print(table)
    workers = spec.launcher.get("max_parallel", 2) if uses_workers(executor, spec.launcher) else None
    click.echo(f"{len(todo)} trials to run on '{executor}': {stage_plan.saved(workers)}")


def sweep_folder(spec) -> Path:
    """The sweep's submitit folder: logs, pickles, job records and checkpoints (``runner.spec.sweep_folder``)."""
    from runner.spec import sweep_folder as folder_of

    return folder_of(spec)


def _statuses(file, overrides, launcher_overrides, tracking_uri, spec=None):
    """Load the sweep and the state of each of its trials: (spec, uri, trials, statuses, note)."""
    from runner.grid import expand
    from runner.status import trial_statuses
    from runner.store import resolve_uri

    spec = spec or _load(file, overrides, launcher_overrides)
    uri = resolve_uri(tracking_uri, spec.tracking)
    _, trials = expand(spec)
    statuses, note = trial_statuses(trials, spec.name, uri, sweep_folder(spec))
    return spec, uri, trials, statuses, note


launcher_option = click.option("--launcher", "launcher_overrides", multiple=True, metavar="KEY=VALUE",
                               help="Override a launcher option, e.g. timeout_min=30 or slurm.partition=gpu. "
                                    "Repeatable.")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["debug", "local", "slurm"]), default=None,
              help="Where trials run (default: the file's launcher.executor, else local).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Trials at once (default: launcher.max_parallel, else 2).")
@click.option("--dry-run", is_flag=True, help="Validate and list what would be submitted; run nothing.")
@click.option("--wait/--no-wait", default=None,
              help="SLURM: follow the jobs until all ended (default: return after submitting).")
@click.option("--retry-failed", is_flag=True, help="Submit only trials that failed, diverged, were interrupted or cancelled.")
@set_option
@launcher_option
@uri_option
@spec_errors
def run(file, executor, max_parallel, dry_run, wait, retry_failed, overrides, launcher_overrides, tracking_uri):
    """Run every trial of a sweep that has not finished and is not queued or running."""
    from runner.submission import hold_submission

    spec = _load(file, overrides, launcher_overrides)
    folder = sweep_folder(spec)
    # One submission of a sweep at a time: a second `sweep run` would run its trials again.
    with hold_submission(folder, spec.name, dry_run):
        _run(file, spec, folder, executor, max_parallel, dry_run, wait, retry_failed, overrides, launcher_overrides,
             tracking_uri)


def _run(file, spec, folder, executor, max_parallel, dry_run, wait, retry_failed, overrides, launcher_overrides,
         tracking_uri):
    from runner.status import ACTIVE
    from runner.submission import assign_jobs, mark_queued

    spec, uri, trials, statuses, note = _statuses(file, overrides, launcher_overrides, tracking_uri, spec)
    executor = executor or spec.launcher.get("executor", "local")
    max_parallel = max_parallel or spec.launcher.get("max_parallel", 2)
    # A diverged trial would diverge again (training is deterministic): only --retry-failed reruns it.
    wanted = ("failed", "diverged", "cancelled", "interrupted") if retry_failed else (
        "not submitted", "failed", "cancelled", "interrupted")
    todo = [st.trial for st in statuses if st.state in wanted]
    n_done = sum(st.state == "finished" for st in statuses)
    n_active = sum(st.state in ACTIVE for st in statuses)
    click.echo(f"{spec.name}: {len(trials)} trials: {n_done} finished, {n_active} queued or running, "
               f"{len(todo)} to run on '{executor}' (max {max_parallel} at once); store {uri}")
    if note:
        click.echo(f"note: {note}", err=True)
    if dry_run:
        for t in todo:
            click.echo(f"  would run {t.id}  {t.name}")
        return
    if not todo:
        click.echo("nothing to do")
        return
    from jobs.task import TrackingTarget
    from runner.launch import (DEFAULT_CHECKPOINT_EVERY_S, EXECUTORS, packed_jobs, plan_for, submit_slurm,
                               threads_per_trial, uses_workers)
    from runner.local import follow_workers, run_local, start_workers
    from runner.launch import wait as wait_for
    from runner.store import prepare

    workers = uses_workers(executor, spec.launcher)
    stage_plan = plan_for(todo, executor, max_parallel, folder, spec.launcher)
    click.echo(stage_plan.saved(max_parallel if workers else None))
    # Local workers create the store themselves, the first while the others import (start_workers);
    # a store they could not write is said here once, before any worker starts.
    if workers:
        from jobs.storeguard import check_uri, check_writable, store_errors, store_lock

        check_uri(uri)
        with store_errors(uri), store_lock(uri):  # the lock file: a directory we can write in
            check_writable(uri)
    target = TrackingTarget(uri, None, spec.name) if workers else prepare(uri, spec.name)
    ex = EXECUTORS[executor](folder, {"job_name": spec.name, **spec.launcher}, max_parallel)
    packed = packed_jobs(stage_plan, todo, target, executor, folder, max_parallel,
                         spec.launcher.get("share_stages", True), spec.launcher.get("trials_at_once", 1),
                         workers=workers, checkpoint_every_s=spec.launcher.get(
                             "checkpoint_every_s", DEFAULT_CHECKPOINT_EVERY_S))
    if executor == "slurm":
        mark_queued(folder, todo, executor)
        try:
            submitted = submit_slurm(ex, packed, stage_plan, folder, threads_per_trial(executor, max_parallel))
        except Exception as exc:  # sbatch refused (limits, bad partition...): say it in one line
            first = str(exc).strip().splitlines()
            raise click.ClickException(f"sbatch failed: {first[-1] if first else type(exc).__name__}") from None
        assign_jobs(folder, {trial.id: str(job.job_id) for job, pack in submitted for trial in pack.trials})
        arrays = sorted({str(j.job_id).split("_")[0] for j, _ in submitted})
        if stage_plan.stage_jobs:
            click.echo(f"dense stages first: {len(stage_plan.stage_jobs)} stage job(s); the trials' arrays "
                       "depend on them")
        click.echo(f"submitted {len(todo)} trials as job array(s) {', '.join(arrays)}; "
                   f"{len(submitted)} array task(s); logs in {folder.resolve()}")
        if not wait:
            click.echo(f"follow with: sweep status {file}")
            return
        summary = _with_progress(len(todo), lambda progress: wait_for(submitted, target, progress))
    elif workers:
        mark_queued(folder, todo, executor)
        started = start_workers(ex, packed, folder)
        summary = _with_progress(len(todo), lambda progress: follow_workers(started, progress))
    else:
        mark_queued(folder, todo, executor)
        summary = _with_progress(len(todo), lambda progress: run_local(
            ex, executor, packed, target, folder, max_parallel, progress))
    held = f", running elsewhere {len(summary.held)}" if summary.held else ""
    click.echo(f"finished {len(summary.finished)}, skipped {len(trials) - len(todo)}, failed {len(summary.failed)}"
               f"{held}")
    names = {t.id: t.name for t in trials}
    for tid, why in summary.held.items():
        click.echo(f"  not run twice: {tid} {names[tid]}: {why}", err=True)
    for tid, error in summary.failed.items():
        click.echo(f"  FAILED {tid} {names[tid]}: {error}", err=True)
    if not summary.ok:
        sys.exit(1)


def _with_progress(total, body):
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"),
                  console=_console(), transient=False) as bar:
        task = bar.add_task("trials", total=total, last="")

        def progress(trial, status):
            bar.update(task, advance=1, last=escape(f"{status}: {trial.name}"))

        return body(progress)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@set_option
@launcher_option
@uri_option
@spec_errors
def status(file, fmt, overrides, launcher_overrides, tracking_uri):
    """Show each trial's state from the tracking store and the scheduler."""
    from collections import Counter

    from runner.status import STATES

    spec, _, _, statuses, note = _statuses(file, overrides, launcher_overrides, tracking_uri)
    rows = [{"trial_id": st.trial.id, "name": st.trial.name, "state": st.state, "job_id": st.job_id,
             "elapsed": st.elapsed, "last_level": st.last_level, "error": st.error, "log": st.log}
            for st in statuses]
    counts = Counter(st.state for st in statuses)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
    if fmt == "json":
        click.echo(json.dumps({"sweep": spec.name, "counts": dict(counts), "note": note, "trials": rows}, indent=2))
        return
    if fmt == "csv":
        import pandas as pd

        click.echo(pd.DataFrame(rows).to_csv(index=False), nl=False)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{spec.name}: {summary}"))
    for col in ("trial_id", "name", "state", "job_id", "elapsed", "last_level", "error", "log"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(escape(str(v)) for v in row.values()))
    _console().print(table)
    if note:
        click.echo(f"note: {note}", err=True)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trial", "trial_ids", multiple=True, metavar="ID", help="Cancel only these trials. Repeatable.")
@set_option
@launcher_option
@uri_option
@spec_errors
def cancel(file, trial_ids, overrides, launcher_overrides, tracking_uri):
    """Cancel the sweep's queued and running SLURM jobs (or only some trials'), or interrupt its local run."""
    from jobs.ledger import Ledger
    from runner import scheduler
    from runner.status import ACTIVE

    spec, _, trials, statuses, _ = _statuses(file, overrides, launcher_overrides, tracking_uri)
    unknown = set(trial_ids) - {t.id for t in trials}
    if unknown:
        raise click.ClickException(f"not trials of {spec.name}: {', '.join(sorted(unknown))}")
    active = [st for st in statuses if st.state in ACTIVE and (not trial_ids or st.trial.id in trial_ids)]
    chosen = [st for st in active if st.executor == "slurm" and st.job_id]
    if any(st.executor != "slurm" for st in active):
        _stop_local_run(spec, sweep_folder(spec), bool(trial_ids))
    stages = [] if trial_ids else _active_stage_jobs(sweep_folder(spec))
    if not chosen and not stages:
        if not active:
            click.echo("nothing queued or running to cancel")
        return
    ok, message = scheduler.cancel([st.job_id for st in chosen] + stages)
    if not ok:
        raise click.ClickException(f"scancel failed: {message}")
    book = Ledger.of(sweep_folder(spec))
    for st in chosen:
        book.update(st.trial.id, state="cancelled", error="cancelled by sweep cancel")
        click.echo(f"cancelled {st.trial.id} {st.trial.name} (job {st.job_id})")
    if stages:
        click.echo(f"cancelled {len(stages)} dense stage job(s)")


def _stop_local_run(spec, folder: Path, some_trials: bool) -> None:
    """Local trials belong to the `sweep run` that started them: interrupt it (as Ctrl-C would)."""
    import os
    import signal
    import socket

    from jobs.ledger import SUBMISSION, Ledger

    if some_trials:
        raise click.ClickException("local trials cannot be cancelled one by one (their workers share them out); "
                                   "stop the whole `sweep run` with `sweep cancel FILE` or Ctrl-C")
    holder, live = Ledger.of(folder).holder(SUBMISSION)
    if not live or holder is None or holder.host != socket.gethostname():
        where = f" on {holder.host}" if holder is not None and live else ""
        raise click.ClickException(f"the `sweep run` of {spec.name} runs{where} elsewhere: stop it there")
    os.kill(holder.pid, signal.SIGTERM)
    click.echo(f"interrupted the `sweep run` of {spec.name} ({holder.describe()}); its trials stop at their "
               "checkpoints and a re-run resumes them")


def _active_stage_jobs(folder: Path) -> list[str]:
    """Job ids of the sweep's dense stage jobs (see runner/plan.py) still queued or running."""
    from runner import records, scheduler

    ids = [r.job_id for r in records.latest(folder).values() if r.trial_id.startswith("stage:")]
    states, _ = scheduler.job_states(ids) if ids else ({}, None)
    return [j for j in ids if states.get(j, {}).get("state") in scheduler.ACTIVE]


@main.command()
@click.argument("sweeps", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file: .csv or .parquet.")
@uri_option
@spec_errors
def export(sweeps, output, tracking_uri):
    """Write one tidy row per trial × level × stage for sweep files or experiment names."""
    from analysis.export import export as write
    from analysis.export import load

    try:
        frame = load(sweeps, tracking_uri)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    path = write(frame, output)
    click.echo(f"wrote {len(frame)} rows ({frame['trial_id'].nunique()} trials) to {path}")


@main.command()
@click.argument("sweep", required=False)
@click.option("--port", type=int, default=5055, show_default=True)
@uri_option
@spec_errors
def ui(sweep, port, tracking_uri):
    """Serve the MLflow UI for the store on 127.0.0.1 and print the runs table's URL."""
    from runner.store import find_experiment_id, require_store, resolve_uri
    from runner.ui import PortInUse, check_port, serve

    spec_uri, name = None, None
    if sweep and Path(sweep).is_file():
        spec = _load(sweep)
        spec_uri, name = spec.tracking, spec.name
    elif sweep:
        name = sweep
    uri = resolve_uri(tracking_uri, spec_uri)
    require_store(uri)  # the server would create an empty one
    exp_id = find_experiment_id(uri, name) if name else None
    if name and exp_id is None:
        raise click.ClickException(f"no experiment named '{name}' in {uri}")
    try:
        check_port(port)  # before starting a server for nothing
        serve(uri, port, exp_id, echo=click.echo)
    except PortInUse as exc:
        raise click.ClickException(str(exc)) from None


def settings_table() -> str:
    """Markdown reference of every setting: key, type, default, what is allowed."""
    from jobs.config import SETTINGS

    lines = ["| key | type | default | meaning and allowed values |", "|---|---|---|---|"]
    for key, info in SETTINGS.items():
        allowed_values = f"; one of: {', '.join(info.choices())}" if info.choices else ""
        bound = f"; {info.check[1]}" if info.check else ""
        default = str(info.default).lower() if info.type is bool else info.default
        lines.append(f"| `{key}` | {info.type.__name__} | `{default}` | {info.doc}{allowed_values}{bound} |")
    return "\n".join(lines)


@main.command()
def settings():
    """Print every setting a sweep file can fix or sweep over (Markdown table)."""
    click.echo(settings_table())


def _register_data_group() -> None:
    from runner.datacmd import data

    main.add_command(data)


def _register_analysis_commands() -> None:
    from runner.analysis_cli import report, summary

    main.add_command(summary)
    main.add_command(report)


_register_data_group()
_register_analysis_commands()

def entry() -> None:
    """The ``sweep`` console script: ``main``, then exit without tearing down the interpreter."""
    import os

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    # Finalising the modules torch, mlflow and pandas loaded takes most of a second; every
    # write that matters is committed or flushed by now, so skip it.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()  # not entry(): profilers and coverage write their files at interpreter exit
