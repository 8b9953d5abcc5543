"""The click group every command module registers on, and the output helpers they share."""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click

import featcache
from featcache.metrics import split_warnings
from featcache.report import format_cell
from featcache.runs import write_json as _write_json


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(featcache.__version__, prog_name="featcache")
def cli() -> None:
    """featcache: extract frozen backbone features once, then train heads, run k-NN and
    logistic probes on the cached features in seconds.

    Example: featcache extract --model facebook/dino-vits16 --data images/ --out feats.h5
    """


# ----------------------------------------------------------------------------------------------
# option types and shared options
# ----------------------------------------------------------------------------------------------

class CommaList(click.ParamType):
    """A comma-separated list of one type ("1e-3,1e-2"); a bad item is a usage error naming the option."""

    name = "list"

    def __init__(self, cast: Any = str, choices: Sequence[str] | None = None, minimum: float | None = None):
        self.cast, self.choices, self.minimum = cast, choices, minimum

    def convert(self, value: Any, param: Any, ctx: Any) -> list:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",")]
        kind = getattr(self.cast, "__name__", "value")
        if not any(items):
            self.fail(f"expected comma-separated {kind} values; got {value!r}", param, ctx)
        if not all(items):  # '10,,200' is a typo for 10,100,200 more often than a list of two
            example = "1e-3,1e-2" if self.cast is float else "10,20" if self.cast is int else "a,b"
            self.fail(f"empty item at position {items.index('') + 1} of {value!r}: expected comma-separated "
                      f"{kind} values, e.g. {example}", param, ctx)
        try:
            out = [self.cast.convert(v, param, ctx) if isinstance(self.cast, click.ParamType) else self.cast(v)
                   for v in items]
        except ValueError:
            self.fail(f"expected comma-separated {getattr(self.cast, '__name__', 'value')} values; got {value!r}",
                      param, ctx)
        if self.choices is not None:
            bad = [v for v in out if v not in self.choices]
            if bad:
                self.fail(f"accepts {', '.join(self.choices)} (comma-separated); got {', '.join(map(repr, bad))}",
                          param, ctx)
        if self.cast is float and not all(math.isfinite(v) for v in out):
            self.fail(f"every value must be a finite number; got {value!r}", param, ctx)
        if self.minimum is not None and any(v < self.minimum for v in out):
            self.fail(f"every value must be at least {self.minimum:g}; got {value!r}", param, ctx)
        twice = next((v for i, v in enumerate(out) if v in out[:i]), None)
        if twice is not None:   # '--lr 1e-3,1e-3' trained two identical heads ranked 1 and 2
            self.fail(f"gives {twice!r} twice in {value!r}; give each value once", param, ctx)
        return out


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every bound check: --lr nan reached
    torch's 'Invalid learning rate' after loading the data, and a sweep trained its whole grid)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        out = super().convert(value, param, ctx)
        if out is not None and not math.isfinite(out):
            self.fail(f"expected a finite number; got {value!r}", param, ctx)
        return out


class CGrid(click.ParamType):
    """--Cs: a named grid (default, dinov2) or comma-separated positive numbers."""

    name = "list|default|dinov2"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from featcache.probe import NAMED_CS

        if not isinstance(value, str) or value.strip().lower() in NAMED_CS:
            return value.strip().lower() if isinstance(value, str) else value
        if "," not in value:
            try:
                float(value)
            except ValueError:
                self.fail(f"expected a named grid ({', '.join(NAMED_CS)}) or comma-separated numbers; got "
                          f"{value!r}", param, ctx)
        values = CommaList(float).convert(value, param, ctx)
        if any(v <= 0 for v in values):
            self.fail(f"every C must be > 0; got {value!r}. Use e.g. --Cs 0.01,0.1,1,10 or a named grid "
                      f"({', '.join(NAMED_CS)})", param, ctx)
        return values


class ThresholdRule(click.ParamType):
    """youden, sensitivity:TARGET or a number in (0, 1)."""

    name = "rule"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        text = str(value).strip()
        method, _, target = text.partition(":")
        try:
            if method == "youden" and not target:
                return text
            if method == "sensitivity" and 0 < float(target) <= 1:
                return text
            if not target and 0 < float(text) < 1:
                return text
        except ValueError:
            pass
        self.fail(f"expected youden, sensitivity:TARGET (e.g. sensitivity:0.95) or a number in (0, 1); got {value!r}",
                  param, ctx)


class FeatureKind(click.ParamType):
    """A feature kind: cls, pooled, cls+pooled, cls@N or cls@N+pooled (store.parse_feature_kind)."""

    name = "kind"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from featcache.store import parse_feature_kind

        try:
            parse_feature_kind(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


def given(name: str) -> bool:
    """Whether option `name` was given on the command line (not left at its default)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def unused_head_settings(head: str) -> list[str]:
    """Notes for head settings given on the command line that this head kind does not read
    (--hidden / --dropout for a linear head): the run would look tuned in them."""
    from featcache.names import HEAD_ONLY_SETTINGS

    return [f"--{key} was not used: the {head} head does not read it (only {' and '.join(kinds)} heads do)."
            for key, kinds in HEAD_ONLY_SETTINGS.items() if head not in kinds and given(key)]


def checked_output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --json or predictions path checked before any work: never a feature file or a run's own file."""
    if value is None or value == "-":
        return value
    from featcache.runs import check_output_file

    try:
        check_output_file(value, f"{param.opts[0]} output")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def checked_run_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A run directory --out checked before any work: new, empty, or an earlier run (replaced whole)."""
    if value is None:
        return value
    from featcache.runs import check_run_target

    try:
        check_run_target(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
                        callback=checked_output_file,
                        help="Write the printed numbers as JSON to this file ('-' for standard output; the "
                             "tables then go to standard error).")(fn)


# more resamples than this change no reported interval to speak of (the 2.5 % percentile's Monte Carlo
# error is ~0.7 % of a normal interval's width at 10,000 resamples, ~0.2 % at 100,000); a larger
# number is more likely a typo that would run for hours
MAX_BOOTSTRAP = 100_000


def bootstrap_count(minimum: int) -> click.IntRange:
    """--bootstrap's type: minimum .. MAX_BOOTSTRAP resamples."""
    return click.IntRange(minimum, MAX_BOOTSTRAP)


def device_option(fn: Callable) -> Callable:
    """--device of every command that runs torch (one rule: devices.resolve_device)."""
    return click.option("--device", default="auto", show_default=True,
                        help="torch device: auto (cuda when there is a GPU, else cpu), cpu, cuda or cuda:N.")(fn)


def quiet_option(fn: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes: results only.")(fn)


def positive_option(fn: Callable) -> Callable:
    return click.option("--positive-class", default=None, metavar="NAME",
                        help="Binary tasks: the class sensitivity, AUROC, AUPRC and the threshold are about "
                             "[default: the train split's minority class].")(fn)


def library_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing errors into one-line click errors (exit 1), never tracebacks."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as exc:
            if isinstance(exc, click.ClickException):
                raise
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(text.strip()) from exc
    return wrapper


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

class Console:
    """Where a command's human output goes: stdout, or stderr when --json - takes stdout; notes are
    dropped with --quiet, warnings never are."""

    def __init__(self, quiet: bool = False, json_path: str | None = None):
        self.quiet = quiet
        self.err = json_path == "-"

    def echo(self, text: str = "") -> None:
        click.echo(text, err=self.err)

    def note(self, text: str) -> None:
        if not self.quiet:
            click.echo(text, err=self.err)

    def warn(self, text: str) -> None:
        click.echo(f"warning: {text}", err=True)

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
              title: str | None = None) -> None:
        print_table(rows, columns, title, err=self.err)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                title: str | None = None, err: bool = False) -> None:
    """Print rows as an aligned plain-text table (numbers as report.format_cell writes them)."""
    if title:
        click.echo(title, err=err)
    if not rows:
        click.echo("(no rows)", err=err)
        return
    columns = list(columns or rows[0].keys())
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)), err=err)
    click.echo("  ".join("-" * w for w in widths), err=err)
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)), err=err)


def per_label_rows(block: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A multi-label split's findings, one row each: positives, threshold, sensitivity, specificity,
    AUROC, AUPRC, and their bootstrap intervals when the block has them ([] for other tasks)."""
    entries = (block or {}).get("per_label") or []
    with_ci = [m for m in ("auroc", "sensitivity", "specificity") if any(m in (e.get("ci") or {}) for e in entries)]
    rows = []
    for entry in entries:
        row = {k: entry.get(k) for k in ("label", "positives", "threshold", "sensitivity", "specificity", "auroc",
                                         "auprc")}
        ci = entry.get("ci") or {}
        for m in with_ci:
            row[f"{m} 95% CI"] = f"[{ci[m][0]:.4f}, {ci[m][1]:.4f}]" if m in ci else ""
        rows.append(row)
    return rows


def write_json(path: str | Path | None, obj: Any) -> None:
    """Write obj as JSON (runs.write_json: numpy converted, NaN as null); '-' is stdout; None: nothing."""
    if path is None:
        return
    _write_json(path, obj)
    if str(path) != "-":
        click.echo(f"wrote {path}", err=True)


@contextlib.contextmanager
def warnings_as_notes(console: Console) -> Iterator[None]:
    """Library warnings (e.g. a single-class validation split) printed as one 'warning:' line each,
    never as Python's file:line: UserWarning form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = str(w.message)
                if text not in seen:
                    seen.add(text)
                    console.warn(text)


def echo_notes(console: Console, notes: Sequence[str],
               splits: dict[str, dict[str, Any] | None] | None = None) -> None:
    """Print library warnings and notes (leakage, convergence, bootstrap drops) as warnings, then
    the notes of each evaluated split's metrics (a class absent from test, AUROC over the classes
    present), which metrics.json keeps under the split, as 'warning: test split: ...'."""
    seen = set()
    for n in list(notes) + [f"{name} split: {n}" for name, block in (splits or {}).items()
                            for n in split_warnings(block)]:
        if n not in seen:
            seen.add(n)
            console.warn(n)

