"""Bring features computed elsewhere (.npy, .npz, .pt, or an .h5/.hdf5 holding a `features`
dataset such as thingsvision writes) into the featcache format."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from featcache.store import READ_LOCKING, FeatureStore, write_arrays

# names accepted for each role inside an .npz / .pt dict, first match wins
_ROLES = {
    "cls": ("cls", "features", "feats", "x", "X", "embeddings"),
    "pooled": ("pooled",),
    "tokens": ("tokens", "last_hidden_state"),
    "labels": ("labels", "label", "y", "targets"),
    "paths": ("paths", "path", "image_paths", "filenames"),
    "groups": ("groups", "group"),
}


def load_array_file(path: str | Path) -> dict[str, Any]:
    """Read .npy (one array = features), .npz or .pt (a dict or one tensor), or .h5/.hdf5 (top-level
    datasets such as thingsvision's `features`) into role -> array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        raw: Mapping[str, Any] = {"cls": np.load(path, allow_pickle=False)}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    elif suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        raw = obj if isinstance(obj, Mapping) else {"cls": obj}
    elif suffix in (".h5", ".hdf5"):
        raw = _read_hdf5_arrays(path)
    else:
        raise ValueError(f"{path}: expected a .npy, .npz, .pt or .h5/.hdf5 file; got {suffix or 'no extension'}.")
    found: dict[str, Any] = {}
    for role, names in _ROLES.items():
        for name in names:
            if name in raw:
                found[role] = _to_numpy(raw[name])
                break
    if "cls" not in found:
        raise ValueError(f"{path} has no features: expected an array named one of "
                         f"{', '.join(_ROLES['cls'])}; found {', '.join(map(str, raw)) or 'nothing'}.")
    return found


def _read_hdf5_arrays(path: Path) -> dict[str, Any]:
    """The top-level datasets of a plain HDF5 file (thingsvision: `features`, maybe `labels`/`targets`).

    Features with more than two axes (a conv layer's maps) are flattened per row. A featcache
    file is refused: it needs no import.
    """
    try:
        f = h5py.File(path, "r", locking=READ_LOCKING)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file ({exc}).") from None
    with f:
        if f.attrs.get("encoding-type") == "featcache":
            raise ValueError(f"{path} is already a featcache feature file, not features to import (such as "
                             f"thingsvision's .h5 with a 'features' dataset); use it directly, e.g. "
                             f"`featcache info {path}`.")
        raw: dict[str, Any] = {}
        for name, item in f.items():
            if not isinstance(item, h5py.Dataset):
                continue
            value = item[()]
            if value.dtype.kind in ("O", "S"):
                value = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in value]
            raw[name] = value
    cls_names = [n for n in _ROLES["cls"] if n in raw]
    if cls_names and np.ndim(raw[cls_names[0]]) > 2:
        x = np.asarray(raw[cls_names[0]])
        raw[cls_names[0]] = x.reshape(x.shape[0], -1)
    return raw


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return list(value)
    return np.asarray(value)


def load_labels_file(path: str | Path) -> np.ndarray:
    """Labels from .npy / .pt, or a text file with one label per line (class names, or class
    indices when every line is an integer)."""
    path = Path(path)
    if path.suffix.lower() in (".npy", ".npz", ".pt", ".pth"):
        return np.asarray(load_array_file(path)["cls"])
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and all(line.lstrip("-").isdigit() for line in lines):
        # class indices, as in a .npy of ints: they index --classes, and without it name classes
        # "0".."max" in numeric order (not "0", "1", "10", "2")
        return np.array([int(line) for line in lines], dtype=np.int64)
    return np.array(lines)


def import_features(out: str | Path, splits: Mapping[str, str | Path], *, labels: Mapping[str, str | Path] | None = None,
                    paths: Mapping[str, str | Path] | None = None, classes: str | None = None,
                    model: str = "imported", dtype: str = "float32", overwrite: bool = False) -> FeatureStore:
    """Write a featcache file from per-split array files; labels may be ints or class names."""
    labels, paths = dict(labels or {}), dict(paths or {})
    unknown = (set(labels) | set(paths)) - set(splits)
    if unknown:
        raise ValueError(f"--labels/--paths name split(s) {', '.join(sorted(unknown))} that no --split gives.")
    data = {name: load_array_file(file) for name, file in splits.items()}
    for name, file in labels.items():
        data[name]["labels"] = load_labels_file(file)
    for name, file in paths.items():
        data[name]["paths"] = [p for p in Path(file).read_text().splitlines() if p.strip()]
    class_names = _class_names(classes, [d.get("labels") for d in data.values()])
    arrays: dict[str, dict[str, Any]] = {}
    for name, d in data.items():
        n = len(d["cls"])
        y = d.get("labels")
        arrays[name] = {"cls": np.asarray(d["cls"], dtype=np.float32), "pooled": d.get("pooled"),
                        "tokens": d.get("tokens"), "paths": d.get("paths"), "groups": d.get("groups"),
                        "labels": np.full(n, -1, dtype=np.int64) if y is None else _encode(y, class_names, name)}
    return write_arrays(out, arrays, class_names, {"model": model, "tokens": "imported", "dtype": dtype,
                                                  "source": {k: str(v) for k, v in splits.items()}},
                        overwrite=overwrite, dtype=dtype)


def _class_names(classes: str | None, label_arrays: list[Any]) -> list[str]:
    if classes:
        p = Path(classes)
        names = p.read_text().splitlines() if p.is_file() else classes.split(",")
        return [n.strip() for n in names if n.strip()]
    values = [np.asarray(y) for y in label_arrays if y is not None]
    if not values:
        return []
    if any(v.ndim == 2 for v in values):
        return [str(i) for i in range(values[0].shape[1])]
    if all(np.issubdtype(v.dtype, np.integer) for v in values):
        top = max(int(v.max()) for v in values if v.size)
        return [str(i) for i in range(top + 1)]
    return sorted({str(x) for v in values for x in v if str(x) != ""})


def _encode(y: Any, classes: list[str], split: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:  # multi-label: write_arrays checks the cells are 0/1 (a cast here would turn 0.7 into 0)
        return y
    if np.issubdtype(y.dtype, np.integer):
        if y.size and (y.max() >= len(classes) or y.min() < -1):
            raise ValueError(f"split {split!r}: labels range {y.min()}..{y.max()} but there are "
                             f"{len(classes)} classes; pass --classes with every class name.")
        return y.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in y} - set(index) - {""})
    if unknown:
        raise ValueError(f"split {split!r}: labels {', '.join(unknown[:5])} are not in --classes "
                         f"({', '.join(classes[:10])}); add them or fix the labels.")
    return np.array([index.get(str(v), -1) for v in y], dtype=np.int64)
