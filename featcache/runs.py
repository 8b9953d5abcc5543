"""Run directories, and the one JSON encoder of featcache: the one place that writes and reads them.

Every evaluator (train, sweep, probe, knn) writes its results through ``write_run``; `featcache
report` and `featcache predict` read them with ``load_run`` and ``prediction.load_head``. The
layout (docs/architecture.md, "Run directories"):

    RUN/config.json     what ran: {"kind", "model", "fingerprint", "features_file", "features", ...}
    RUN/metrics.json    what came out: {"kind", "val": {...}, "test": {...}, extras}; a split's
                        confidence intervals live in metrics[split]["ci"][name] = [low, high], with
                        metrics[split]["bootstrap"] saying how many resamples were valid
    RUN/history.json    per-epoch training history (heads only; a sweep's: its best configuration's)
    RUN/sweep_history.json
                        a sweep's every configuration: its settings, rank and per-epoch history
    RUN/head.safetensors + RUN/head.json
                        a deployable model (heads and probes): tensors in safetensors, everything
                        else as JSON, so loading a shared run never executes code
    RUN/figures/*.png|svg
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

RUN_KINDS = ("train", "sweep", "probe", "knn", "compare")


# ----------------------------------------------------------------------------------------------
# JSON: one encoder for every file featcache writes
# ----------------------------------------------------------------------------------------------

def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become Python numbers and lists, paths strings,
    and NaN/inf become null (JSON has no NaN; a reader must see "undefined", not a number)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def dumps(obj: Any) -> str:
    """The JSON text featcache writes: indented, NaN as null, numpy converted."""
    return json.dumps(to_jsonable(obj), indent=2) + "\n"


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: the text a fingerprint hashes (stable across runs)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def attribute_json(obj: Any) -> str:
    """JSON with sorted keys for an HDF5 attribute (a feature file's config) or a table cell."""
    return json.dumps(obj, sort_keys=True, default=str)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write obj as JSON (atomically: a crash never leaves half a file); '-' writes to stdout."""
    text = dumps(obj)
    if str(path) == "-":
        import sys

        sys.stdout.write(text)
        return Path("-")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may share a path
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run directory, or a ValueError that names the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run the command that wrote it.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def write_run(out: str | os.PathLike, config: dict[str, Any], metrics: dict[str, Any], *,
              history: list[dict[str, Any]] | None = None,
              head: tuple[dict[str, Any], dict[str, Any]] | None = None,
              figures: Callable[[Path], None] | None = None) -> Path:
    """Write one run directory: config.json, metrics.json, optional history.json, the deployable
    head (``(tensors, metadata)`` for prediction.save_head) and figures (a callback that draws into
    RUN/figures). metrics.json is written last, so a directory with it is a finished run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = config.get("kind")
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}; got {kind!r}.")
    write_json(out / "config.json", config)
    if history is not None:
        write_json(out / "history.json", history)
    if head is not None:
        from featcache.prediction import save_head  # torch + safetensors: only when a head is saved

        save_head(out, *head)
    if figures is not None:
        figures(out / "figures")
    write_json(out / "metrics.json", {"kind": kind, **metrics})
    return out


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run directory as read for a report."""

    path: Path                                          # the run directory
    name: str                                           # unique display name (directory name)
    config: dict[str, Any]                              # config.json ({} when absent)
    metrics: dict[str, Any]                             # metrics.json
    figures: list[Path] = field(default_factory=list)   # figures/*.png and *.svg (no symlinks)

    @property
    def kind(self) -> str:
        return str(self.metrics.get("kind") or self.config.get("kind") or "n/a")

    @property
    def model(self) -> str:
        return str(self.config.get("model") or "n/a")

    @property
    def features(self) -> str:
        value = self.config.get("features")
        return str(value) if value else "n/a"

    @property
    def positive_class(self) -> str | None:
        value = self.metrics.get("positive_class")
        return str(value) if value else None


def load_run(path: str | os.PathLike) -> Run:
    """Read config.json, metrics.json and the figure list of one run directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected a run directory written by "
                                f"`featcache train|sweep|knn|probe|compare --out RUN_DIR`.")
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{path} has no metrics.json, so it is not a finished run directory; "
                                f"pass directories written by `featcache train|sweep|knn|probe|compare --out "
                                f"RUN_DIR` (a run that crashed leaves none: re-run it).")
    metrics = read_json(metrics_path)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    fig_dir = path / "figures"
    # a figure that is a symlink could point anywhere on the machine: a report copies only real files
    figures = sorted(p for p in fig_dir.glob("*") if p.suffix.lower() in (".png", ".svg")
                     and p.is_file() and not p.is_symlink()) if fig_dir.is_dir() else []
    return Run(path=path, name=path.resolve().name, config=config, metrics=metrics, figures=figures)
