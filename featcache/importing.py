"""Bring features computed elsewhere (.npy, .npz, .pt, or an .h5/.hdf5 holding a `features`
dataset such as thingsvision writes) into the featcache format."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from featcache.names import IMPORTED_MODEL, UNLABELLED_NAMES
from featcache.sources import warn_unlabelled_markers
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


def load_array_file(path: str | Path, labels_only: bool = False) -> dict[str, Any]:
    """Read .npy (one array = features), .npz or .pt (a dict or one tensor), or .h5/.hdf5 (top-level
    datasets such as thingsvision's `features`) into role -> array. With `labels_only`, a file that
    holds only a labels array (a `--labels` file) is accepted."""
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

        import pickle

        with path.open("rb") as fh:
            head = fh.read(64)
        if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip (or, before 1.6, a pickle)
            lfs = head.startswith(b"version https://git-lfs")
            raise ValueError(f"cannot read {path} as a torch file: it was not made by torch.save"
                             + (" (a git-lfs pointer: run `git lfs pull`)." if lfs else " (truncated, or another format)."))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # weights-only unpickling refuses numpy arrays and any other object
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path} holds objects other than tensors (read with torch.load(weights_only=True), "
                             f"which never runs code from the file: {reason}); save torch tensors "
                             f"(torch.save({{'features': torch.as_tensor(x)}})) or use .npz.") from None
        except Exception as exc:  # truncated, a text or git-lfs pointer file, not made by torch.save
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot read {path} as a torch file (truncated, or not made by torch.save?): "
                             f"{reason}.") from None
        if isinstance(obj, (tuple, list)):
            raise ValueError(f"{path} holds a {type(obj).__name__} of {len(obj)} items; save a dict naming each array, "
                             f"e.g. torch.save({{'features': x, 'labels': y}}, ...), or one features tensor.")
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
    if "cls" not in found and set(found) == {"labels"} and labels_only:
        return found
    if labels_only and "labels" not in found and "cls" not in found:
        raise ValueError(f"{path} has no labels: expected an array named one of {', '.join(_ROLES['labels'])}; "
                         f"found {', '.join(map(str, raw)) or 'nothing'}.")
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
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype.itemsize < 4:
            value = value.float()  # bfloat16 has no numpy dtype; float32 holds it (and float16) exactly
        return value.numpy()
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, str) for v in value):
        return np.array(list(value), dtype=object)  # names with None / NaN holes stay as they are
    value = np.asarray(value)
    if value.dtype.kind == "S":  # byte strings (np.savez of encoded names): text, as the .h5 reader gives
        return np.array([v.decode("utf-8", "surrogateescape") for v in value.ravel()]).reshape(value.shape)
    return value


def load_labels_file(path: str | Path, class_names: list[str] | None = None) -> np.ndarray:
    """Labels from .npy / .pt, or a text file with one label per line: class names, or class
    indices when every line is an integer, a whole-number float (NaN unlabelled) or a bool, unless
    every label is one of `class_names` (--classes "1.0,0.0" names those texts). A file with a
    fraction (grades 2.5, ICD codes 401.9) holds names."""
    path = Path(path)
    if path.suffix.lower() in (".npy", ".npz", ".pt", ".pth", ".h5", ".hdf5"):
        found = load_array_file(path, labels_only=True)
        return np.asarray(found["labels"] if "labels" in found else found["cls"])
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if class_names and set(lines) - set(UNLABELLED_NAMES) <= set(class_names):
        return np.array(lines)   # every label is a --classes name: names, whatever they look like
    if lines and all(line.lstrip("-").isdigit() for line in lines):
        # class indices, as in a .npy of ints: they index --classes, and without it name classes
        # "0".."max" in numeric order (not "0", "1", "10", "2")
        return np.array([int(line) for line in lines], dtype=np.int64)
    if lines and all(line.lower() in ("true", "false") for line in lines):
        return np.array([line.lower() == "true" for line in lines])   # bools: indices 0 / 1
    numbers = _floats(lines)
    finite = numbers[np.isfinite(numbers)] if numbers is not None else None
    if finite is not None and finite.size and np.all(np.mod(finite, 1) == 0) and not np.isinf(numbers).any():
        # whole-number floats (np.savetxt writes 0.000000000000000000e+00), NaN unlabelled: indices,
        # as in a .npy of floats
        return numbers
    return np.array(lines)


def _floats(lines: list[str]) -> np.ndarray | None:
    """The lines as float64 when every one is a number (NaN included), else None."""
    try:
        return np.array([float(line) for line in lines], dtype=np.float64)
    except ValueError:
        return None


def import_features(out: str | Path, splits: Mapping[str, str | Path], *, labels: Mapping[str, str | Path] | None = None,
                    paths: Mapping[str, str | Path] | None = None, classes: str | None = None,
                    model: str = IMPORTED_MODEL, dtype: str = "float32", overwrite: bool = False) -> FeatureStore:
    """Write a featcache file from per-split array files; labels may be ints or class names."""
    labels, paths = dict(labels or {}), dict(paths or {})
    unknown = (set(labels) | set(paths)) - set(splits)
    if unknown:
        raise ValueError(f"--labels/--paths name split(s) {', '.join(sorted(unknown))} that no --split gives.")
    if not str(model).strip():
        raise ValueError("--model is empty; give the name of the model the features came from (it is recorded "
                         "and fingerprinted), or leave the default 'imported'.")
    inputs = [*splits.values(), *labels.values(), *paths.values(), *([classes] if classes else [])]
    clash = next((p for p in inputs if _is_file(p) and Path(p).resolve() == Path(out).resolve()), None)
    if clash is not None:   # --overwrite would replace the very input being read
        raise ValueError(f"--out {out} is one of the inputs ({clash}): writing there would destroy it; give "
                         f"another file name.")
    data = {name: load_array_file(file) for name, file in splits.items()}
    given_names = _class_names(classes, []) if classes else None
    for name, file in labels.items():
        data[name]["labels"] = load_labels_file(file, given_names)
    for name, file in paths.items():
        data[name]["paths"] = [p.strip() for p in Path(file).read_text(encoding="utf-8-sig").splitlines() if p.strip()]
    one_finding = given_names is not None and len(given_names) == 1  # (N, 1) 0/1 is then that finding
    for name, d in data.items():
        if d.get("labels") is not None:
            d["labels"] = normalise_labels(d["labels"], name, one_finding)
        if d.get("paths") is not None:
            seen: set[str] = set()
            twice = next((p for p in map(str, d["paths"]) if p in seen or seen.add(p)), None)
            if twice is not None:
                raise ValueError(f"split {name!r}: path {twice!r} is given twice; each row needs its own path.")
    class_names = given_names if given_names is not None else _class_names(None, [d.get("labels") for d in data.values()])
    arrays: dict[str, dict[str, Any]] = {}
    for name, d in data.items():
        for role in ("cls", "pooled", "tokens"):
            if d.get(role) is not None:
                _check_float32_range(np.asarray(d[role]), role, name)
        n = len(d["cls"])
        y = d.get("labels")
        arrays[name] = {"cls": np.asarray(d["cls"], dtype=np.float32), "pooled": d.get("pooled"),
                        "tokens": d.get("tokens"), "paths": d.get("paths"), "groups": d.get("groups"),
                        "labels": np.full(n, -1, dtype=np.int64) if y is None else _encode(y, class_names, name)}
    return write_arrays(out, arrays, class_names, {"model": model, "tokens": "imported", "dtype": dtype,
                                                  "source": {k: str(v) for k, v in splits.items()}},
                        overwrite=overwrite, dtype=dtype)


def _check_float32_range(x: np.ndarray, role: str, split: str) -> None:
    """Refuse finite values beyond float32's range, naming them (the float32 cast made 1e39 inf,
    reported as a NaN the input never had); NaN / inf themselves are write_arrays' check_finite's."""
    if x.dtype.kind != "f":
        return
    top = float(np.finfo(np.float32).max)
    finite = np.abs(x[np.isfinite(x)])
    largest = float(finite.max()) if finite.size else 0.0
    if largest > top:
        raise ValueError(f"split {split!r}: {role} reaches {largest:.4g}, beyond float32's largest value {top:.3g} "
                         f"(features are stored as float32 or float16); scale them before importing.")


def normalise_labels(y: Any, split: str, one_finding: bool = False) -> np.ndarray:
    """One label array per split in one of three forms: (N,) int64 class indices (-1 unlabelled),
    (N,) str class names ("" unlabelled), or (N, C) 0/1 multi-label. A column vector (N, 1) is one
    label per row; whole-number floats (what torch.save(y.float()) or np.loadtxt give) and bools are
    indices, NaN is unlabelled; fractions are refused, never rounded or sorted as text. With
    `one_finding` (--classes names one class), an (N, 1) 0/1 column is that one finding."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1 and not one_finding:
        y = y[:, 0]
    if y.ndim == 2:
        return y  # multi-label: write_arrays checks the cells are 0/1 (a cast here would turn 0.7 into 0)
    if y.ndim != 1:
        raise ValueError(f"split {split!r}: labels must be (N,) or (N, C); got shape {y.shape}.")
    if y.dtype.kind == "O":  # a list with None or NaN (unlabelled) in it, from a .pt or pandas
        missing = [v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)) for v in y.tolist()]
        y = np.array([None if m else v for v, m in zip(y.tolist(), missing)], dtype=object)
        present = [v for v in y.tolist() if v is not None]
        if present and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                           for v in present):
            y = np.array([np.nan if v is None else float(v) for v in y.tolist()])
        else:
            y = np.array(["" if v is None else str(v) for v in y.tolist()])
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        if np.isinf(y).any():   # only NaN means unlabelled
            raise ValueError(f"split {split!r}: labels hold {float(y[np.isinf(y)][0])!r}, which is not a class index; "
                             f"labels must be class indices (NaN or -1 for unlabelled), class names, or (N, C) 0/1.")
        if not np.all(np.mod(y[finite], 1) == 0):
            raise ValueError(f"split {split!r}: labels hold {float(y[finite][np.mod(y[finite], 1) != 0][0])!r}, which is "
                             f"not a class index; labels must be class indices, class names, or (N, C) 0/1.")
        return np.where(finite, y, -1).astype(np.int64)
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    names = np.array([str(v).strip() for v in y.tolist()], dtype=object)
    warn_unlabelled_markers(names.tolist(), f"split {split!r}")
    return np.where(np.isin(names, UNLABELLED_NAMES), "", names).astype(str)


def _is_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # e.g. a list of class names longer than a file name can be
        return False


def _class_names(classes: str | None, label_arrays: list[Any]) -> list[str]:
    if classes:
        p = Path(classes)
        is_file = _is_file(p)
        if not is_file and "," not in classes and (p.suffix or "/" in classes or "\\" in classes):
            raise FileNotFoundError(f"--classes {classes}: no such file (give a file with one class name per line, "
                                    f"or the names separated by commas).")
        text = p.read_text(encoding="utf-8-sig") if is_file else classes  # a BOM is no part of a name
        names = [n.strip() for n in (text.splitlines() if is_file else text.split(",")) if n.strip()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"--classes names {', '.join(twice)} more than once; each class needs its own name.")
        return names
    values = [np.asarray(y) for y in label_arrays if y is not None]
    if not values:
        return []
    if any(v.ndim == 2 for v in values):
        return [str(i) for i in range(values[0].shape[1])]
    # a split with no label at all (all -1, or all empty names) names no classes, of either kind
    values = [v for v in values if ((v >= 0).any() if v.dtype.kind in "iu" else (v != "").any())]
    if not values:
        return []
    kinds = {"indices" if v.dtype.kind in "iu" else "names" for v in values}
    if len(kinds) > 1:
        raise ValueError("some splits' labels are class indices and others class names: give every split the same "
                         "kind (or --classes, to say which name each index is).")
    if kinds == {"indices"}:
        top = max((int(v.max()) for v in values if v.size), default=-1)
        return [str(i) for i in range(top + 1)]
    return sorted({str(x) for v in values for x in v if str(x) != ""})


def _encode(y: Any, classes: list[str], split: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:  # multi-label: write_arrays checks the cells are 0/1 (a cast here would turn 0.7 into 0)
        return y
    if np.issubdtype(y.dtype, np.integer):
        if y.size and y.min() < -1:
            raise ValueError(f"split {split!r}: label {y.min()} is not a class index; labels must be 0..C-1, or -1 "
                             f"for an unlabelled row.")
        if y.size and y.max() >= len(classes):
            raise ValueError(f"split {split!r}: labels range {y.min()}..{y.max()} but there are "
                             f"{len(classes)} classes; pass --classes with every class name.")
        return y.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in y} - set(index) - {""})
    if unknown:
        raise ValueError(f"split {split!r}: labels {', '.join(unknown[:5])} are not in --classes "
                         f"({', '.join(classes[:10])}); add them or fix the labels.")
    return np.array([index.get(str(v), -1) for v in y], dtype=np.int64)
