"""`featcache report`: run directories -> one Markdown + HTML report."""
from __future__ import annotations

import click

from featcache.report import write_report
from featcache_cli.app import cli, library_errors, quiet_option


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write report.md, report.html and the copied figures to.")
@click.option("--title", default="featcache report", show_default=True, help="Report title.")
@click.option("--positive-class", default=None, metavar="NAME", help="Binary tasks: require every run to have used this positive class (refuse the report otherwise).")
@quiet_option
@library_errors
def report(run_dirs: tuple[str, ...], out_dir: str, title: str, positive_class: str | None, quiet: bool) -> None:
    """One report (Markdown + HTML) comparing run directories side by side: a table of key metrics
    with confidence intervals (and, for binary tasks, the positive class and threshold each run
    used), then each run's configuration, metrics and figures.

    Example: featcache report runs/probe-cls runs/linear-cls runs/knn-cls --out reports/cls
    """
    paths = write_report(run_dirs, out_dir, title=title, positive_class=positive_class)
    if not quiet:
        click.echo(f"wrote {paths['md']} and {paths['html']} ({len(run_dirs)} run(s))")
