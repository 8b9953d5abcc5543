"""Hugging Face ``datasets`` as input: a directory written by ``save_to_disk``.

``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write a directory that featcache reads
like an image folder: its splits become the file's splits (a plain Dataset is one split named
``all``), a ``ClassLabel`` column names the classes, and rows keep the dataset's own order.

Workers never receive the dataset object: each row is a small reference that survives
``Path(...)`` and pickling (``hf:/abs/dir::split::index::column``), and each worker process opens
the dataset lazily (memory-mapped, cached per process) to read one row's encoded image bytes,
which are decoded by featcache's own decoder, so EXIF, 16-bit and alpha handling is exactly that
of image files.

``datasets`` is an optional extra (``pip install 'featcache[hf]'``); only reading such a
directory needs it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import quote, unquote

import numpy as np

from featcache.sources import (SINGLE_SPLIT, DataSource, DecodeOptions, ImageDecodeError, RowContent, SplitRows,
                               bytes_content, decode_image_bytes, label_name, load_image, row_content,
                               warn_unlabelled_markers)

if TYPE_CHECKING:
    from PIL import Image

REF_PREFIX = "hf:"
_SEP = "::"
LABEL_NAMES = ("label", "labels", "target", "targets")
INSTALL_HINT = "pip install 'featcache[hf]'"
log = logging.getLogger("featcache")


class NotClassLabels(ValueError):
    """A label-named column whose values are not class labels (a float holding fractions)."""


class MissingDatasetsError(ImportError, ValueError):
    """`datasets` is needed but not installed (a ValueError too, so the CLI prints it cleanly)."""


# ------------------------------------------------------------------------------------------------
# detection and loading
# ------------------------------------------------------------------------------------------------

def is_hf_dataset_dir(path: str | Path) -> bool:
    """True for a directory written by save_to_disk: dataset_dict.json (a DatasetDict), or
    dataset_info.json + state.json (a Dataset). Needs no `datasets` import."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / "dataset_dict.json").is_file() or ((p / "dataset_info.json").is_file()
                                                    and (p / "state.json").is_file())


def import_datasets() -> Any:
    """The `datasets` module, or MissingDatasetsError saying how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingDatasetsError(
            f"reading a Hugging Face datasets directory needs the `datasets` package, which is not "
            f"installed ({exc}); install it with: {INSTALL_HINT}") from None
    return datasets


def load_splits(root: Path) -> dict[str, Any]:
    """split name -> datasets.Dataset, in the directory's own order; a plain Dataset is `all`."""
    datasets = import_datasets()
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise ValueError(f"{root} looks like a datasets save_to_disk directory but could not be "
                         f"loaded: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise ValueError(f"{root} is a DatasetDict with no splits.")
        return dict(loaded.items())
    return {SINGLE_SPLIT: loaded}


# ------------------------------------------------------------------------------------------------
# choosing columns
# ------------------------------------------------------------------------------------------------

def _describe_columns(features: Any) -> str:
    return ", ".join(f"{name} ({type(f).__name__})" for name, f in features.items())


def pick_image_column(features: Any, override: str | None, where: str) -> str:
    """The column holding images: the one datasets.Image column, or `override`."""
    datasets = import_datasets()
    if override is not None:
        if override not in features:
            raise ValueError(f"--image-column {override!r} is not a column of {where}; its columns are: "
                             f"{_describe_columns(features)}.")
        if not isinstance(features[override], datasets.Image):
            raise ValueError(f"--image-column {override!r} of {where} is a {type(features[override]).__name__}, "
                             f"expected a datasets.Image column. Columns: {_describe_columns(features)}.")
        return override
    candidates = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    if not candidates:
        raise ValueError(f"{where} has no datasets.Image column; its columns are: {_describe_columns(features)}. "
                         f"Cast the column holding the images with dataset.cast_column(name, datasets.Image()) "
                         f"before save_to_disk.")
    if len(candidates) > 1:
        raise ValueError(f"{where} has several image columns ({', '.join(candidates)}); pick one with "
                         f"--image-column {candidates[0]}.")
    return candidates[0]


def pick_label_column(features: Any, override: str | None, where: str, image_column: str,
                      group_column: str | None = None) -> str | None:
    """The label column: `override`; else a ClassLabel (or list-of-ClassLabel) column named
    label/labels/target(s); else the one ClassLabel column, when no other column is named like a
    label; else a usable column named label/labels/target(s); else None (every row unlabelled).
    Two candidates of different names (a ClassLabel `domain` beside an integer `label`) are refused:
    taking either silently could score the wrong task."""
    if override is not None:
        if override not in features:
            raise ValueError(f"--label-column {override!r} is not a column of {where}; its columns are: "
                             f"{_describe_columns(features)}.")
        if _label_kind(features[override]) is None:
            raise ValueError(f"--label-column {override!r} of {where} is {features[override]!r}; expected a "
                             f"ClassLabel, an integer or a string column (or a list of ClassLabel for multi-label).")
        return override
    columns = [c for c in features if c not in (image_column, group_column)]  # patients are no classes
    class_labels = [c for c in columns if _label_kind(features[c]) in ("classlabel", "multilabel")]
    named = [c for c in LABEL_NAMES if c in columns]
    preferred = [c for c in named if c in class_labels]
    if preferred:  # a ClassLabel named like a label is unambiguous, whatever else the split holds
        return preferred[0]
    unreadable = [c for c in named if _label_kind(features[c]) is None]
    if unreadable:  # a segmentation mask, boxes, a regression target: not classes, and not refused
        named = [c for c in named if c not in unreadable]
        if class_labels and not named:  # the task is the unreadable column: never silently another one
            raise ValueError(f"{where}: column {unreadable[0]!r} ({type(features[unreadable[0]]).__name__}) is named "
                             f"like the label but holds no classes, and {class_labels[0]!r} is a ClassLabel: which "
                             f"is the task is ambiguous; name the label column with --label-column "
                             f"{class_labels[0]}, or drop the other (dataset.remove_columns).")
        log.warning("column(s) %s of %s are not class labels (%s); they are not read as labels. Name the label "
                    "column with --label-column, or cast it to a datasets.ClassLabel.", ", ".join(unreadable), where,
                    ", ".join(type(features[c]).__name__ for c in unreadable))
    if class_labels and named:
        raise ValueError(f"{where} has a ClassLabel column {class_labels[0]!r} and a label column {named[0]!r}: "
                         f"which one holds the classes to evaluate is ambiguous; pick one with --label-column.")
    if len(class_labels) > 1:
        raise ValueError(f"{where} has several ClassLabel columns ({', '.join(class_labels)}); pick one with "
                         f"--label-column {class_labels[0]}.")
    if class_labels:
        return class_labels[0]
    return named[0] if named else None


def _label_kind(feature: Any) -> str | None:
    """'classlabel' | 'multilabel' | 'multilabel-int' | 'int' | 'float' | 'str' for usable label
    features, else None. A float column must hold whole numbers (checked on its values)."""
    datasets = import_datasets()
    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", None)
    if inner is not None:  # a list of class indices per row: multi-label
        if isinstance(inner, datasets.ClassLabel):
            return "multilabel"
        if isinstance(inner, datasets.Value) and str(inner.dtype).startswith(("int", "uint")):
            return "multilabel-int"
        return None
    if isinstance(feature, datasets.Value):
        dtype = str(feature.dtype)
        if dtype.startswith(("int", "uint")) or dtype == "bool":
            return "int"
        if dtype.startswith("float"):
            return "float"
        if dtype in ("string", "large_string"):
            return "str"
    return None


# ------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------

def from_hf_dir(root: Path, image_column: str | None = None, label_column: str | None = None,
                group_column: str | None = None) -> "DataSource":
    """Read a save_to_disk directory into a DataSource (rows in dataset order). `group_column`
    None reads a column named "group" when a split has one."""
    from featcache.sources import DEFAULT_GROUP_COLUMN

    root = Path(root).resolve()
    forget_open(root)  # the directory may have been rewritten since this process last read it
    dsets = load_splits(root)
    first_name, first = next(iter(dsets.items()))
    image_col = pick_image_column(first.features, image_column, f"{root} (split {first_name!r})")
    for name, ds in dsets.items():
        if image_col not in ds.features:
            raise ValueError(f"split {name!r} of {root} has no column {image_col!r} (split {first_name!r} has "
                             f"it); its columns are: {_describe_columns(ds.features)}.")
    if group_column is not None and not any(group_column in ds.features for ds in dsets.values()):
        raise ValueError(f"--group-column {group_column!r} is not a column of {root}; its columns are: "
                         f"{_describe_columns(first.features)}.")
    group_column = group_column or DEFAULT_GROUP_COLUMN
    label_col = _label_column(dsets, root, label_column, image_col, group_column)
    # a split without the label column (an unlabelled test split) is unlabelled, -1
    kinds = {name: _label_kind(ds.features[label_col]) for name, ds in dsets.items()
             if label_col and label_col in ds.features}
    if any(k is None for k in kinds.values()):  # readable in one split, a mask or boxes in another
        detail = ", ".join(f"{name}: {dsets[name].features[label_col]!r}" for name in kinds)
        raise ValueError(f"column {label_col!r} of {root} is a class label in some splits and not in others "
                         f"({detail}); save every split with the same column type, or name another with "
                         f"--label-column.")
    try:
        names = {name: _row_names(kinds[name], dsets[name].features[label_col], dsets[name][label_col], name,
                                  label_col) for name in kinds}
    except NotClassLabels as exc:
        if label_column is not None:
            raise
        # a float column named like a label that holds fractions (age, a score): not classes
        log.warning("%s; its rows are extracted unlabelled (name a label column with --label-column).", exc)
        label_col, kinds, names = None, {}, {}
    classes = _classes(kinds, {name: dsets[name].features[label_col] for name in kinds}, names, label_col)
    multilabel = any(k.startswith("multilabel") for k in kinds.values())
    unlabelled = [name for name in dsets if name not in kinds and len(dsets[name])]
    if multilabel and unlabelled:
        raise ValueError(f"split(s) {', '.join(unlabelled)} of {root} have no {label_col!r} column, but the others are "
                         f"multi-label: a featcache file holds 0/1 per label for every row, so these rows would read as "
                         f"'no finding'. Give them labels, or save the dataset without them (extract them into a file "
                         f"of their own).")
    if multilabel and not all(k.startswith("multilabel") for k in kinds.values()):
        detail = ", ".join(f"{name}: {dsets[name].features[label_col]!r}" for name in kinds)
        raise ValueError(f"column {label_col!r} is a list of labels (multi-label) in some splits of {root} and "
                         f"one label per row in others ({detail}); save every split with the same column type.")
    splits: dict[str, SplitRows] = {}
    for name, ds in dsets.items():
        n = len(ds)
        splits[name] = SplitRows(
            paths=row_ids(ds, name, image_col),
            files=[make_ref(root, name, i, image_col) for i in range(n)],
            labels=_encode_labels(names.get(name), classes, n, multilabel),
            groups=_groups(ds, group_column) if group_column in ds.features else None)
        if splits[name].groups is not None and "" in splits[name].groups:
            log.warning("%s: %d row(s) of split %s have no %r: each is taken as a patient of its own.",
                        root.name, splits[name].groups.count(""), name, group_column)
    if not any(len(rows.paths) for rows in splits.values()):
        raise ValueError(f"{root} holds no rows.")
    return DataSource(root, classes, splits, multilabel=multilabel, kind="hf")


def _groups(ds: Any, column: str) -> list[str]:
    """Each row's patient id, spelt as everywhere (store.group_id); a ClassLabel column's codes are
    read as its names, so two splits' patient 0 are not one patient unless their names agree."""
    from featcache.store import group_id

    datasets = import_datasets()
    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, datasets.ClassLabel):
        values = _code_names(feature, values)
    return [group_id(g) for g in values]


def _code_names(feature: Any, codes: Any) -> list[str | None]:
    """A ClassLabel column's codes as its names (None where a row has none: None or -1)."""
    return [None if v is None or int(v) < 0 else feature.names[int(v)] for v in codes]


def _label_column(dsets: dict[str, Any], root: Path, override: str | None, image_col: str,
                  group_col: str) -> str | None:
    """The one label column of every split: `override` (in at least one split), else the first
    split's own choice that has one (an unlabelled first split does not make the others unlabelled);
    splits that would choose another column are refused."""
    if override is not None:
        having = [name for name, ds in dsets.items() if override in ds.features]
        if not having:
            first_name, first = next(iter(dsets.items()))
            return pick_label_column(first.features, override, f"{root} (split {first_name!r})", image_col)
        for name in having:
            pick_label_column(dsets[name].features, override, f"{root} (split {name!r})", image_col)
        return override
    chosen = {name: pick_label_column(ds.features, None, f"{root} (split {name!r})", image_col, group_col)
              for name, ds in dsets.items()}
    columns = list(dict.fromkeys(c for c in chosen.values() if c is not None))
    if len(columns) > 1:
        detail = ", ".join(f"{name}: {c!r}" for name, c in chosen.items() if c is not None)
        raise ValueError(f"the splits of {root} hold their labels in different columns ({detail}); pick one "
                         f"with --label-column.")
    return columns[0] if columns else None


def _row_names(kind: str, feature: Any, values: Any, split: str, column: str) -> list[Any]:
    """Each row's class name (str), list of names (multi-label) or None (unlabelled), read in the
    split's own terms: a ClassLabel's codes through its own names, so splits saved with the names in
    another order still agree."""
    def bad(v: Any) -> ValueError:
        return NotClassLabels(f"split {split!r}: column {column!r} holds {v!r}, which is not a class label "
                              f"({feature!r})")

    if kind == "classlabel":
        return _code_names(feature, values)
    if kind.startswith("multilabel"):
        missing = [i for i, row in enumerate(values) if row is None]
        if missing:  # None is "not annotated", not "no finding"; an empty list is "no finding"
            raise ValueError(f"split {split!r}: {len(missing)} row(s) (first: row {missing[0]}) have no {column!r} "
                             f"list (None): a featcache file holds 0/1 per label for every row, so they would read as "
                             f"'no finding'. Give them a list ([] for no finding) or leave them out.")
        if kind == "multilabel":
            inner = feature[0] if isinstance(feature, list) else feature.feature
            return [[inner.names[int(c)] for c in row if int(c) >= 0] for row in values]
        return [[str(int(c)) for c in row if int(c) >= 0] for row in values]
    if kind == "str":
        warn_unlabelled_markers(values, f"split {split!r} column {column!r}")
        return [label_name(v) for v in values]
    out: list[Any] = []
    for v in values:
        if v is None or (kind == "float" and not np.isfinite(v)) or int(v) < 0:
            out.append(None)
        elif kind == "float" and not float(v).is_integer():
            raise bad(v)
        else:
            out.append(str(int(v)))
    return out


def _classes(kinds: dict[str, str], features: dict[str, Any], names: dict[str, list[Any]], column: str) -> list[str]:
    """Class names shared by every split: ClassLabel names (the first split's order, then names only
    later splits have); integers 0..max as "0".."max"; sorted distinct strings. Splits whose columns
    name classes differently (a ClassLabel beside integers) are refused."""
    if not kinds:
        return []
    families = {name: ("named" if k in ("classlabel", "multilabel", "str") else "index") for name, k in kinds.items()}
    if len(set(families.values())) > 1:
        detail = ", ".join(f"{name}: {features[name]!r}" for name in kinds)
        raise ValueError(f"column {column!r} names classes differently in different splits ({detail}): an integer "
                         f"cannot be matched to a class name. Cast every split's column to the same ClassLabel.")
    seen = [v for vals in names.values() for row in vals if row is not None
            for v in (row if isinstance(row, list) else [row])]
    if next(iter(families.values())) == "index":
        return [str(i) for i in range(max((int(v) for v in seen), default=-1) + 1)]
    ordered: list[str] = []
    for name, kind in kinds.items():
        if kind == "classlabel":
            ordered += [c for c in features[name].names if c not in ordered]
        elif kind == "multilabel":
            inner = features[name][0] if isinstance(features[name], list) else features[name].feature
            ordered += [c for c in inner.names if c not in ordered]
    return ordered + sorted(set(seen) - set(ordered))


def _encode_labels(names: list[Any] | None, classes: list[str], n: int, multilabel: bool) -> np.ndarray:
    """(N,) int64 with -1 = unlabelled, or (N, C) uint8 for multi-label columns."""
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        out = np.zeros((n, len(classes)), dtype=np.uint8)
        for i, row in enumerate(names or ()):
            for c in row or ():
                out[i, index[c]] = 1
        return out
    if names is None:
        return np.full(n, -1, dtype=np.int64)
    return np.array([-1 if v is None else index[v] for v in names], dtype=np.int64)


def row_ids(ds: Any, split: str, image_column: str) -> list[str]:
    """Stable row ids: the image paths the dataset kept when every row has one and they are
    unique within the split; otherwise `<split>/<index:08d>`."""
    paths = kept_paths(ds, image_column)
    if paths and all(paths) and len(set(paths)) == len(paths):
        return paths
    return [f"{split}/{i:08d}" for i in range(len(ds))]


def kept_paths(ds: Any, image_column: str) -> list[str | None]:
    """The `path` field of each row's image (save_to_disk keeps the basename), without reading bytes."""
    datasets = import_datasets()
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    column = raw.with_format("arrow")[:].column(image_column)
    out: list[str | None] = []
    for chunk in column.chunks:
        out.extend(chunk.field("path").to_pylist())
    return out


# ------------------------------------------------------------------------------------------------
# row references (what the loader workers receive)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFRowRef:
    """One image row of a save_to_disk directory."""

    root: str       # absolute dataset directory
    split: str      # split name ("all" for a plain Dataset)
    index: int      # row index in dataset order
    column: str     # image column


def make_ref(root: Path, split: str, index: int, column: str) -> Path:
    """A Path whose text is `hf:/abs/dir::split::index::column`; Path() and pickle keep it as is."""
    text = f"{REF_PREFIX}{Path(root).as_posix()}{_SEP}{quote(split, safe='')}{_SEP}{index}{_SEP}{quote(column, safe='')}"
    return Path(text)


def parse_ref(path: str | os.PathLike) -> HFRowRef | None:
    """The reference encoded by make_ref, or None for an ordinary file path."""
    text = os.fspath(path)
    if not text.startswith(REF_PREFIX + "/") or text.count(_SEP) < 3:
        return None
    root, split, index, column = text[len(REF_PREFIX):].rsplit(_SEP, 3)
    if not index.isdigit():
        return None
    return HFRowRef(root, unquote(split), int(index), unquote(column))


_OPEN: dict[tuple[int, str, str, str], Any] = {}


def _open_split(ref: HFRowRef) -> Any:
    """The split's image column with decoding off, opened once per process (workers fork or spawn)."""
    key = (os.getpid(), ref.root, ref.split, ref.column)
    ds = _OPEN.get(key)
    if ds is None:
        datasets = import_datasets()
        ds = load_splits(Path(ref.root))[ref.split]
        ds = ds.select_columns([ref.column]).cast_column(ref.column, datasets.Image(decode=False))
        _OPEN[key] = ds
    return ds


def forget_open(root: Path) -> None:
    """Drop this process's cached handles on `root` (so a re-saved dataset is read afresh)."""
    for key in [k for k in _OPEN if k[1] == str(root)]:
        del _OPEN[key]


def _row_image(ref: HFRowRef) -> tuple[bytes | None, Path | None]:
    """A row's encoded image bytes, or else the file it names (an image stored by path only)."""
    try:
        value = _open_split(ref)[ref.index][ref.column]
    except MissingDatasetsError as exc:
        raise ImageDecodeError(str(exc)) from None
    except Exception as exc:
        raise ImageDecodeError(f"cannot read row {ref.index} of split {ref.split!r} in {ref.root}: "
                               f"{type(exc).__name__}: {exc}") from None
    if value is None:
        raise ImageDecodeError("the row has no image (None)")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return bytes(data), None
    if path:
        return None, Path(path) if Path(path).is_absolute() else Path(ref.root) / path
    raise ImageDecodeError("the row's image has neither bytes nor a path")


def load_ref_image(ref: HFRowRef, options: "DecodeOptions") -> "Image.Image":
    """Decode one row's image exactly as an image file would be (featcache's decoder)."""
    data, file = _row_image(ref)
    return decode_image_bytes(data, options) if data is not None else load_image(file, options)


def ref_content(ref: HFRowRef) -> RowContent:
    """The hash of one row's image bytes (or of the file it names), to notice a row whose id was
    kept but whose image changed when the dataset was saved anew."""
    data, file = _row_image(ref)
    return bytes_content(data) if data is not None else row_content(file)


__all__: Sequence[str] = ("is_hf_dataset_dir", "from_hf_dir", "make_ref", "parse_ref", "load_ref_image", "ref_content",
                          "MissingDatasetsError", "HFRowRef")
