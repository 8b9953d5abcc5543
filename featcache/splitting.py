"""Grouped, stratified splits: no patient (group) ever sits in two splits.

Medical datasets hold several images per patient; a random row split puts the same patient in
train and test and inflates every metric. This module assigns whole groups to splits.

The algorithm is one greedy pass (the bin-packing heuristic StratifiedGroupKFold also uses):
each group has a label histogram; every split has a target histogram (its fraction of every
class); groups are visited largest first (random order among groups of similar size, set by
the seed) and each goes to the split where it most reduces the chi-square distance between the
current and the target histograms. Large groups placed first leave small ones to even out the
totals, so row fractions are honoured approximately and class proportions closely. Without
stratification the histogram has a single "rows" column, so only row counts are balanced.

Multi-label labels ((N, C) 0/1) are stratified on a one-column key per row: by default the
row's rarest positive label ("rarest"; rows with none get "(none)"), so rare findings are
spread over every split; ``multilabel="combination"`` uses the whole 0/1 pattern instead,
which is exact when combinations are few but scatters when they are many.

Everything here is plain numpy; ``holdout_split`` gives the index arrays of the trainer's
validation holdout. (The probe's grouped cross-validation is scikit-learn's StratifiedGroupKFold.)
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache.sources import (DEFAULT_GROUP_COLUMN, binary_cell, is_binary_column, label_name, read_manifest,
                               refuse_nearly_binary, warn_unlabelled_markers)
from featcache.store import row_keys

SPLIT_NAMES = ("train", "val", "test")
NO_LABEL = "(none)"   # key of a multi-label row with no positive label
UNLABELLED = "(unlabelled)"  # class of a manifest row with an empty label cell


# ------------------------------------------------------------------------------------------------
# the core: assign groups to bins with target fractions
# ------------------------------------------------------------------------------------------------

def stratify_key(labels: np.ndarray | Sequence, multilabel: str = "rarest") -> np.ndarray:
    """One string key per row to stratify on.

    1-D labels (class names or ints) are their own key. (N, C) 0/1 multi-label arrays give the
    rarest positive label of each row (``multilabel="rarest"``) or the whole 0/1 pattern
    (``"combination"``); see the module docstring for why rarest is the default.
    """
    arr = np.asarray(labels)
    if arr.ndim == 1:
        return np.array([str(v) for v in arr], dtype=object)
    if arr.ndim != 2:
        raise ValueError(f"labels must be 1-D (one class per row) or 2-D (N, C) 0/1 multi-label; "
                         f"got an array of shape {arr.shape}.")
    y = arr.astype(np.int64)
    if multilabel == "combination":
        return np.array(["".join(map(str, row)) for row in y], dtype=object)
    if multilabel != "rarest":
        raise ValueError(f"multilabel must be 'rarest' or 'combination', got {multilabel!r}.")
    freq = y.sum(axis=0).astype(float)
    # among a row's positive labels pick the one with the smallest dataset-wide count
    masked = np.where(y > 0, freq[None, :], np.inf)
    rarest = masked.argmin(axis=1)
    has_pos = y.sum(axis=1) > 0
    return np.array([str(r) if p else NO_LABEL for r, p in zip(rarest, has_pos)], dtype=object)


def _group_codes(groups: np.ndarray | Sequence | None, n: int) -> np.ndarray:
    """Integer group id per row; each row is its own group when groups is None."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(row_keys(groups), dtype=object)  # a row without an id: a group of its own
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries but labels has {n}; give one group per row.")
    _, codes = np.unique(g, return_inverse=True)
    return codes.ravel()


def assign_groups(keys: np.ndarray, groups: np.ndarray | Sequence | None,
                  fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Bin index (0..len(fractions)-1) per row such that every group lies in one bin.

    keys: one stratification key per row (use a constant key to balance rows only).
    fractions: target fraction of rows per bin (sum 1; a bin with fraction 0 gets nothing).
    Bins with a positive fraction each get at least one group.
    """
    keys = np.asarray(keys, dtype=object)
    n = len(keys)
    frac = np.asarray(fractions, dtype=float)
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    active = np.flatnonzero(frac > 0)
    if n_groups < len(active):
        raise ValueError(f"{n_groups} groups cannot fill {len(active)} splits: every split needs "
                         f"at least one whole group. Use fewer splits (--val 0 or --test 0 on the command "
                         f"line; val=0 / test=0 in Python) or more groups.")
    _, key_codes = np.unique(keys, return_inverse=True)
    key_codes = key_codes.ravel()
    n_keys = int(key_codes.max()) + 1
    hist = np.zeros((n_groups, n_keys))
    np.add.at(hist, (codes, key_codes), 1.0)
    sizes = hist.sum(axis=1)

    # largest groups first; groups within a factor of two in size are shuffled by the seed
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n_groups), -np.floor(np.log2(sizes))))

    target = frac[:, None] * hist.sum(axis=0)[None, :]            # (bins, keys)
    current = np.zeros_like(target)
    safe_t = np.where(target > 0, target, 1.0)
    bin_of_group = np.full(n_groups, -1)
    for g in order:
        h = hist[g][None, :]
        # increase of sum (current - target)^2 / target when adding h to each bin
        delta = (h * (2.0 * (current - target) + h) / safe_t).sum(axis=1)
        delta[frac <= 0] = np.inf
        b = int(np.argmin(delta))
        bin_of_group[g] = b
        current[b] += hist[g]

    # a split with a positive fraction that got no group takes the smallest group of the
    # bin with the most groups (happens only with very few, very large groups)
    for b in active:
        if not np.any(bin_of_group == b):
            counts = np.bincount(bin_of_group, minlength=len(frac))
            donor = int(np.argmax(counts))
            members = np.flatnonzero(bin_of_group == donor)
            bin_of_group[members[np.argmin(sizes[members])]] = b
    return bin_of_group[codes]


# ------------------------------------------------------------------------------------------------
# public helpers
# ------------------------------------------------------------------------------------------------

def _check_fractions(val: float, test: float) -> None:
    for name, f in (("val", val), ("test", test)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"--{name} must be a fraction of rows in [0, 1); got {f}.")
    if val + test >= 1.0:
        raise ValueError(f"val + test must leave rows for training (sum < 1); got "
                         f"{val} + {test} = {val + test:g}. Lower --val or --test.")


def grouped_split(labels: np.ndarray | Sequence, groups: np.ndarray | Sequence | None,
                  val: float = 0.1, test: float = 0.2, stratify: bool = True, seed: int = 0,
                  multilabel: str = "rarest") -> np.ndarray:
    """Split name ("train" | "val" | "test") per row; no group is in two splits.

    labels: (N,) class names/ids, or (N, C) 0/1 multi-label (stratified by ``multilabel``).
    groups: (N,) patient/study ids, or None to split rows.
    val, test: fractions of rows (approximate: whole groups move); train gets the rest.
    stratify: keep class proportions in every split; False balances row counts only.
    seed: the same inputs and seed give the same split.
    """
    _check_fractions(val, test)
    keys = stratify_key(labels, multilabel) if stratify else np.zeros(len(np.asarray(labels)), dtype=object)
    bins = assign_groups(keys, groups, (1.0 - val - test, val, test), seed)
    return np.asarray(SPLIT_NAMES, dtype=object)[bins]


def holdout_split(labels: np.ndarray | Sequence, groups: np.ndarray | Sequence | None,
                  fraction: float, seed: int = 0, stratify: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(keep_index, holdout_index): a stratified holdout of about ``fraction`` of the rows,
    whole groups only (e.g. the trainer's validation split carved out of train)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1); got {fraction}.")
    split = grouped_split(labels, groups, val=fraction, test=0.0, stratify=stratify, seed=seed)
    return np.flatnonzero(split == "train"), np.flatnonzero(split == "val")


# ------------------------------------------------------------------------------------------------
# summaries and CSV manifests
# ------------------------------------------------------------------------------------------------

@dataclass
class SplitSummary:
    """Counts per split, for the table the CLI prints."""

    rows: list[dict]             # one dict per split: split, rows, fraction, groups, counts {class: n}
    classes: list[str]           # class (or multi-label column) names, column order of rows
    missing: dict[str, list[str]]  # split -> classes with no row (positive) in it
    leaked_groups: list[str]     # groups found in more than one split (empty when correct)
    group: str | None = None     # the column the rows were grouped by (None: row by row)


def summarize_split(labels: np.ndarray | Sequence, groups: np.ndarray | Sequence | None,
                    split: np.ndarray | Sequence, class_names: Sequence[str] | None = None
                    ) -> SplitSummary:
    """Rows, groups and class counts per split (multi-label: positives per label column)."""
    split = np.asarray(split, dtype=object)
    arr = np.asarray(labels)
    g = np.asarray(row_keys(groups), dtype=object) if groups is not None else None
    if arr.ndim == 2:
        classes = list(class_names) if class_names is not None else [str(i) for i in range(arr.shape[1])]
    else:
        arr = np.asarray([str(v) for v in arr], dtype=object)
        classes = sorted(set(arr.tolist()))
    names = [s for s in SPLIT_NAMES if s in set(split.tolist())]
    names += sorted(set(split.tolist()) - set(names))
    rows, missing = [], {}
    for s in names:
        m = split == s
        row = {"split": s, "rows": int(m.sum()), "fraction": float(m.mean()) if len(m) else 0.0,
               "groups": int(len(set(g[m].tolist()))) if g is not None else int(m.sum())}
        if arr.ndim == 2:
            counts = arr[m].astype(np.int64).sum(axis=0)
            row["counts"] = {c: int(k) for c, k in zip(classes, counts)}
        else:
            row["counts"] = {c: int(np.sum(arr[m] == c)) for c in classes}
        rows.append(row)
        lacking = [c for c in classes if row["counts"][c] == 0]
        if lacking:
            missing[s] = lacking
    leaked: list[str] = []
    if g is not None:
        seen: dict[str, set] = {}
        for gi, si in zip(g, split):
            seen.setdefault(gi, set()).add(si)
        leaked = sorted(k for k, v in seen.items() if len(v) > 1)
    return SplitSummary(rows, classes, missing, leaked)


def manifest_labels(columns: list[str], rows: list[dict[str, str]], label: str | None = "label",
                    exclude: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """Labels of a manifest and the label column names.

    ``label`` names one column (class names or ids) or several comma-separated 0/1 columns
    (multi-label). When it is None or "label" is absent, every other column holding only 0/1
    values is taken as a multi-label column. Empty label cells (and "-1", as extract reads them)
    count as one more class, "(unlabelled)", so unlabelled rows are spread over the splits too.
    """
    wanted = [c.strip() for c in label.split(",") if c.strip()] if label else []
    if len(wanted) == 1 and wanted[0] in columns:
        warn_unlabelled_markers([r.get(wanted[0]) for r in rows], f"the manifest's column {wanted[0]!r}")
        values = [label_name(r.get(wanted[0])) or UNLABELLED for r in rows]
        return np.asarray(values, dtype=object), wanted
    if len(wanted) > 1:
        absent = [c for c in wanted if c not in columns]
        if absent:
            raise ValueError(f"label columns {absent} are not in the manifest; its columns are "
                             f"{', '.join(columns)}.")
        bad = [c for c in wanted if not is_binary_column(rows, c)]
        if bad:
            raise ValueError(f"multi-label columns must hold 0 or 1 in every row; {bad} do not.")
        return np.asarray([[binary_cell(r[c], "the manifest", c) for c in wanted] for r in rows], dtype=np.uint8), wanted
    candidates = [c for c in columns if c not in ("path", "split", *exclude)]
    auto = [c for c in candidates if is_binary_column(rows, c)]
    refuse_nearly_binary(Path("the manifest"), rows, [c for c in candidates if c not in auto])
    if len(auto) >= 2:
        return np.asarray([[binary_cell(r[c], "the manifest", c) for c in auto] for r in rows], dtype=np.uint8), auto
    raise ValueError(f"label column {label!r} is not in the manifest; its columns are "
                     f"{', '.join(columns)}. Pass --label COLUMN, or --label A,B,C for 0/1 "
                     f"multi-label columns.")


def write_manifest(path: str | Path, columns: list[str], rows: list[dict[str, str]],
                   split: np.ndarray | Sequence, group: str | None = None) -> Path:
    """Write rows back with a ``split`` column (replacing one that was there). When the split was
    grouped by a column other than "group", a "group" column copies it, so `featcache extract`
    keeps the patients of this very file without being told which column holds them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy_group = group is not None and group != DEFAULT_GROUP_COLUMN and DEFAULT_GROUP_COLUMN not in columns
    out_cols = [c for c in columns if c != "split"] + ([DEFAULT_GROUP_COLUMN] if copy_group else []) + ["split"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=out_cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r, s in zip(rows, split):
            extra = {DEFAULT_GROUP_COLUMN: r[group]} if copy_group else {}
            writer.writerow({**r, **extra, "split": s})
    return path


def split_manifest(manifest: str | Path, out: str | Path, group: str | None = None,
                   label: str | None = "label", val: float = 0.1, test: float = 0.2,
                   stratify: bool = True, seed: int = 0, multilabel: str = "rarest"
                   ) -> SplitSummary:
    """Read a CSV manifest, assign grouped splits, write it to ``out`` with a split column.

    `group` None takes a column named "group" when the manifest has one (as `featcache extract`
    does: splitting those rows one by one would put a patient in several splits); "none" splits
    row by row."""
    columns, rows = read_manifest(manifest)
    groups = None
    if group is None and DEFAULT_GROUP_COLUMN in columns:
        group = DEFAULT_GROUP_COLUMN
    if group is not None and group.lower() == "none":
        group = None
    if group is not None:
        if group not in columns:
            raise ValueError(f"group column {group!r} is not in {manifest}; its columns are "
                             f"{', '.join(columns)}. Pass --group with one of them.")
        empty = sum(1 for r in rows if not (r.get(group) or "").strip())
        if empty:
            raise ValueError(f"{empty} rows of {manifest} have an empty {group!r}; every row needs "
                             f"a group (give a unique id to rows of unknown patient).")
        groups = np.asarray([r[group].strip() for r in rows], dtype=object)
        other = next((r for r in rows if DEFAULT_GROUP_COLUMN in r and group != DEFAULT_GROUP_COLUMN
                      and (r.get(DEFAULT_GROUP_COLUMN) or "").strip() != r[group].strip()), None)
        if other is not None:
            raise ValueError(f"{manifest} already has a {DEFAULT_GROUP_COLUMN!r} column (e.g. "
                             f"{other[DEFAULT_GROUP_COLUMN]!r} where {group} is {other[group]!r}), which "
                             f"`featcache extract` reads as the groups: the file would be split by {group} but "
                             f"bootstrap and held-out validation would group by {DEFAULT_GROUP_COLUMN}. Rename that "
                             f"column, or split by it (--group {DEFAULT_GROUP_COLUMN}).")
    labels, label_cols = manifest_labels(columns, rows, label, exclude=[group] if group else [])
    split = grouped_split(labels, groups, val=val, test=test, stratify=stratify, seed=seed,
                          multilabel=multilabel)
    write_manifest(out, columns, rows, split, group=group)
    names = label_cols if labels.ndim == 2 else None
    summary = summarize_split(labels, groups, split, class_names=names)
    summary.group = group
    return summary
