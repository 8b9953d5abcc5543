"""The click group every command module registers on, and the output helpers they share."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import click

import featcache


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(featcache.__version__, prog_name="featcache")
def cli() -> None:
    """featcache: extract frozen backbone features once, then train heads, run k-NN and
    logistic probes on the cached features in seconds.

    Example: featcache extract --model facebook/dino-vits16 --data images/ --out feats.h5
    """


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                title: str | None = None) -> None:
    """Print rows as an aligned plain-text table (floats to 4 places, None as n/a)."""
    if not rows:
        click.echo("(no rows)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        click.echo(title)
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path | None, obj: Any) -> None:
    """Write obj as JSON to path (numpy values converted, NaN as null); no-op when path is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    click.echo(f"wrote {path}")


def parse_csv(value: str, cast: type = str) -> list:
    """Split a comma-separated option value ("1e-3,1e-2") into typed items, with a clear error."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated {cast.__name__} values, got {value!r}") from exc
