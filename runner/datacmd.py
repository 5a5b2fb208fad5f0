"""``sweep data``: fetch datasets on a machine with internet so that compute nodes only read."""
from __future__ import annotations

import sys
from urllib.error import URLError

import click


@click.group()
def data():
    """Manage the datasets under a data root."""


@data.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--root", default="data", show_default=True, type=click.Path(file_okay=False),
              help="Data root to download into; use the same path as dataset.root in the sweep.")
def download(names, root):
    """Download datasets NAMES (both splits) into --root; run it on a login node with internet."""
    from jobs.data import DATASETS, download as fetch

    unknown = [n for n in names if n not in DATASETS]
    if unknown:  # before fetching anything: a typo should not surface after a long download
        click.echo(f"error: unknown dataset(s) {', '.join(unknown)}; known: {', '.join(sorted(DATASETS))}", err=True)
        sys.exit(2)
    failed = False
    for name in names:
        try:
            click.echo(fetch(name, root))
        except ValueError as exc:  # a dataset without a download (imagefolder)
            click.echo(f"error: {exc}", err=True)
            failed = True
        except (URLError, OSError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())  # torchvision's messages span lines; keep one
            click.echo(f"error: could not download {name} into {root} (no internet here? run this on the "
                       f"login node): {type(exc).__name__}: {detail}", err=True)
            failed = True
    if failed:
        sys.exit(1)
