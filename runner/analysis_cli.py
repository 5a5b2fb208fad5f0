"""``sweep summary`` and ``sweep report``: one or several sweeps' runs grouped over seeds, figures, tables.

Arguments are sweep files (their name and store; their planned trials tell which seeds are
missing) or experiment names in the store of ``--tracking-uri``, as for ``sweep export``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import click

from runner.errors import SpecError, spec_errors

OPTIONS = {"axis": "--by", "metric": "--metric", "level": "--level", "stage": "--stage"}


def usage_errors(fn):
    """A bad sweep file or an unknown axis / metric / level / stage: one line on stderr, exit code 2."""

    @spec_errors
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from analysis.summary import UnknownName

        try:
            return fn(*args, **kwargs)
        except UnknownName as exc:  # reported like a bad setting, naming the option
            raise SpecError(OPTIONS.get(exc.kind, exc.kind), None, None, str(exc)) from None

    return wrapper


@dataclass
class Loaded:
    """The runs of the named sweeps, their stores, sweep file texts and planned trials."""

    frame: object
    uris: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    planned: object = None
    axes: list[str] = field(default_factory=list)


def load(sweeps, tracking_uri) -> Loaded:
    """Read every sweep's runs (files or experiment names) into one frame."""
    import pandas as pd

    from analysis.export import runs_frame
    from runner.grid import expand
    from runner.spec import load_spec
    from runner.store import resolve_uri, store_exists

    loaded, frames, planned = Loaded(frame=None), [], []
    for item in sweeps:
        spec = load_spec(item) if Path(item).is_file() else None
        name = spec.name if spec else item
        uri = resolve_uri(tracking_uri, spec.tracking if spec else None)
        if loaded.uris.get(name) == uri:
            continue  # named twice (a file and its experiment name): its runs once
        if name in loaded.uris:
            raise click.ClickException(f"sweep '{name}' given from two stores ({loaded.uris[name]}, {uri}); "
                                       "its rows could not be told apart")
        if spec is not None:
            loaded.files[item] = Path(item).read_text()
            trials = expand(spec)[1]
            planned += [{"sweep": name, "trial_id": t.id, "run_name": t.name, **t.flat} for t in trials]
            loaded.axes += [k for t in trials[:1] for k in t.axes]
        if not store_exists(uri):
            raise click.ClickException(f"no tracking store at {uri} (has '{name}' been run?)")
        try:
            frames.append(runs_frame(uri, name))
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
        loaded.uris[name] = uri
    loaded.frame = pd.concat(frames, ignore_index=True)
    if loaded.frame.empty:
        raise click.ClickException(f"no runs yet in {', '.join(loaded.uris)}")
    loaded.planned = pd.DataFrame(planned) if planned else None
    return loaded


def _names(values) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _level(text: str):
    from analysis.summary import LEVELS, UnknownName

    if text in LEVELS:
        return text
    try:
        return int(text)
    except ValueError:
        raise UnknownName("level", text, [*LEVELS, "N (an integer)"]) from None


def _print_table(table, title: str) -> None:
    from analysis.tables import display

    # Plain aligned text, not a rich table: a wide table stays readable in a narrow terminal and in logs.
    shown = display(table.drop(columns=["failed_trials"], errors="ignore"))
    click.echo(title)
    click.echo(shown.to_string(index=False))


def _write(table, path: str) -> Path:
    from analysis.tables import to_markdown

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    elif path.suffix == ".md":
        path.write_text(to_markdown(table))
    else:
        table.to_csv(path, index=False)
    return path


uri_option = click.option("--tracking-uri", default=None,
                          help="MLflow store (default: MLFLOW_TRACKING_URI, the file's tracking, ./mlflow.db).")


@click.command()
@click.argument("sweeps", nargs=-1, required=True)
@click.option("--by", multiple=True, metavar="AXES",
              help="Group by these settings (comma-separated or repeatable; default: every setting that varies "
                   "across trials except seed).")
@click.option("--metric", "metrics", multiple=True, metavar="M", help="Metric(s) to summarise (default: accuracy).")
@click.option("--level", default="final", show_default=True, help="final, all (one group per level) or a level N.")
@click.option("--stage", default="final", show_default=True,
              help="final (the quantized model if any, else float), float, all, or a quant mode.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the table: .csv, .md or .parquet.")
@uri_option
@usage_errors
def summary(sweeps, by, metrics, level, stage, output, tracking_uri):
    """Group trials over seeds: mean, std, count, 95% CI; flag groups with failed or missing seeds."""
    from analysis.summary import summarize

    if output and Path(output).suffix not in (".csv", ".md", ".parquet"):
        raise click.BadParameter(f"'{output}': use a .csv, .md or .parquet file", param_hint="-o")
    data = load(sweeps, tracking_uri)
    table = summarize(data.frame, by=_names(by) or None, metrics=_names(metrics) or ["accuracy"],
                      level=_level(level), stage=stage, planned=data.planned, prefer=data.axes)
    flagged = int((table["flag"] != "").sum())
    _print_table(table, f"{', '.join(data.uris)}: {len(table)} groups, {flagged} flagged "
                        f"(level {level}, stage {stage})")
    if output:
        click.echo(f"wrote {len(table)} groups to {_write(table, output)}")


@click.command()
@click.argument("sweeps", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--trial", "trial_ids", multiple=True, metavar="ID",
              help="Trials whose training curves to plot (default: the finished one with the most levels).")
@uri_option
@usage_errors
def report(sweeps, output, trial_ids, tracking_uri):
    """Write figures (PNG), tables (CSV, Markdown) and an index.html showing them, with the sweep files."""
    from analysis.report import choose_trials, curves_for, write_report

    data = load(sweeps, tracking_uri)
    known = set(data.frame["trial_id"])
    unknown = [t for t in trial_ids if t not in known]
    if unknown:
        raise click.ClickException(f"not trials of {', '.join(data.uris)}: {', '.join(unknown)}")
    curves = curves_for(data.frame, data.uris, list(trial_ids) or choose_trials(data.frame))
    index = write_report(data.frame, output, sweep_files=data.files, curves=curves,
                         stores=sorted(set(data.uris.values())), planned=data.planned, prefer=data.axes)
    page = index.read_text()
    figures, tables = page.count("<img "), page.count('.md">Markdown')
    click.echo(f"wrote {figures} figures and {tables} tables; open {index}")
