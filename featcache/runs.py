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

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from featcache.names import HDF5_SIGNATURE

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
    if path.is_file() and _is_hdf5(path):
        raise ValueError(f"{path} is an HDF5 file (a feature file?); writing JSON there would destroy it.")
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

RUN_FILES = ("config.json", "metrics.json")  # what makes a directory a run directory
# every file a run directory of featcache holds (replaced by a new run; anything else there is kept)
OWN_FILES = ("metrics.json", "config.json", "history.json", "sweep_history.json", "head.json", "head.safetensors")
WRITING_LOCK = ".featcache-writing"  # a run being written: holds the writer's pid


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """An output file (--json, a predictions CSV) that may be written: never a feature file or a
    run directory's own file, which the write would destroy (a CSV over feats.h5 exited 0)."""
    path = Path(path)
    if str(path) == "":
        raise ValueError(f"the {what} path is empty; give a file name.")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name for the {what}.")
    if path.name in OWN_FILES and any((path.parent / name).is_file() for name in RUN_FILES):
        raise ValueError(f"{path} is a file of the run directory {path.parent}; write the {what} elsewhere.")
    if path.is_file() and _is_hdf5(path):
        raise ValueError(f"{path} is an HDF5 file (a feature file?); writing the {what} there would destroy it. "
                         f"Give another file name.")
    return path


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(8) == HDF5_SIGNATURE


def check_run_target(out: str | os.PathLike) -> Path:
    """Where a run directory may be written: not an empty path, not a file."""
    out = Path(out)
    if str(out) == "":
        raise ValueError("--out is empty; give a directory for the run.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory; give a directory (new, or an earlier run "
                         f"to replace).")
    if out.is_dir() and not _is_run_dir(out):
        theirs = [name for name in OWN_FILES if (out / name).exists()] + (
            ["figures/"] if (out / "figures").exists() else [])
        if theirs:   # a run would delete them: they are somebody's own files, not a run's
            raise ValueError(f"--out {out} holds {', '.join(theirs)} but is not a featcache run directory, and a run "
                             f"replaces those; give a new or empty directory (or an earlier run's).")
    return out


def _is_run_dir(out: Path) -> bool:
    """A directory an earlier featcache run wrote (finished, or killed while writing): its
    metrics.json or config.json names a run kind, or its writing lock is there."""
    if (out / WRITING_LOCK).exists():
        return True
    for name in ("metrics.json", "config.json"):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") in RUN_KINDS:
            return True
    return False


def write_run(out: str | os.PathLike, config: dict[str, Any], metrics: dict[str, Any], *,
              history: list[dict[str, Any]] | None = None,
              head: tuple[dict[str, Any], dict[str, Any]] | None = None,
              figures: Callable[[Path], None] | None = None,
              extra_json: dict[str, Any] | None = None) -> Path:
    """Write one run directory: config.json, metrics.json, optional history.json, the deployable
    head (``(tensors, metadata)`` for prediction.save_head), figures (a callback that draws into
    RUN/figures) and other JSON files (`extra_json`: name -> object, e.g. sweep_history.json).

    An earlier run's own files there (OWN_FILES, figures/) are removed first, metrics.json first
    (then the new config.json is written, so a run stopped while clearing is still a run's), and the
    new ones written with metrics.json last: RUN never mixes two runs, and a kill leaves a
    directory without metrics.json, which report and predict refuse as unfinished. Other files in
    RUN (a --json summary, notes, the feature file) are kept. One writer at a time (WRITING_LOCK)."""
    import shutil

    out = check_run_target(out)
    kind = config.get("kind")
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}; got {kind!r}.")
    out.mkdir(parents=True, exist_ok=True)
    with _writing(out):
        (out / "metrics.json").unlink(missing_ok=True)   # from here on RUN reads as unfinished ...
        write_json(out / "config.json", config)           # ... and as a run's (its kind), whatever stops it
        for name in OWN_FILES:
            if name not in ("metrics.json", "config.json"):
                (out / name).unlink(missing_ok=True)
        fig_dir = out / "figures"
        if fig_dir.is_symlink():
            fig_dir.unlink()
        elif fig_dir.is_dir():
            shutil.rmtree(fig_dir)
        if history is not None:
            write_json(out / "history.json", history)
        for name, obj in (extra_json or {}).items():
            write_json(out / name, obj)
        if head is not None:
            from featcache.prediction import save_head  # torch + safetensors: only when a head is saved

            save_head(out, *head)
        if figures is not None:
            figures(fig_dir)
        write_json(out / "metrics.json", {"kind": kind, **metrics})
    return out


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """RUN/.featcache-writing while a run is written: a second writer is refused in one line (two
    interleaved writers mixed two runs' files); a lock whose process is gone (killed) is taken over."""
    lock = out / WRITING_LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise ValueError(f"another process (pid {pid}) is writing the run directory {out} right now; wait "
                                 f"for it, or use another --out.") from None
            lock.unlink(missing_ok=True)  # left by a killed writer
    else:
        raise ValueError(f"could not take the writing lock {lock}; remove it if no featcache process is running.")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                     and p.is_file() and not p.is_symlink()) if fig_dir.is_dir() and not fig_dir.is_symlink() else []
    return Run(path=path, name=path.resolve().name, config=config, metrics=metrics, figures=figures)
