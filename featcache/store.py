"""The featcache HDF5 format (encoding-version 1): create, append, resume, read.

One file holds every split of one dataset under one backbone and preprocessing. Every dataset
is preallocated at its final shape with contiguous storage that is allocated at creation, so a
later write only fills raw bytes and never changes HDF5 metadata: after a SIGKILL at any moment
the file still opens, and a row is trusted only once its ``done`` flag was set after its
features were flushed. The format is specified in docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from featcache.names import CONTENT_CHARS, FEATURE_KINDS, VAL_ALIASES, VAL_SPLIT
from featcache.runs import attribute_json, canonical_json

if TYPE_CHECKING:  # tokens.py imports torch; the store stays importable without it
    from featcache.tokens import TokenLayout
if TYPE_CHECKING:
    import pandas

ENCODING_TYPE = "featcache"
ENCODING_VERSION = "1"
# readers never take HDF5's lock: a file is laid out in full at creation and rows become visible
# only through `done`, so reading while an extraction fills it is safe and never blocks the writer
READ_LOCKING = False
ERROR_BYTES = 240  # fixed width of a per-row error reason (utf-8, truncated)

# config keys that describe where/when a file was made rather than what is in it: recorded, but
# not hashed, so upgrading a library or re-running elsewhere does not invalidate a cache.
NON_IDENTITY_KEYS = ("versions", "created", "host", "data_root", "data_kind",
                     "decode_rules",  # provenance: which decoding rules made the rows (sources.DECODE_RULES)
                     "source")  # import: the file names the arrays came from (a deployment set has others)

_STR = h5py.string_dtype("utf-8")


def fingerprint_of(config: dict[str, Any]) -> str:
    """sha256 of the identity part of a config (model, revision, preprocessing, token mode, dtype).

    A local model folder is identified by the content hash of its weights ("weights"), not by its
    path: the same folder copied elsewhere resumes, new weights saved into it do not."""
    identity = {k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS}
    if identity.get("weights"):
        identity.pop("model", None)
    blob = canonical_json(identity)
    return hashlib.sha256(blob.encode()).hexdigest()


def other_settings_error(path: str | os.PathLike, old: dict[str, Any], new: dict[str, Any],
                         advice: str = "Use another --out, or --overwrite to replace the file.") -> "FeatureStoreError":
    """The refusal of a feature file made with other settings than a run asks for, naming them."""
    return FeatureStoreError(f"{path} was made with {describe_config(old)}, but this run asks for "
                             f"{describe_config(new)}{config_differences(old, new)}. {advice}")


def describe_config(config: dict[str, Any]) -> str:
    """One human line naming what a config extracts, for error messages."""
    parts = [str(config.get("model", "?"))]
    if config.get("revision"):
        parts.append(f"revision {config['revision']}")
    mode = config.get("token_mode")
    if config.get("num_tokens"):
        parts.append(f"token mode {mode}, {config['num_tokens']} tokens")
    parts.append(f"tokens {config.get('tokens', 'none')}")
    parts.append(f"dtype {config.get('dtype', '?')}")
    if config.get("image_size"):
        parts.append(f"image size {config['image_size']}")
    if config.get("blocks"):
        parts.append(f"{config['blocks']} blocks")
    if config.get("weights"):
        parts.append(f"weights sha256 {str(config['weights'])[:12]}")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'; they differ in: image_mean ([0.5, ...] -> [0.4, ...]), fast_decode (absent -> true)' -- the
    identity keys whose values differ, so a refusal says why even when describe_config reads the same."""
    def flat(config: dict[str, Any]) -> dict[str, str]:
        # values as stored (JSON: a tuple reads back as a list), nested settings by dotted name
        out: dict[str, str] = {}
        for key, value in json.loads(canonical_json({k: v for k, v in config.items()
                                                     if k not in NON_IDENTITY_KEYS})).items():
            if isinstance(value, dict) and value:
                out.update({f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in value.items()})
            else:
                out[key] = json.dumps(value, sort_keys=True)
        return out

    def show(values: dict[str, str], key: str) -> str:
        text = values.get(key, "absent")
        return text if len(text) <= 60 else text[:57] + "..."

    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not keys:
        return ""
    return "; they differ in: " + ", ".join(f"{k} ({show(a, k)} -> {show(b, k)})" for k in keys[:6]) + (
        f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_same_data_root(old: dict[str, Any], new: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume or update a file from images under another folder.

    Why: stored rows are matched by their path relative to the data root, so a copy of the data
    elsewhere (another site, a re-exported or re-windowed set with the same file names) would keep
    the old features row for row without a single image being read."""
    before, now = old.get("data_root"), new.get("data_root")
    if new.get("data_kind") == "hf":
        return  # a datasets directory saved anew (it grew): rows keep their ids, the file names it kept
    if before and now and Path(before) != Path(now):
        raise FeatureStoreError(
            f"{path} holds features of the images under {before}, but this run reads {now}. Rows are matched by "
            f"their path relative to that folder, so same-named files here would keep the old features. Use another "
            f"--out, or --overwrite to re-extract (if only the folder moved, run from its old place).")


@dataclass
class SplitSpec:
    """The rows of one split, known before any feature is computed."""

    paths: list[str]                        # row identity, relative to the data root
    labels: np.ndarray                      # (N,) int64, -1 = unlabelled; or (N, C) uint8 multi-label
    groups: list[str] | None = None         # patient / study id per row, optional
    manifest_sha256: str = ""               # hash of (paths, labels, groups): detects a changed dataset

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        if not self.manifest_sha256:
            self.manifest_sha256 = manifest_hash(self.paths, self.labels, self.groups)


def group_id(value: Any) -> str:
    """The one spelling of a group (patient) id: surrounding whitespace dropped, a float that holds
    an integer written as that integer (an id column pandas read as float: 7.0 -> "7"), and a
    missing id (None, NaN, "") as "", which means "unknown patient": each such row is its own
    group (SplitView.row_groups), never one giant patient."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    return str(value).strip()


# the key of a row without a patient id starts so: a group of its own (ids are stripped text, never so)
OWN_GROUP = "\x00"


def row_keys(groups: Sequence[Any]) -> list[str]:
    """One grouping key per row: its patient id spelt once (group_id), a missing id a group of its own."""
    return [group_id(g) or f"{OWN_GROUP}row {i}" for i, g in enumerate(groups)]


def manifest_hash(paths: Sequence[str], labels: np.ndarray, groups: Sequence[str] | None) -> str:
    """A stable hash of a split's rows, so resume can tell the dataset has not changed."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    for g in groups or ():
        h.update(str(g).encode() + b"\0")
    return h.hexdigest()


@dataclass
class FeatureLayout:
    """What one backbone stores per image: the cls/pooled width and the stored tokens' layout."""

    dim: int                                # D of cls and pooled
    tokens: "TokenLayout | None" = None     # the stored tokens (tokens.TokenLayout); None = not stored
    dtype: str = "float16"                  # storage dtype of cls, pooled, tokens
    has_pooled: bool = True                 # imported features may bring only one array
    blocks: int | None = None               # per-block CLS / mean patch token of the last N blocks (--blocks)


class FeatureStoreError(ValueError):
    """A feature file that cannot be used as asked (wrong format, version, or config)."""


@dataclass(frozen=True)
class FeaturePart:
    """One piece of a feature kind: a dataset, and for block datasets how many last blocks."""

    dataset: str                # cls | pooled | blocks_cls
    blocks: int | None = None   # blocks_cls: the last N blocks, concatenated oldest first

    @property
    def kind(self) -> str:
        """This part alone as a feature kind ("cls", "pooled", "cls@4")."""
        return f"cls@{self.blocks}" if self.blocks is not None else self.dataset


def parse_feature_kind(kind: str) -> list[FeaturePart]:
    """What a feature kind concatenates, in order: "cls+pooled" -> cls, pooled; "cls@4+pooled" ->
    the CLS tokens of the last 4 blocks, then the last block's mean patch token (DINOv2's "4 blocks
    + avgpool"). A ValueError naming the accepted kinds otherwise. The one parser every evaluator uses."""
    parts = []
    pieces = str(kind).split("+")
    for piece in pieces:
        m = _BLOCK_KIND.fullmatch(piece)
        if m:
            parts.append(FeaturePart("blocks_cls", int(m.group(1))))
        elif piece in ("cls", "pooled"):
            parts.append(FeaturePart(piece))
        else:
            parts = []
            break
    names = [p.dataset for p in parts]
    if not parts or len(set(names)) != len(names) or (parts[0].dataset == "pooled" and len(parts) > 1) \
            or any(p.blocks == 0 for p in parts):
        raise ValueError(f"--features must be one of {', '.join(FEATURE_KINDS)}, or cls@N / cls@N+pooled (the CLS "
                         f"tokens of the last N blocks, stored with extract --blocks N); got {kind!r}.")
    return parts


_BLOCK_KIND = re.compile(r"cls@(\d+)")


def check_finite(x: np.ndarray, what: str) -> None:
    """Refuse NaN or inf features where they are loaded, for every evaluator alike: a NaN row would be
    ranked as a neighbour or train a head to loss nan without a word."""
    finite = np.isfinite(x)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1)) if x.ndim > 1 else np.flatnonzero(~finite)
    raise FeatureStoreError(
        f"{what} holds {int((~finite).sum())} non-finite values (NaN or inf) in {bad_rows.size} rows (first: "
        f"{bad_rows[:5].tolist()}). The features are unusable as they are: re-extract with --dtype float32 "
        f"(float16 overflows above 65504), or drop those rows before importing.")


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Refuse single-label labels outside 0..num_classes-1 (-1, unlabelled, is filtered earlier)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        return
    bad = (labels < -1) | (labels >= num_classes)
    if bad.any():
        raise FeatureStoreError(
            f"{what} has {int(bad.sum())} labels outside the {num_classes} classes of the file (e.g. "
            f"{int(labels[bad][0])}; labels must be 0..{num_classes - 1}, or -1 for unlabelled). Re-import "
            f"with --classes naming every class.")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

class SplitView:
    """Read access to one split. Arrays are h5py datasets (array-like, sliced lazily)."""

    def __init__(self, group: h5py.Group, name: str):
        self._g = group
        self.name = name
        self.n = int(group.attrs["n"])
        self.manifest_sha256 = str(group.attrs.get("manifest_sha256", ""))

    # raw datasets -------------------------------------------------------------------------
    @property
    def cls(self) -> h5py.Dataset:
        return self._g["cls"]

    @property
    def pooled(self) -> h5py.Dataset | None:
        return self._g["pooled"] if "pooled" in self._g else None

    @property
    def tokens(self) -> h5py.Dataset | None:
        return self._g["tokens"] if "tokens" in self._g else None

    @property
    def labels(self) -> np.ndarray:
        return self._g["labels"][()]

    @property
    def paths(self) -> list[str]:
        return [p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else str(p)
                for p in self._g["paths"][()]]

    @property
    def groups(self) -> list[str] | None:
        if "groups" not in self._g:
            return None
        return [group_id(g) for g in self._g["groups"][()]]

    @property
    def done(self) -> np.ndarray:
        return self._g["done"][()].astype(bool)

    @property
    def error_reasons(self) -> np.ndarray:
        """(N,) str: why each row could not be read; "" for rows without an error."""
        raw = self._g["errors"][()]
        return np.array([r.decode("utf-8", "replace") for r in raw], dtype=object)

    @property
    def errors(self) -> list[tuple[str, str]]:
        """The (path, reason) table of inputs that could not be read."""
        reasons = self.error_reasons
        paths = self._g["paths"]
        return [(_decode(paths[i]), str(reasons[i])) for i in np.flatnonzero(reasons != "")]

    @property
    def multilabel(self) -> bool:
        return self._g["labels"].ndim == 2

    # convenience --------------------------------------------------------------------------
    def valid_index(self) -> np.ndarray:
        """Row indices whose features are complete (done), ascending."""
        return np.flatnonzero(self.done)

    def features(self, kind: str = "cls", rows: np.ndarray | None = None) -> np.ndarray:
        """float32 features of the done rows (or of `rows`): cls, pooled, or both concatenated.
        Non-finite values are refused here, once, for every evaluator."""
        idx = self.valid_index() if rows is None else np.asarray(rows)
        parts = []
        for part in parse_feature_kind(kind):
            ds = _part_dataset(self._g, part, self.name)
            x = read_rows(ds, idx).astype(np.float32, copy=False)
            if part.blocks is not None:
                x = x[:, -part.blocks:].reshape(len(x), -1)
            parts.append(x)
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        check_finite(x, f"split {self.name!r} ({kind})")
        return x

    def arrays(self, kind: str = "cls", labelled_only: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X float32, y, row index) of done rows, by default only those with a label."""
        idx = self.valid_index()
        labels = self.labels
        if labelled_only and labels.ndim == 1:
            idx = idx[labels[idx] >= 0]
        return self.features(kind, idx), labels[idx], idx

    def contents(self, rows: np.ndarray) -> np.ndarray | None:
        """The recorded content hashes (S32: "" not recorded, "-" unreadable) of `rows`, or None for a
        file without them (imports, files made before they were recorded)."""
        return read_rows(self._g["content"], np.asarray(rows)) if "content" in self._g else None

    def row_groups(self, rows: np.ndarray) -> list[str] | None:
        """Group ids of `rows` for resampling, held-out rows and CV folds, or None when the split has
        no groups; a row without an id (unknown patient) is a group of its own."""
        groups = self.groups
        if groups is None:
            return None
        return [groups[i] or f"{OWN_GROUP}{self.name}:{int(i)}" for i in rows]
    def table(self) -> "pandas.DataFrame":
        """The split's rows as a pandas DataFrame, for your own analysis (needs pandas).

        Columns: path, label, class_name, group, done, error. label is the class index (-1 =
        unlabelled) and class_name its name ("" when unlabelled). In a multi-label file label is
        the list of positive class indices of each row and class_name their names joined by "|".
        group is None when the split has no groups; error is "" for rows without one.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("SplitView.table() needs pandas, which is not installed: pip install pandas") from None
        classes = [_decode(c) for c in self._g.file["classes"][()]]
        labels = self.labels
        if labels.ndim == 2:
            label_col: list[Any] = [np.flatnonzero(row).tolist() for row in labels]
            names = ["|".join(classes[i] for i in row) for row in label_col]
        else:
            label_col = labels.astype(np.int64).tolist()
            names = [classes[i] if 0 <= i < len(classes) else "" for i in label_col]
        groups = self.groups
        return pd.DataFrame({
            "path": self.paths,
            "label": label_col,
            "class_name": names,
            "group": groups if groups is not None else [None] * self.n,
            "done": self.done,
            "error": [str(r) for r in self.error_reasons],
        })

    def __repr__(self) -> str:
        return f"<SplitView {self.name!r}: {int(self.done.sum())}/{self.n} rows done>"


# why one split may not play two roles, per pair of roles
_SHARED_ROLE_WHY = {
    ("train_split", "val_split"): "epochs (or C) would be chosen on the rows the model learns from",
    ("train_split", "test_split"): "the test metrics would be of the rows the model learned from",
    ("val_split", "test_split"): "the model would be chosen (and, refitted on train + val, fitted) on the rows "
                                 "it is scored on",
}


def check_distinct_splits(train_split: str | None, val_split: str | None, test_split: str | None) -> None:
    """Refuse one split in two roles: numbers scored on rows the model was fitted or chosen on would
    be reported as held-out ones (test metrics of the training rows), with nothing to tell them apart."""
    roles = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
    defaults = {"train_split": "train", "val_split": VAL_SPLIT, "test_split": "test"}
    for (a, b), why in _SHARED_ROLE_WHY.items():
        if roles[a] and roles[a] == roles[b]:
            # the user may have typed only one of the two: say which one holds the name by default
            default = next((f" ({roles[a]!r} is --{r.replace('_', '-')}'s default)" for r in (a, b)
                            if defaults[r] == roles[a]), "")
            raise ValueError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} are both {roles[a]!r}{default}: {why}. "
                             f"Give each its own split" + (" (--val-split none holds validation rows out of train, "
                                                           "or cross-validates the probe)" if "val_split" in (a, b)
                                                           else "") + ".")


def resolve_val_split(splits: Sequence[str], requested: str | None = VAL_SPLIT) -> str | None:
    """The validation split to use: `requested` when the file has it; for the default name "val",
    otherwise the one split named validation, valid or dev (Hugging Face datasets and many folders
    say "validation"), so a file's own validation split is never passed over for a held-out or
    cross-validated stand-in. Anything else is returned as asked (callers refuse or fall back)."""
    if requested is None or requested in splits or requested != VAL_SPLIT:
        return requested
    found = [name for name in splits if name.lower() in VAL_ALIASES]
    return found[0] if len(found) == 1 else requested


def _part_dataset(group: h5py.Group, part: FeaturePart, split: str) -> h5py.Dataset:
    """The dataset a feature part reads, or an error saying how to get it."""
    ds = group.get(part.dataset)
    if ds is None:
        if part.dataset == "blocks_cls":
            raise FeatureStoreError(f"split {split!r} has no per-block features; --features cls@{part.blocks} needs a "
                                    f"file extracted with --blocks {part.blocks} (or more).")
        raise FeatureStoreError(f"split {split!r} has no {part.dataset!r} features (imported with only 'cls'?); "
                                f"use --features cls.")
    if part.blocks is not None and part.blocks > ds.shape[1]:
        raise FeatureStoreError(f"split {split!r} stores {ds.shape[1]} blocks; --features cls@{part.blocks} needs a "
                                f"file extracted with --blocks {part.blocks}.")
    return ds


def _decode(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read rows of a dataset in `rows` order by sorted contiguous runs (never fancy indexing)."""
    rows = np.asarray(rows, dtype=np.int64)
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((uniq.size,) + ds.shape[1:], dtype=ds.dtype)
    pos = 0
    for start, stop in contiguous_runs(uniq):
        ds.read_direct(out, np.s_[start:stop], np.s_[pos:pos + stop - start])
        pos += stop - start
    if uniq.size == rows.size and np.array_equal(uniq, rows):
        return out
    return out[inverse]


def contiguous_runs(sorted_rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """Yield [start, stop) runs of consecutive integers in an ascending array."""
    if sorted_rows.size == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [sorted_rows.size]])
    for a, b in zip(starts, stops):
        yield int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1


class FeatureStore:
    """A read-only featcache file: ``store.splits``, ``store.classes``, ``store[split]``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist; make it with `featcache extract` "
                                    f"or `featcache import`.")
        try:
            self._f = h5py.File(self.path, "r", locking=READ_LOCKING)
        except OSError as exc:
            raise FeatureStoreError(f"{self.path} is not a readable HDF5 file ({exc}); pass a feature file made "
                                    f"with `featcache extract` or `featcache import`.") from exc
        check_header(self._f, self.path)
        self.config: dict[str, Any] = json.loads(self._f.attrs["config"])
        self.fingerprint: str = str(self._f.attrs["fingerprint"])
        self.classes: list[str] = [_decode(c) for c in self._f["classes"][()]]
        self.splits: list[str] = [k for k in self._f.keys() if isinstance(self._f[k], h5py.Group)]

    def __getitem__(self, split: str) -> SplitView:
        if split not in self.splits:
            raise KeyError(f"{self.path.name} has no split {split!r}; it has: {', '.join(self.splits)}.")
        return SplitView(self._f[split], split)

    def __contains__(self, split: object) -> bool:
        return split in self.splits

    def __iter__(self) -> Iterator[str]:
        return iter(self.splits)

    @property
    def multilabel(self) -> bool:
        return any(self[s].multilabel for s in self.splits)

    def part_columns(self, kind: str) -> list[slice]:
        """The columns of each part of a feature kind in its concatenation (cls+pooled: the cls
        columns, then the pooled ones)."""
        widths = [self.feature_dim(p.kind) for p in parse_feature_kind(kind)]
        edges = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def feature_dim(self, kind: str) -> int:
        """Width of a feature kind (cls + pooled widths add up)."""
        first = self[self.splits[0]]
        dims = []
        for part in parse_feature_kind(kind):
            ds = _part_dataset(first._g, part, first.name)
            dims.append(int(ds.shape[-1]) * (part.blocks or 1))
        return sum(dims)

    def leakage_note(self, splits: Sequence[str | None]) -> str | None:
        """A warning when a group (patient) appears in more than one of the splits used together."""
        used = {s for s in splits if s}
        leaked = {g: s for g, s in self.leaked_groups().items() if len(used.intersection(s)) > 1}
        if not leaked:
            return None
        example = min(leaked)  # the same example on every run (set order changes with the hash seed)
        return (f"leakage: {len(leaked)} group(s) appear in more than one of the splits {', '.join(sorted(used))} "
                f"(e.g. {example!r} in {', '.join(leaked[example])}); the same patient on both sides inflates every "
                f"number. Re-split by group (featcache split --group).")

    def leaked_groups(self) -> dict[str, list[str]]:
        """Groups (patients) found in more than one split: {group: [splits]}. Any entry is leakage:
        one patient's images on both sides of an evaluation."""
        seen: dict[str, set[str]] = {}
        for name in self.splits:
            view = self[name]
            groups = view.groups
            if groups is None:
                continue
            used = view.valid_index()  # the rows an evaluation can score: done and labelled
            if view.labels.ndim == 1:
                used = used[view.labels[used] >= 0]
            for g in {groups[i] for i in used}:
                if g != "":
                    seen.setdefault(g, set()).add(name)
        return {g: sorted(s) for g, s in seen.items() if len(s) > 1}

    @property
    def h5(self) -> h5py.File:
        return self._f

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FeatureStore {self.path} model={self.config.get('model')!r} splits={self.splits}>"


def check_header(f: h5py.File, path: Path) -> None:
    """Refuse files that are not featcache files or come from an unknown format version."""
    kind = f.attrs.get("encoding-type")
    if kind != ENCODING_TYPE:
        raise FeatureStoreError(f"{path} is an HDF5 file but not a featcache file "
                                f"(encoding-type {kind!r}, expected {ENCODING_TYPE!r}).")
    version = str(f.attrs.get("encoding-version"))
    if version != ENCODING_VERSION:
        raise FeatureStoreError(f"{path} uses featcache encoding-version {version}, this featcache "
                                f"reads version {ENCODING_VERSION}; upgrade featcache or re-extract.")


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a feature file read-only (the pinned ``featcache.open``)."""
    return FeatureStore(path)


@contextlib.contextmanager
def open_features(source: Any, classes: Sequence[str] | None = None) -> Iterator[FeatureStore]:
    """A FeatureStore for a path, an open store, or in-memory arrays.

    Arrays are ``{"train": (X, y), "val": (X, y)[, "test": (X, y)]}`` (X (N, D) float features,
    y (N,) class indices or (N, C) 0/1) or per split a dict with ``cls`` [``pooled``, ``tokens``]
    and ``labels``. They are written to a temporary featcache file, removed afterwards, so heads
    trained on arrays go through exactly the code (and numbers) of the same arrays imported into
    a file. `classes` names the classes (default "0".."C-1").
    """
    if isinstance(source, FeatureStore):
        yield source
        return
    if not isinstance(source, dict):
        with FeatureStore(source) as store:
            yield store
        return
    import tempfile

    splits = {name: _as_split_arrays(name, value) for name, value in source.items()}
    if classes is None:
        first = next(iter(splits.values()))["labels"]
        if np.asarray(first).ndim == 2:
            n = np.asarray(first).shape[1]
        else:
            n = int(max(int(np.max(s["labels"])) for s in splits.values() if len(s["labels"]))) + 1
        classes = [str(i) for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="featcache-arrays-") as tmp:
        store = write_arrays(Path(tmp) / "arrays.h5", splits, classes, {"model": "arrays", "tokens": "arrays"})
        try:
            yield store
        finally:
            store.close()


def _as_split_arrays(name: str, value: Any) -> dict[str, Any]:
    """One split of open_features' arrays as write_arrays' dict."""
    if isinstance(value, dict):
        if "cls" not in value or "labels" not in value:
            raise ValueError(f"split {name!r}: expected a dict with 'cls' and 'labels' (optionally 'pooled', "
                             f"'tokens'); got keys {sorted(value)}.")
        return {k: value[k] for k in ("cls", "pooled", "tokens", "labels", "paths", "groups") if k in value}
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        out = {"cls": np.asarray(value[0], dtype=np.float32), "labels": np.asarray(value[1])}
        if len(value) == 3:
            out["tokens"] = np.asarray(value[2], dtype=np.float32)
        return out
    raise ValueError(f"split {name!r}: expected (X, y), (X, y, tokens) or a dict of arrays; got "
                     f"{type(value).__name__}.")


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def _allocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """Create a contiguous dataset and allocate its storage now (a write to its last row), so later
    writes change raw bytes only and a crash can never leave half-written HDF5 metadata."""
    ds = group.create_dataset(name, shape=shape, dtype=dtype)
    if shape and shape[0] > 0:
        ds[shape[0] - 1] = np.zeros(shape[1:], dtype=ds.dtype) if len(shape) > 1 else ds.dtype.type(0)
    return ds


def write_header(f: h5py.File, config: dict[str, Any], classes: Sequence[str]) -> None:
    """Root attributes that make the file self-describing, and the class names."""
    f.attrs["encoding-type"] = ENCODING_TYPE
    f.attrs["encoding-version"] = ENCODING_VERSION
    f.attrs["config"] = attribute_json(config)
    f.attrs["fingerprint"] = fingerprint_of(config)
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR)


ROOT_NAMES = ("classes",)   # root members of a feature file that are not splits


def check_split_names(names: Sequence[str]) -> None:
    """Split names become HDF5 group names: refuse before any file is written what would nest
    groups ('tr/ain' made a file no reader could open) or collide with the file's own members."""
    for name in names:
        name = str(name)
        if not name.strip() or "/" in name or name in (".", "..") or name in ROOT_NAMES:
            why = ("is reserved (the file's class list)" if name in ROOT_NAMES else
                   "is empty" if not name.strip() else "holds '/' (an HDF5 path separator)" if "/" in name
                   else "is not a name")
            raise ValueError(f"split name {name!r} {why}; name the split e.g. train, val or test.")


def write_split_rows(f: h5py.File, name: str, spec: SplitSpec) -> h5py.Group:
    """A split's group with what identifies its rows: paths, labels, groups."""
    g = f.create_group(name)
    g.attrs["n"] = len(spec.paths)
    g.attrs["manifest_sha256"] = spec.manifest_sha256
    g.create_dataset("paths", data=np.array(spec.paths, dtype=object), dtype=_STR)
    labels = np.asarray(spec.labels)
    g.create_dataset("labels", data=labels.astype(np.uint8 if labels.ndim == 2 else np.int64))
    g["labels"].attrs["role"] = "multi-label 0/1 per class" if labels.ndim == 2 else "class index, -1 = unlabelled"
    if spec.groups is not None:
        g.create_dataset("groups", data=np.array(spec.groups, dtype=object), dtype=_STR)
    return g


def same_rows(path: str | os.PathLike, classes: Sequence[str], splits: dict[str, SplitSpec]) -> bool:
    """True when a feature file holds exactly these classes, splits and rows (manifest hashes),
    read without opening it for writing."""
    with FeatureStore(path) as store:
        if store.classes != list(classes) or set(store.splits) != set(splits):
            return False
        return all(store[name].manifest_sha256 == spec.manifest_sha256 for name, spec in splits.items())


def check_same_data(f: h5py.File, path: str | os.PathLike, classes: Sequence[str],
                    splits: dict[str, SplitSpec]) -> None:
    """Refuse a feature file (open, read or write) made for other data than a run now has: other
    classes, a split gone or new, other images or labels, or only other group ids (said as such:
    --update records them and reuses every row)."""
    old_classes = [_decode(c) for c in f["classes"][()]]
    if old_classes != list(classes):
        raise FeatureStoreError(
            f"{path} has classes {old_classes}, but the data now has {list(classes)}. "
            f"Use --update to keep the stored rows and compute only what is new, another --out, or "
            f"--overwrite to re-extract.")
    stale = sorted(k for k in f.keys() if k != "classes" and k not in splits)
    if stale:
        raise FeatureStoreError(
            f"{path} has split(s) {', '.join(stale)} that the data no longer has (it has "
            f"{', '.join(splits)}); the data changed: use --update to drop their rows and keep the rest, "
            f"another --out, or --overwrite.")
    for name, spec in splits.items():
        if name not in f:
            raise FeatureStoreError(f"{path} has no split {name!r} (it has "
                                    f"{', '.join(k for k in f.keys() if k != 'classes')}); the data "
                                    f"changed: use --update to keep the stored rows and compute only what "
                                    f"is new, another --out, or --overwrite.")
        if str(f[name].attrs["manifest_sha256"]) != spec.manifest_sha256:
            if _same_paths_and_labels(f[name], spec):
                raise FeatureStoreError(
                    f"the group (patient) ids of split {name!r} differ from those {path} was made "
                    f"with; its images and labels are the same (a group column read now, or ids spelt "
                    f"another way: 7.0 is 7, a missing id its own patient). Use --update to record the "
                    f"groups (every stored row is reused), or --overwrite.")
            raise FeatureStoreError(
                f"the images or labels of split {name!r} changed since {path} was made "
                f"({f[name].attrs['n']} rows then, {len(spec.paths)} now). "
                f"Use --update to keep the stored rows and compute only what is new, another --out, or "
                f"--overwrite to re-extract.")


class FileBusyError(FeatureStoreError):
    """Another process holds the file's write lock."""


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    if "flag values don't match" in text:  # this very process has the file open without locking
        return False
    return isinstance(exc, BlockingIOError) or "unable to lock" in text or "resource temporarily unavailable" in text


def _open_for_writing(path: Path) -> h5py.File:
    """The file opened read-write with HDF5's exclusive lock, or one line saying another process holds it."""
    try:
        return h5py.File(path, "r+")
    except OSError as exc:
        if _is_lock_error(exc):
            raise FileBusyError(
                f"another process is writing {path} (HDF5 holds its lock): wait for it to finish, or use "
                f"another --out. The file is safe; nothing was changed.") from None
        raise FeatureStoreError(f"{path} exists but cannot be opened ({exc}); use --overwrite to replace it.") from exc


def is_being_written(path: str | os.PathLike) -> bool:
    """True while a writer holds the file's HDF5 lock (an extraction in progress). HDF5 locks with
    flock(LOCK_EX); a shared, non-blocking flock on our own descriptor tests it without opening the
    file through HDF5 (whose per-process state would clash with readers opened without locking)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases our shared lock
    return False


def planned_bytes(splits: dict[str, SplitSpec], layout: FeatureLayout) -> int:
    """Bytes a new file reserves: every feature array is allocated at creation (plus row metadata)."""
    item = np.dtype(layout.dtype).itemsize
    per_row = layout.dim * item * (2 if layout.has_pooled else 1) + ERROR_BYTES + CONTENT_CHARS + 16 + 64
    if layout.tokens is not None:
        per_row += layout.tokens.num_tokens * layout.tokens.dim * item
    if layout.blocks:
        per_row += 2 * layout.blocks * layout.dim * item
    return sum(len(spec.paths) for spec in splits.values()) * per_row + (1 << 20)


def check_free_space(path: Path, needed: int, layout: FeatureLayout | None = None) -> None:
    """Refuse to start a file the disk (or the process's file-size limit) cannot hold, naming both
    sizes and only the remedies that apply (a ulimit is raised, not freed; float16 only if not in use)."""
    import resource
    import shutil

    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    room, what, first = free, f"{_gib(free)} free on its disk", "Free space"
    if limit != resource.RLIM_INFINITY and limit < room:
        room, what, first = limit, f"a file-size limit of {_gib(limit)} (ulimit -f)", "Raise the limit (ulimit -f)"
    if needed > room:
        less = []
        if layout is None or layout.dtype != "float16":
            less.append("--dtype float16")
        if layout is None or layout.tokens is not None:
            less.append("--tokens none")
        if layout is not None and layout.blocks:
            less.append("fewer --blocks")
        tail = f", or store less ({', '.join(less)})" if less else ""
        raise FeatureStoreError(f"{path} needs {_gib(needed)} (every feature is preallocated), but there is {what}. "
                                f"{first}, use another --out{tail}.")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


class StoreWriter:
    """Creates or resumes a feature file and fills it row by row, crash-safely.

    The caller writes features with ``write`` and failures with ``write_errors``; each call
    flushes the features first and only then sets ``done`` and flushes again.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], classes: Sequence[str],
                 splits: dict[str, SplitSpec], layout: FeatureLayout, overwrite: bool = False,
                 retry_errors: bool = False):
        self.path = Path(path)
        self.config = dict(config)
        self.fingerprint = fingerprint_of(self.config)
        self.layout = layout
        self.resumed = False
        if self.path.exists() and not overwrite:
            self._f = self._open_existing(classes, splits)
            self.resumed = True
        else:
            check_split_names(list(splits))
            if self.path.exists():  # --overwrite: never replace a file another process is filling
                _open_for_writing(self.path).close()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(self.path, planned_bytes(splits, layout), layout)
            tmp = self.path.with_name(self.path.name + ".creating")
            try:
                with h5py.File(tmp, "w") as f:
                    self._create(f, classes, splits)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise FeatureStoreError(f"could not create {self.path}: {exc}. Nothing was written; free disk "
                                        f"space (or raise the file-size limit) and run the command again.") from exc
            os.replace(tmp, self.path)  # a file that exists is always fully laid out
            self._f = _open_for_writing(self.path)
        self.retry_errors = retry_errors
        if retry_errors:
            for name in splits:
                self._f[name]["errors"][...] = np.zeros(self._f[name].attrs["n"], dtype=f"S{ERROR_BYTES}")
            self._f.flush()

    # set-up -----------------------------------------------------------------------------------
    def _create(self, f: h5py.File, classes: Sequence[str], splits: dict[str, SplitSpec]) -> None:
        lay = self.layout
        write_header(f, self.config, classes)
        for name, spec in splits.items():
            g = write_split_rows(f, name, spec)
            n = len(spec.paths)
            cls = _allocated(g, "cls", (n, lay.dim), lay.dtype)
            cls.attrs["role"] = "first prefix token (CLS), or the pooled output of a CNN"
            if lay.has_pooled:
                pooled = _allocated(g, "pooled", (n, lay.dim), lay.dtype)
                pooled.attrs["role"] = "mean of patch tokens"
            if lay.blocks:
                for key, role in (("blocks_cls", "CLS token of each of the last N blocks after the final norm, "
                                                  "oldest first (blocks_cls[:, -1] is cls)"),
                                  ("blocks_pooled", "mean patch token of each of the last N blocks after the "
                                                     "final norm, oldest first")):
                    ds = _allocated(g, key, (n, lay.blocks, lay.dim), lay.dtype)
                    ds.attrs["role"] = role
            if lay.tokens is not None:
                tok = _allocated(g, "tokens", (n, lay.tokens.num_tokens, lay.tokens.dim), lay.dtype)
                tok.attrs["role"] = "last_hidden_state after the token mode"
                for key, value in lay.tokens.attrs().items():
                    tok.attrs[key] = value
            done = g.create_dataset("done", data=np.zeros(n, dtype=bool))
            done.attrs["role"] = "a row is valid only when done is set"
            err = g.create_dataset("errors", data=np.zeros(n, dtype=f"S{ERROR_BYTES}"))
            err.attrs["role"] = "utf-8 reason a row's input could not be read; empty = no error"
            content = g.create_dataset("content", data=np.zeros(n, dtype=f"S{CONTENT_CHARS}"))
            content.attrs["role"] = ("first 128 bits (hex) of the sha256 of the input bytes the row was computed "
                                     "from; empty = not recorded")
            stat = g.create_dataset("file_stat", data=np.zeros((n, FILE_STAT_WIDTH), dtype=np.int64))
            stat.attrs["role"] = ("size in bytes, st_mtime_ns, st_ctime_ns and st_ino of the input file when read; "
                                  "mtime 0 = not to be trusted (check by hash)")

    def _open_existing(self, classes: Sequence[str], splits: dict[str, SplitSpec]) -> h5py.File:
        f = _open_for_writing(self.path)
        try:
            check_header(f, self.path)
            old_config = json.loads(f.attrs["config"])
            if str(f.attrs["fingerprint"]) != self.fingerprint:
                raise other_settings_error(self.path, old_config, self.config)
            check_same_data_root(old_config, self.config, self.path)
            check_same_data(f, self.path, classes, splits)
        except Exception:
            f.close()
            raise
        return f

    # progress ---------------------------------------------------------------------------------
    def pending_rows(self, split: str) -> np.ndarray:
        """Rows still to compute: not done, and (unless retrying) not already failed."""
        g = self._f[split]
        todo = ~g["done"][()].astype(bool)
        todo &= g["errors"][()] == b""
        return np.flatnonzero(todo)

    def done_count(self, split: str) -> int:
        return int(self._f[split]["done"][()].sum())

    def done_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self._f[split]["done"][()].astype(bool))

    def row_contents(self, split: str, rows: np.ndarray) -> np.ndarray | None:
        """The recorded content hashes of `rows` (None for a file without contents)."""
        g = self._f[split]
        return g["content"][()][np.asarray(rows, dtype=np.int64)] if "content" in g else None

    def recorded_content(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(settled rows, their content hashes, their file_stat rows) for the rows that are done or
        known unreadable; None for a file made before featcache recorded contents."""
        g = self._f[split]
        if "content" not in g or "file_stat" not in g:
            return None
        settled = np.flatnonzero(g["done"][()].astype(bool) | (g["errors"][()] != b""))
        return settled, g["content"][()][settled], g["file_stat"][()][settled]

    def pending_recorded(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(pending rows that hold a recorded content, that content, their file_stat rows): rows made
        pending because their input changed (forget_rows keeps what was recorded of them) or whose
        write was cut between its two flushes (their content is the current one); None for a file
        made before featcache recorded contents."""
        g = self._f[split]
        if "content" not in g or "file_stat" not in g:
            return None
        content = g["content"][()]
        rows = np.flatnonzero(~g["done"][()].astype(bool) & (g["errors"][()] == b"") & (content != b""))
        return rows, content[rows], g["file_stat"][()][rows]

    def forget_rows(self, split: str, rows: np.ndarray) -> None:
        """Make rows pending again (their input changed): unset done and clear their error; what was
        recorded of their input stays until they are written again (pending_recorded)."""
        g = self._f[split]
        rows = np.asarray(rows, dtype=np.int64)
        for key, empty in (("done", False), ("errors", b"")):
            values = g[key][()]
            values[rows] = empty
            g[key][...] = values
        self._f.flush()

    def set_file_stat(self, split: str, rows: np.ndarray, stats: np.ndarray) -> None:
        """Record the current (size, mtime_ns) of rows whose bytes were found unchanged (touched or
        copied files), so the next resume needs no hashing for them."""
        ds = self._f[split]["file_stat"]
        values = ds[()]
        values[np.asarray(rows, dtype=np.int64)] = np.asarray(stats, dtype=np.int64)[:, :values.shape[1]]
        ds[...] = values
        self._f.flush()

    # writes -----------------------------------------------------------------------------------
    def write(self, split: str, rows: np.ndarray, cls: np.ndarray, pooled: np.ndarray | None,
              tokens: np.ndarray | None = None, blocks_cls: np.ndarray | None = None,
              blocks_pooled: np.ndarray | None = None, content: np.ndarray | None = None,
              file_stat: np.ndarray | None = None) -> None:
        """Store features of `rows` (ascending) with the content they were computed from, flush,
        then mark them done and flush again."""
        g = self._f[split]
        rows = np.asarray(rows, dtype=np.int64)
        arrays = [("cls", cls), ("pooled", pooled), ("tokens", tokens), ("blocks_cls", blocks_cls),
                  ("blocks_pooled", blocks_pooled)]
        for name, arr in arrays:
            if arr is None or name not in g:
                continue
            ds = g[name]
            with np.errstate(over="ignore"):  # an overflow is refused just below, in one line
                stored = np.ascontiguousarray(arr, dtype=ds.dtype)
            if not np.isfinite(stored).all():
                _refuse_non_finite(np.asarray(arr), stored, name, split)
            if ds.dtype == np.float16 and name in ("cls", "pooled") and np.asarray(arr).dtype != np.float16:
                # computed (or imported) rows; a float16 row copied by --update or a merge is stored as it was
                _refuse_float16_underflow(np.asarray(arr), name, split)
            _write_runs(ds, rows, stored)
        self._write_content(g, rows, content, file_stat)
        self._f.flush()
        done = g["done"]
        for start, stop in contiguous_runs(rows):
            done[start:stop] = True
        self._f.flush()

    def write_errors(self, split: str, rows: Iterable[int], reasons: Iterable[str],
                     content: np.ndarray | None = None, file_stat: np.ndarray | None = None) -> None:
        """Record why rows could not be read (they stay not-done and are skipped on resume until
        their input changes, or --retry-errors); `content` as far as the bytes could be read."""
        g = self._f[split]
        err = g["errors"]
        rows = [int(r) for r in rows]
        for row, reason in zip(rows, reasons):
            err[row] = _fit_bytes(reason or "unknown error")
        if content is not None:
            order = np.argsort(rows, kind="stable")
            self._write_content(g, np.asarray(rows, dtype=np.int64)[order], np.asarray(content)[order],
                                None if file_stat is None else np.asarray(file_stat)[order])
        self._f.flush()

    @staticmethod
    def _write_content(g: h5py.Group, rows: np.ndarray, content: np.ndarray | None,
                       file_stat: np.ndarray | None) -> None:
        """The content hashes and file stats of ascending rows (files made before them: skipped)."""
        if content is not None and "content" in g:
            _write_runs(g["content"], rows, np.asarray(content, dtype=f"S{CONTENT_CHARS}"))
        if file_stat is not None and "file_stat" in g:
            width = g["file_stat"].shape[1]  # 2 in files of the first version of this dataset (size, mtime)
            stats = np.asarray(file_stat, dtype=np.int64).reshape(len(rows), -1)[:, :width]
            if stats.shape[1] < width:  # copied from such a file: ctime/inode unknown (0), checked by hash once
                stats = np.pad(stats, ((0, 0), (0, width - stats.shape[1])))
            _write_runs(g["file_stat"], rows, np.ascontiguousarray(stats))

    def close(self) -> None:
        if self._f:
            self._f.flush()
            self._f.close()
            self._f = None  # type: ignore[assignment]

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_runs(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """values[i] -> ds[rows[i]] for ascending rows, one write per contiguous run."""
    values = np.ascontiguousarray(values)
    pos = 0
    for start, stop in contiguous_runs(rows):
        ds.write_direct(values, np.s_[pos:pos + stop - start], np.s_[start:stop])
        pos += stop - start


def _refuse_non_finite(source: np.ndarray, stored: np.ndarray, name: str, split: str) -> None:
    """Never mark a row done whose stored features are NaN or inf: say whether the model produced
    them or the storage dtype overflowed, and what to do."""
    finite_source = source[np.isfinite(source)]
    if np.isfinite(source).all() and stored.dtype == np.float16:
        largest = float(np.abs(finite_source).max())
        raise FeatureStoreError(
            f"{name} features of split {split!r} reach {largest:.6g}, beyond float16's largest value 65504: "
            f"stored as float16 they would be inf. Extract (or import) with --dtype float32.")
    raise FeatureStoreError(f"the model produced NaN or inf {name} features in split {split!r}; nothing was "
                            f"stored for this batch. Check the model and its inputs.")


def _refuse_float16_underflow(source: np.ndarray, name: str, split: str) -> None:
    """Never store as float16 a nonzero row whose values all sit below float16's smallest normal
    (6.1e-05): there they keep under 3 significant digits or round to 0 (1e-8 rows became all-zero
    rows, which k-NN then scored at chance)."""
    if not source.size:
        return
    largest = np.abs(source.reshape(len(source), -1)).max(axis=1)
    tiny = float(np.finfo(np.float16).tiny)
    small = np.flatnonzero((largest > 0) & (largest < tiny))
    if small.size:
        raise FeatureStoreError(
            f"{small.size} row(s) of {name} features in split {split!r} are nonzero but every value is below "
            f"float16's smallest normal {tiny:.2g} (largest {float(largest[small[0]]):.3g}): stored as float16 they "
            f"would lose their precision or become zero. Extract (or import) with --dtype float32.")


def _fit_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) <= ERROR_BYTES:
        return raw
    return raw[:ERROR_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def _same_paths_and_labels(g: "h5py.Group", spec: SplitSpec) -> bool:
    """Does a stored split hold exactly these paths and labels (so only its groups differ)?"""
    if g["paths"].shape[0] != len(spec.paths):
        return False
    stored = [p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else str(p) for p in g["paths"][()]]
    labels = g["labels"][()]
    return stored == list(spec.paths) and labels.shape == np.shape(spec.labels) and bool(
        np.array_equal(labels, np.asarray(spec.labels)))


def write_arrays(path: str | os.PathLike, splits: dict[str, dict[str, Any]], classes: Sequence[str],
                 config: dict[str, Any], overwrite: bool = False, dtype: str = "float32") -> FeatureStore:
    """Write features computed elsewhere (or in a test) as a complete featcache file.

    ``splits[name]`` holds ``cls`` (N, D), optional ``pooled`` (N, D) and ``tokens`` (N, T, D),
    ``labels`` (N,) or (N, C), optional ``paths`` and ``groups``. Every row is marked done.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; use another output path, or --overwrite to replace it.")
    if not splits:
        raise ValueError("no splits given: expected at least one split with 'cls' features.")
    first = next(iter(splits.values()))
    cls0 = np.asarray(first["cls"])
    if cls0.ndim != 2:
        raise ValueError(f"cls features must be 2-D (rows, dim); got shape {cls0.shape}.")
    tok0 = first.get("tokens")
    tokens = None
    if tok0 is not None:
        from featcache.tokens import TokenLayout

        t, d = np.asarray(tok0).shape[1:]
        tokens = TokenLayout(int(config.get("n_prefix", 1)), tuple(config["grid"]) if config.get("grid") else None,
                             int(d), int(t), str(config.get("token_mode", "none")))
    layout = FeatureLayout(dim=cls0.shape[1], tokens=tokens, dtype=dtype, has_pooled=first.get("pooled") is not None)
    specs: dict[str, SplitSpec] = {}
    for name, s in splits.items():
        cls = np.asarray(s["cls"])
        n = cls.shape[0]
        if cls.ndim != 2 or cls.shape[1] != layout.dim:
            raise ValueError(f"split {name!r}: cls must be (N, {layout.dim}); got {cls.shape}.")
        labels = np.asarray(s.get("labels", np.full(n, -1)))
        if labels.shape[0] != n:
            raise ValueError(f"split {name!r}: {labels.shape[0]} labels for {n} feature rows; "
                             f"expected one label per row.")
        given = s.get("paths")
        paths = [str(p) for p in given] if given is not None else [f"{name}/{i:08d}" for i in range(n)]
        if len(paths) != n:
            raise ValueError(f"split {name!r}: {len(paths)} paths for {n} feature rows.")
        for key in ("cls", "pooled", "tokens"):
            if s.get(key) is not None:
                check_finite(np.asarray(s[key]), f"split {name!r} {key}")
        pooled, toks = s.get("pooled"), s.get("tokens")
        if pooled is not None and np.shape(pooled) != (n, layout.dim):
            raise ValueError(f"split {name!r}: pooled must be ({n}, {layout.dim}), one row per cls row; got "
                             f"{np.shape(pooled)} (rows of another split or order would sit next to these).")
        for key, value, want in (("pooled", pooled, layout.has_pooled), ("tokens", toks, tokens is not None)):
            if (value is not None) != want:
                first_name = next(iter(splits))
                raise ValueError(f"split {name!r} {'has' if value is not None else 'has no'} {key}, but split "
                                 f"{first_name!r} {'has' if want else 'has none'}: give {key} for every split or "
                                 f"for none (a split without them would read as zeros).")
        if toks is not None and (np.ndim(toks) != 3 or np.shape(toks)[0] != n
                                 or tuple(np.shape(toks)[1:]) != (tokens.num_tokens, tokens.dim)):
            raise ValueError(f"split {name!r}: tokens must be ({n}, {tokens.num_tokens}, {tokens.dim}) (one row per "
                             f"cls row, the token layout of split {next(iter(splits))!r}); got {np.shape(toks)}.")
        if labels.ndim == 1:
            check_labels(labels, len(classes), f"split {name!r}")
        elif labels.shape[1] != len(classes):
            raise ValueError(f"split {name!r}: multi-label labels have {labels.shape[1]} columns but "
                             f"{len(classes)} label names were given ({', '.join(map(str, classes[:6]))}).")
        elif not np.isin(labels, (0, 1)).all():
            bad = ~np.isin(labels, (0, 1))
            raise ValueError(f"split {name!r}: multi-label labels must be 0 or 1; found {labels[bad][0].item()!r} "
                             f"({int(bad.sum())} cells). Threshold or fix them before importing.")
        else:
            labels = labels.astype(np.uint8)
        groups = s.get("groups")
        if groups is not None and len(groups) != n:
            raise ValueError(f"split {name!r}: {len(groups)} groups for {n} feature rows; expected one group "
                             f"(patient id) per row.")
        specs[name] = SplitSpec(paths=paths, labels=labels, groups=None if groups is None else [group_id(g) for g in groups])
    final, path = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # written aside, then renamed over: a refused write (float16 overflow) keeps the old file
        with StoreWriter(path, config, classes, specs, layout, overwrite=True) as w:
            for name, s in splits.items():
                rows = np.arange(len(specs[name].paths))
                for start in range(0, rows.size, 4096):
                    sl = slice(start, start + 4096)
                    w.write(name, rows[sl], np.asarray(s["cls"])[sl],
                            None if s.get("pooled") is None else np.asarray(s["pooled"])[sl],
                            None if s.get("tokens") is None else np.asarray(s["tokens"])[sl])
    except BaseException:
        # all or nothing (an import has no resume): a refused write (float16 overflow) must not
        # leave a file of undone rows that blocks the re-run its message asks for
        path.unlink(missing_ok=True)
        raise
    os.replace(path, final)
    return FeatureStore(final)


# ----------------------------------------------------------------------------------------------
# description (featcache info)
# ----------------------------------------------------------------------------------------------

def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `featcache info` shows about a file, as plain JSON-able values."""
    # asked before opening: HDF5 refuses a locking open of a file this process already holds open
    # without locking ("locking flag values don't match"), which reads as someone else's lock
    being_written = is_being_written(path) if Path(path).exists() else False
    with FeatureStore(path) as store:
        cfg = store.config
        d: dict[str, Any] = {
            "path": str(store.path),
            "size_mb": store.path.stat().st_size / 2**20,
            "encoding_version": ENCODING_VERSION,
            "model": cfg.get("model"),
            "revision": cfg.get("revision"),
            "family": cfg.get("family"),
            "dtype": str(store[store.splits[0]].cls.dtype) if store.splits else "n/a",
            "fingerprint": store.fingerprint,
            "config": cfg,
            "classes": store.classes,
            "multilabel": store.multilabel,
            "being_written": being_written,
            "leaked_groups": store.leaked_groups(),
            "splits": [],
        }
        layout = None
        for name in store.splits:
            s = store[name]
            done = s.done
            reasons = s.error_reasons
            labels = s.labels
            entry: dict[str, Any] = {
                "split": name, "done": int(done.sum()), "total": s.n, "errors": int((reasons != "").sum()),
                "cls": _shape(s.cls), "pooled": _shape(s.pooled), "tokens": _shape(s.tokens),
                "blocks": _shape(s._g.get("blocks_cls")),
                "error_list": s.errors, "warnings": [],
            }
            # what the evaluators will use: the rows with features (an unreadable row is not a positive)
            if labels.ndim == 2:
                counts = {c: int(labels[done, i].sum()) for i, c in enumerate(store.classes)}
                listed = {c: int(labels[:, i].sum()) for i, c in enumerate(store.classes)}
                entry["unlabelled"] = 0
            else:
                counts = {c: int((labels[done] == i).sum()) for i, c in enumerate(store.classes)}
                listed = {c: int((labels == i).sum()) for i, c in enumerate(store.classes)}
                entry["unlabelled"] = int((labels[done] < 0).sum())
            entry["class_counts"] = counts
            if listed != counts:  # rows not extracted (yet) or unreadable
                entry["class_counts_listed"] = listed
            groups = s.row_groups(np.flatnonzero(done))
            entry["groups"] = None if groups is None else len(set(groups))  # patients among the rows with features
            missing = [c for c, n in counts.items() if n == 0 and listed[c] == 0]
            pending = [f"{c} ({listed[c]} listed)" for c, n in counts.items() if n == 0 and listed[c] > 0]
            if s.n == 0 or (entry["done"] == 0 and entry["errors"] == s.n):
                entry["warnings"].append("no usable rows: k-NN, probes and heads refuse this split")
            labelled = bool(sum(listed.values())) if labels.ndim == 1 else True  # an inference split has none
            if missing and labelled:
                entry["warnings"].append(f"no rows of class {', '.join(missing)}")
            if pending and labelled:
                entry["warnings"].append(f"no rows with features of class {', '.join(pending)}: unreadable or not "
                                         f"extracted yet")
            if entry["done"] + entry["errors"] < s.n:
                left = s.n - entry["done"] - entry["errors"]
                entry["warnings"].append(f"{left} rows not extracted yet (being written by another process right now)"
                                         if d["being_written"] else
                                         f"{left} rows not extracted yet (run the same extract command again to "
                                         f"finish them)")
            if s.tokens is not None and layout is None:
                a = s.tokens.attrs
                grid = list(a.get("grid", []))
                mode = a.get("mode")
                shape = (f"{int(a.get('n_prefix', 0))} prefix, grid {'x'.join(map(str, grid)) if grid else 'n/a'}")
                if mode == "native":  # nothing resampled: the backbone ran at another input size
                    size = "x".join(map(str, cfg.get("input_size") or [])) or "n/a"
                    layout = (f"{s.tokens.shape[1]} tokens stored (mode native: the backbone run at {size} px, "
                              f"nothing resampled; {shape}; {int(a.get('source_num_tokens', 0))} tokens at its "
                              f"own size)")
                else:
                    mode = "the backbone's own count" if mode in (None, "none") else f"mode {mode}"
                    layout = (f"{s.tokens.shape[1]} tokens stored ({mode}, {shape}, source "
                              f"{int(a.get('source_num_tokens', 0))})")
            d["splits"].append(entry)
        if layout is None:
            grid = cfg.get("grid")
            if cfg.get("n_prefix") is None and not grid and cfg.get("source_num_tokens") is None:
                layout = "not stored"  # an import: no backbone layout is known
            elif cfg.get("token_mode") == "native" and grid:  # the backbone ran at another size: its own count
                size = "x".join(map(str, cfg.get("input_size") or [])) or "n/a"
                layout = (f"not stored (backbone run natively at {size} px: {cfg.get('n_prefix', 0)} prefix, grid "
                          f"{'x'.join(map(str, grid))}, {int(cfg.get('n_prefix') or 0) + grid[0] * grid[1]} tokens; "
                          f"{cfg.get('source_num_tokens', 'n/a')} tokens at its own size)")
            else:
                layout = (f"not stored (backbone: {cfg.get('n_prefix', 'n/a')} prefix, grid "
                          f"{'x'.join(map(str, grid)) if grid else 'n/a'}, {cfg.get('source_num_tokens', 'n/a')} tokens)")
        d["token_layout"] = layout
    return d


def _shape(ds: h5py.Dataset | None) -> str:
    if ds is None:
        return "-"
    return "x".join(str(n) for n in ds.shape) + f" {ds.dtype}"


# ----------------------------------------------------------------------------------------------
# shards (distributed extraction): rank r holds rows [lo, hi) of every split
# ----------------------------------------------------------------------------------------------

FEATURE_DATASETS = ("cls", "pooled", "tokens", "blocks_cls", "blocks_pooled")  # StoreWriter.write's arrays
FILE_STAT_WIDTH = 4  # size, mtime_ns, ctime_ns, inode (sources.RowContent.stat_key)
CONTENT_DATASETS = ("content", "file_stat")  # what a row was computed from (StoreWriter.write's content, file_stat)
ROW_DATASETS = FEATURE_DATASETS + CONTENT_DATASETS  # what moves with a row copied to another file
SHARDED = ROW_DATASETS + ("done", "errors")


def merge_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike, config: dict[str, Any],
                 classes: Sequence[str], splits: dict[str, SplitSpec], layout: FeatureLayout,
                 ranges: Sequence[dict[str, tuple[int, int]]], method: str = "copy",
                 overwrite: bool = False) -> Path:
    """Join per-rank shard files into one featcache file.

    ``ranges[r][split]`` is the [lo, hi) row range shard r holds. ``copy`` writes a standalone
    file (resumable like any other); ``virtual`` writes a small file of HDF5 virtual datasets that
    point at the shards, which must then stay beside it.
    """
    out = Path(out)
    if method == "copy":
        with StoreWriter(out, config, classes, splits, layout, overwrite=overwrite) as w:
            for shard, rng in zip(shards, ranges):
                with h5py.File(shard, "r", locking=READ_LOCKING) as src:
                    for name, (lo, hi) in rng.items():
                        if hi <= lo:
                            continue
                        g = src[name]
                        reasons = g["errors"][()]
                        failed = np.flatnonzero(reasons != b"")
                        if failed.size:
                            w.write_errors(name, failed + lo, [r.decode("utf-8", "replace") for r in reasons[failed]],
                                           **{k: read_rows(g[k], failed) if k in g else None
                                              for k in CONTENT_DATASETS})
                        done = np.flatnonzero(g["done"][()])
                        for start in range(0, done.size, 1024):
                            rows = done[start:start + 1024]
                            w.write(name, rows + lo, **{k: read_rows(g[k], rows) if k in g else None
                                                        for k in ROW_DATASETS})
        return out
    if method != "virtual":
        raise ValueError(f"--merge must be copy or virtual; got {method!r}.")
    tmp = out.with_name(out.name + ".creating")
    with h5py.File(tmp, "w") as f:
        write_header(f, config, classes)
        for name, spec in splits.items():
            n = len(spec.paths)
            g = write_split_rows(f, name, spec)
            with h5py.File(shards[0], "r", locking=READ_LOCKING) as first:
                templates = {k: first[name][k] for k in SHARDED if k in first[name]}
                for key, ds in templates.items():
                    vl = h5py.VirtualLayout(shape=(n,) + ds.shape[1:], dtype=ds.dtype)
                    for shard, rng in zip(shards, ranges):
                        lo, hi = rng[name]
                        if hi > lo:
                            vl[lo:hi] = h5py.VirtualSource(os.path.relpath(shard, out.parent), f"{name}/{key}",
                                                           shape=(hi - lo,) + ds.shape[1:], dtype=ds.dtype)
                    vds = g.create_virtual_dataset(key, vl, fillvalue=None)
                    for attr, value in ds.attrs.items():
                        vds.attrs[attr] = value
    os.replace(tmp, out)
    return out
