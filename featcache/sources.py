"""Data sources and decoding: image folders, CSV manifests, DICOM, Hugging Face datasets
directories (featcache.hf_source), with clear per-file errors.

A source lists the rows of every split before anything is computed (sorted by path, so row
order is deterministic and resumable); ``load_image`` turns one file into an 8-bit RGB PIL
image or raises ``ImageDecodeError`` with a short reason the extractor records and skips.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    from PIL import Image

import numpy as np

from featcache.names import CONTENT_CHARS, HDF5_SIGNATURE, UNLABELLED_NAMES

log = logging.getLogger("featcache")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".dcm", ".dicom")
# folder names read as splits in root/<split>/<class>/x
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing", "holdout", "unlabelled", "unlabeled")
SINGLE_SPLIT = "all"  # split name of a root/<class>/x folder
DEFAULT_GROUP_COLUMN = "group"  # manifest column read as the group (patient) when --group-column is not given
DEFAULT_LABEL_COLUMN = "label"  # manifest column read as the class when --label-column is not given


@dataclass
class SplitRows:
    """The rows of one split."""

    paths: list[str]            # relative to the data root (or as given in the manifest), sorted, posix
    files: list[Path]           # absolute paths to read (hf_source: row references, see make_ref)
    labels: np.ndarray          # (N,) int64 with -1 = unlabelled, or (N, C) uint8 for multi-label
    groups: list[str] | None    # group/patient id per row when the manifest has a group column


@dataclass
class DataSource:
    """Every split of a dataset, with class names shared across splits."""

    root: Path                  # folder that paths are relative to
    classes: list[str]          # label i means classes[i]
    splits: dict[str, SplitRows]
    multilabel: bool            # labels are (N, C) 0/1
    kind: str                   # "folder" | "csv" | "hf"


class ImageDecodeError(Exception):
    """One input could not be turned into an image; str(exc) is the reason."""


RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's resolution


UNREADABLE = "-"  # the content of a row whose input could not be read at all (retried once it can be)


@dataclass(frozen=True)
class RowContent:
    """What a row's stored features were computed from: a hash of the input's bytes, and the
    file's stat (size, mtime, ctime, inode), the cheap first check when a file is resumed. As in
    git's index, ctime and inode catch a file replaced by another with the same size and a
    restored mtime (cp -p, rsync -t, tar -x, a symlink pointed elsewhere): utime cannot set ctime."""

    digest: str                 # first CONTENT_CHARS hex digits of the sha256 of the encoded bytes
    size: int                   # bytes
    mtime_ns: int               # the file's st_mtime_ns; 0 where the stat cannot be trusted: no file of its
                                # own (datasets), or changed within RACY_NS of being read (git's "racy" rule)
    ctime_ns: int = 0           # st_ctime_ns (status change: any write, rename, chmod)
    inode: int = 0              # st_ino

    def stat_key(self) -> tuple[int, int, int, int]:
        """The file_stat row recorded for it."""
        return self.size, self.mtime_ns, self.ctime_ns, self.inode


def row_content(path: Path) -> RowContent:
    """Hash one input (a file, or a datasets row reference from hf_source) as the extractor reads
    it, or raise ImageDecodeError when it cannot be read."""
    if str(path).startswith("hf:"):
        from featcache.hf_source import parse_ref, ref_content  # (hf_source imports this module)

        ref = parse_ref(path)
        if ref is not None:
            return ref_content(ref)
    try:
        stat = os.stat(path)  # before reading: a file changed meanwhile shows a newer mtime next time
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    return _file_content(stat, digest)


def read_input(path: Path) -> tuple[bytes, RowContent]:
    """One input's encoded bytes and their content, in one read (the decoding worker hashes the
    very bytes it decodes); raises ImageDecodeError when it cannot be read. Files only: a datasets
    row (hf_source) is hashed by row_content and decoded by load_image."""
    try:
        stat = os.stat(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    return data, _file_content(stat, hashlib.sha256(data).hexdigest())


def _file_content(stat: os.stat_result, digest: str) -> RowContent:
    trusted = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS
    return RowContent(digest[:CONTENT_CHARS], stat.st_size, stat.st_mtime_ns if trusted else 0, stat.st_ctime_ns,
                      stat.st_ino)


def bytes_content(data: bytes) -> RowContent:
    """The content of encoded bytes that are not a file of their own (no mtime to compare)."""
    return RowContent(hashlib.sha256(data).hexdigest()[:CONTENT_CHARS], len(data), 0)


def file_stat(path: Path) -> tuple[int, int, int, int] | None:
    """(size, mtime_ns, ctime_ns, inode) of an input file (symlinks followed), or None when it has
    none (datasets rows) or is gone."""
    if str(path).startswith("hf:"):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode inputs; part of the extraction config."""

    window: tuple[float, float] | None = None   # DICOM window centre, width override (--window C,W)
    frame: int | None = None                    # DICOM frame for multi-frame files (--frame N)
    max_pixels: int = 178_956_970               # decompression-bomb limit (PIL's error threshold); the only one applied
    draft: int | None = None                    # JPEG only: decode at the smallest 1/2, 1/4 or 1/8 scale that keeps
                                                # both sides >= this many px (PIL's draft mode; --fast-decode)


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------

def discover(data: str | Path, *, split: str | None = None, label_columns: Sequence[str] | None = None,
             path_column: str = "path", label_column: str | None = None, split_column: str = "split",
             group_column: str | None = None, extensions: Sequence[str] | None = None,
             image_column: str | None = None) -> DataSource:
    """List the rows of an image folder, a CSV manifest, or a Hugging Face datasets directory.

    Folders: root/<class>/x is one split named "all"; root/<split>/<class>/x (top-level folders
    named like train/val/test) gives several; images directly in root or in a split folder are
    unlabelled (-1). A directory written by Dataset/DatasetDict.save_to_disk is read by
    featcache.hf_source (its splits, its ClassLabel names; `image_column`/`label_column` pick the
    columns when they are not obvious). `label_column` defaults to "label" for CSV manifests.
    CSV manifests: `group_column` names the column holding each row's group (patient); None takes
    a column named "group" when there is one. `split` keeps only that split.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist: expected an image folder, a CSV manifest or a "
                                f"datasets save_to_disk directory.")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in (extensions or IMAGE_EXTENSIONS))
    from featcache import hf_source  # imports this module: loaded here, when a source is listed

    if image_column is not None and not hf_source.is_hf_dataset_dir(data):
        raise ValueError(f"--image-column applies to a Hugging Face datasets directory (save_to_disk), "
                         f"but {data} is not one (no dataset_dict.json, or dataset_info.json + state.json).")
    if data.is_file():
        if data.suffix.lower() not in (".csv", ".tsv"):
            raise ValueError(f"{data} is a file but not a CSV manifest; pass a folder of images or a "
                             f".csv with columns path,label[,split][,group].")
        source = _from_csv(data, label_columns, path_column, label_column or DEFAULT_LABEL_COLUMN, split_column, group_column)
    elif hf_source.is_hf_dataset_dir(data):
        if label_columns:
            raise ValueError(f"--label-columns (multi-label 0/1 columns) reads a CSV manifest; {data} is a datasets "
                             f"directory: drop it, or write a manifest with one 0/1 column per finding.")
        source = hf_source.from_hf_dir(data, image_column=image_column, label_column=label_column,
                                       group_column=group_column)
    else:
        given = [f"--{name}" for name, value in (("label-columns", label_columns), ("label-column", label_column),
                                                 ("group-column", group_column)) if value]
        if given:  # a folder's labels are its class folders; nothing would read these columns
            raise ValueError(f"{', '.join(given)} read{'s' if len(given) == 1 else ''} columns of a CSV manifest or a "
                             f"datasets directory, but {data} is an image folder (labels come from its class "
                             f"folders, and it has no patient ids): drop {'it' if len(given) == 1 else 'them'}, or "
                             f"pass a manifest (path,label[,split][,group]).")
        source = _from_folder(data, exts)
    if split is not None:
        if split not in source.splits:
            raise ValueError(f"split {split!r} not found in {data}; it has {', '.join(source.splits)}.")
        source.splits = {split: source.splits[split]}
    return source


def _images_in(folder: Path, exts: tuple[str, ...], recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def _from_folder(root: Path, exts: tuple[str, ...]) -> DataSource:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    layout = {d.name: d for d in split_dirs} if split_dirs else {SINGLE_SPLIT: root}
    if split_dirs:
        _warn_unread(root, [d for d in subdirs if d not in split_dirs], exts)
    raw: dict[str, list[tuple[Path, str | None]]] = {}
    empty: list[tuple[Path, str]] = []   # class folders without a single image (folder, class)
    for name, folder in layout.items():
        rows: list[tuple[Path, str | None]] = [(f, None) for f in _images_in(folder, exts, recursive=False)]
        for cdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder is root and cdir in split_dirs:
                continue
            images = _images_in(cdir, exts, recursive=True)
            rows.extend((f, cdir.name) for f in images)
            if not images:
                empty.append((cdir, cdir.name))
        raw[name] = rows
    if not any(raw.values()):
        raise ValueError(f"no images found in {root} (looked for {', '.join(exts)} in root/<class>/ and "
                         f"root/<split>/<class>/).")
    classes = sorted({c for rows in raw.values() for _, c in rows if c is not None})
    if empty:
        gone = sorted({c for _, c in empty} - set(classes))
        log.warning("class folder(s) without images (looked for %s): %s%s", ", ".join(exts),
                    ", ".join(d.relative_to(root).as_posix() + "/" for d, _ in empty),
                    f"; class(es) {', '.join(gone)} have no image in any split, so they are not among the "
                    f"{len(classes)} classes" if gone else "")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, rows in raw.items():
        rows = sorted(rows, key=lambda r: r[0].relative_to(root).as_posix())
        splits[name] = SplitRows(
            paths=[f.relative_to(root).as_posix() for f, _ in rows],
            files=[f.resolve() for f, _ in rows],
            labels=np.array([index[c] if c is not None else -1 for _, c in rows], dtype=np.int64),
            groups=None)
    return DataSource(root.resolve(), classes, splits, multilabel=False, kind="folder")


def _warn_unread(root: Path, others: list[Path], exts: tuple[str, ...]) -> None:
    """In a root/<split>/<class>/ layout only split folders are read: say which images beside
    them are left out (a class folder put at the top level by mistake loses its images silently)."""
    left = [(d.name + "/", len(_images_in(d, exts, recursive=True))) for d in others]
    left = [(name, n) for name, n in left if n]
    loose = len(_images_in(root, exts, recursive=False))
    if loose:
        left.append(("directly in the folder", loose))
    if left:
        log.warning("%s is read as root/<split>/<class>/ (split folders: %s), so these images are not read: %s. "
                    "Move them into a split folder, or name the split folders %s.", root,
                    ", ".join(sorted({d.name for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES})),
                    ", ".join(f"{name} ({n} image{'s' if n != 1 else ''})" for name, n in left),
                    "/".join(SPLIT_NAMES[:7]))


def read_manifest(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV (or .tsv) manifest, every value a string: the one manifest reader of
    `featcache extract` and `featcache split`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; give a CSV with a header row such as "
                                f"path,label,patient_id.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
            reader = csv.DictReader(fh, dialect=dialect)
            columns = list(reader.fieldnames or [])
            rows = [dict(r) for r in reader]
    except UnicodeDecodeError:   # a feature file, an image, a spreadsheet given as the manifest
        with path.open("rb") as fh:
            head = fh.read(8)
        what = ("an HDF5 file (a feature file?)" if head == HDF5_SIGNATURE else
                "an Excel workbook" if head.startswith(b"PK") or head.startswith(b"\xd0\xcf\x11\xe0") else
                "not UTF-8 text")
        raise ValueError(f"manifest {path} is {what}, not a CSV; give a CSV (UTF-8) with a header row such as "
                         f"path,label,patient_id (a spreadsheet: save it as CSV).") from None
    if not columns:
        raise ValueError(f"manifest {path} is empty; expected a header row such as path,label,patient_id.")
    if not rows:
        raise ValueError(f"manifest {path} has a header but no rows.")
    return columns, rows


def is_binary_column(rows: list[dict[str, str]], column: str) -> bool:
    """True when every row holds 0 or 1 in `column` (a multi-label finding column)."""
    return all(_is_binary(r.get(column) or "") for r in rows)


def _from_csv(path: Path, label_columns: Sequence[str] | None, path_column: str, label_column: str,
              split_column: str, group_column: str | None) -> DataSource:
    columns, records = read_manifest(path)
    if path_column not in columns:
        raise ValueError(f"{path} has no {path_column!r} column; its columns are: {', '.join(columns) or 'none'}. "
                         f"Expected path,label[,split][,group].")
    if group_column is not None and group_column not in columns:
        raise ValueError(f"{path} has no group column {group_column!r}; its columns are: {', '.join(columns)}. "
                         f"Pass --group-column with one of them.")
    group_column = group_column or DEFAULT_GROUP_COLUMN
    root = path.parent.resolve()
    reserved = {path_column, split_column, group_column}
    if label_columns is None and label_column not in columns and label_column != DEFAULT_LABEL_COLUMN:
        raise ValueError(f"{path} has no column {label_column!r} (--label-column); its columns are: "
                         f"{', '.join(columns)}.")
    if label_columns is None and label_column not in columns:
        candidates = [c for c in columns if c not in reserved]
        binary = [c for c in candidates if is_binary_column(records, c)]
        refuse_nearly_binary(path, records, [c for c in candidates if c not in binary])
        if len(binary) >= 2 or (binary and binary == candidates):
            label_columns = binary  # a multi-label manifest: one 0/1 column per finding (others, e.g. patient_id, kept out)
            left_out = [c for c in candidates if c not in binary]
            if left_out:
                log.warning("%s: multi-label findings %s (0/1 columns); left out, not all 0/1: %s. Name the "
                            "findings with --label-columns if that is wrong.", path.name, ", ".join(binary),
                            ", ".join(left_out))
        elif candidates:
            raise ValueError(f"{path} has no {label_column!r} column and no 0/1 finding columns; its columns are "
                             f"{', '.join(columns)}. Pass --label-column NAME for the column holding the class, or "
                             f"--label-columns A,B for 0/1 multi-label columns. (A manifest of unlabelled images "
                             f"has only {path_column} and optionally split and group columns.)")
    multilabel = label_columns is not None
    if multilabel:
        missing = [c for c in label_columns if c not in columns]
        if missing:
            raise ValueError(f"{path} has no label column(s) {', '.join(missing)}; columns: {', '.join(columns)}.")
        classes = list(label_columns)
    else:
        cells = [r.get(label_column, "") for r in records]
        warn_unlabelled_markers(cells, f"{path.name} column {label_column!r}")
        classes = sorted({c for c in map(label_name, cells) if c is not None})
    index = {c: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    for line, r in enumerate(records, start=2):
        key = os.path.normpath(str(root / r[path_column].strip()))
        if key in seen:  # one image twice: conflicting labels, or the same image in train and test
            raise ValueError(f"{path} lists {r[path_column].strip()!r} twice (lines {seen[key]} and {line}); each "
                             f"image may appear once (a second row would label it twice or put it in two splits).")
        seen[key] = line
    by_split: dict[str, list[dict[str, str]]] = {}
    for r in records:
        by_split.setdefault((r.get(split_column) or SINGLE_SPLIT).strip() or SINGLE_SPLIT, []).append(r)
    splits = {}
    for name in sorted(by_split):
        rows = sorted(by_split[name], key=lambda r: r[path_column].strip())
        rel = [r[path_column].strip() for r in rows]
        files = [(p if p.is_absolute() else root / p) for p in map(Path, rel)]
        if multilabel:
            labels = np.array([[binary_cell(r.get(c, ""), path, c) for c in label_columns] for r in rows], dtype=np.uint8)
        else:
            labels = np.array([index.get(label_name(r.get(label_column, "")), -1) for r in rows], dtype=np.int64)
        groups = [r.get(group_column, "").strip() for r in rows] if group_column in columns else None
        if groups is not None and "" in groups:
            log.warning("%s: %d row(s) of split %s have no %r: each is taken as a patient of its own (resampled, "
                        "held out and cross-validated alone); give them ids if several belong to one patient.",
                        path.name, groups.count(""), name, group_column)
        splits[name] = SplitRows(paths=rel, files=files, labels=labels.reshape(len(rows), -1) if multilabel else labels,
                                 groups=groups)
    return DataSource(root, classes, splits, multilabel=multilabel, kind="csv")


def label_name(value: Any) -> str | None:
    """A label read as text (a manifest cell, a string column) as its class name, or None for a
    row it marks unlabelled: empty, or one of names.UNLABELLED_NAMES ("-1" is unlabelled as the
    index -1 is, so one dataset reads alike as a manifest, a Hugging Face dataset or an import)."""
    name = "" if value is None else str(value).strip()
    return None if name in UNLABELLED_NAMES else name


def warn_unlabelled_markers(values: Sequence[Any], where: str) -> None:
    """Say how many rows a non-empty marker ("-1", "nan") leaves unlabelled: a dataset that means
    "-1" as a class finds out here rather than from a missing class."""
    marked = [str(v).strip() for v in values if v is not None and str(v).strip() and label_name(v) is None]
    if marked:
        log.warning("%s: %d row(s) labelled %s are read as unlabelled (as -1 is everywhere in featcache); rename "
                    "the class if it is one.", where, len(marked), " / ".join(repr(m) for m in dict.fromkeys(marked)))


NEARLY_BINARY_BAD = 0.1  # a column 0/1 but for at most this share of cells (or one) is a finding with typos


def refuse_nearly_binary(path: Path, records: list[dict[str, str]], columns: Sequence[str]) -> None:
    """Refuse a column that is 0/1 in almost every row: auto-detection would silently leave a
    finding with a typo (a 2, an empty cell) out of the labels, as if it were patient_id."""
    for column in columns:
        cells = [(r.get(column) or "").strip() for r in records]
        filled = [v for v in cells if v]
        binary = sum(_is_binary(v) for v in filled)
        bad = len(filled) - binary
        if binary >= 2 and len(filled) >= len(cells) / 2 and bad <= max(1, NEARLY_BINARY_BAD * len(filled)):
            line, value = next((i, v) for i, v in enumerate(cells, start=2) if not _is_binary(v))
            raise ValueError(f"{path} column {column!r} holds 0/1 in {binary} of {len(cells)} rows, but line {line} "
                             f"holds {value!r}: fix the cell if it is a finding, or name the findings with "
                             f"--label-columns A,B (or the class column with --label-column) if it is not.")


def _is_binary(value: str) -> bool:
    return value.strip() in ("0", "1", "0.0", "1.0")


def binary_cell(value: str, path: str | Path, column: str) -> int:
    """A multi-label manifest cell ("0", "1", "1.0") as 0 or 1, or an error naming the column."""
    v = value.strip()
    if not _is_binary(v):
        raise ValueError(f"{path}: multi-label column {column!r} must hold 0 or 1; found {value!r}.")
    return int(float(v))


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------

def load_image(path: Path, options: DecodeOptions = DecodeOptions(), data: bytes | None = None) -> "Image.Image":
    """Decode one file (or a datasets row reference from hf_source) into an 8-bit RGB image, or
    raise ImageDecodeError with the reason. `data`: the input's bytes already read (read_input),
    decoded exactly as the file would be."""
    if data is not None and not str(path).startswith("hf:"):
        path = Path(path)
        if not data:
            raise ImageDecodeError("empty file (0 bytes)")
        if path.suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM":
            import io

            return load_dicom(io.BytesIO(data), options, name=path.name)
        return decode_image_bytes(data, options)
    if str(path).startswith("hf:"):
        from featcache.hf_source import load_ref_image, parse_ref  # (hf_source imports this module)

        ref = parse_ref(path)
        if ref is not None:
            return load_ref_image(ref, options)
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if path.suffix.lower() in (".dcm", ".dicom") or _has_dicm_magic(path):
        return load_dicom(path, options)
    return _decode_pil(path, options)


def decode_image_bytes(data: bytes, options: DecodeOptions = DecodeOptions()) -> "Image.Image":
    """Decode encoded image bytes (PNG, JPEG, ...) exactly as load_image decodes a file."""
    import io

    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    if data[128:132] == b"DICM":
        raise ImageDecodeError("DICOM bytes inside a dataset are not supported; save the DICOM files to a "
                               "folder or CSV manifest instead")
    return _decode_pil(io.BytesIO(data), options)


def check_pixel_count(width: int, height: int, options: DecodeOptions) -> None:
    """The one decompression-bomb rule (PIL images and DICOM frames alike): at most max_pixels."""
    if width * height > options.max_pixels:
        raise ImageDecodeError(f"decompression bomb: {width}x{height} px exceeds the limit of "
                               f"{options.max_pixels} px")


def _decode_pil(source: "Path | object", options: DecodeOptions) -> "Image.Image":
    """PIL decode of a path or file object with the decompression-bomb limit, then to_rgb."""
    from PIL import Image

    try:
        with warnings.catch_warnings(), _pil_pixel_limit(None):
            # featcache's own limit (options.max_pixels) is the only one that applies: PIL's
            # MAX_IMAGE_PIXELS is lifted while opening so the documented number is the real one
            with Image.open(source) as img:
                w, h = img.size
                check_pixel_count(w, h, options)
                if options.draft and img.format in ("JPEG", "MPO"):  # MPO: multi-picture camera JPEGs
                    # DCT-domain downscaling inside libjpeg: both sides stay >= options.draft, so the
                    # processor's resize still only shrinks (square request: EXIF rotation cannot matter)
                    img.draft(img.mode, (options.draft, options.draft))
                img.load()
                return to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        if "truncated" in text.lower() or "premature" in text.lower() or "broken" in text.lower():
            raise ImageDecodeError(f"truncated or corrupt image: {text}") from None
        raise ImageDecodeError(f"cannot decode image: {text}") from None


@contextlib.contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """Temporarily set PIL's decompression-bomb limit (None lifts it)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _has_dicm_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


SIXTEEN_BIT_AS_I = ("PNG", "PPM")  # Pillow formats whose mode-I images hold 16-bit values (PGM is "PPM")
# the version of featcache's decoding rules, recorded in each file (provenance, not fingerprint): a
# resume or --update of a file made under older rules warns, since some inputs decode differently now;
# DECODE_RULES_CHANGES says, per version (2 and 3: 2026-12-01; 4: 2026-12-02), which inputs
DECODE_RULES = 4
DECODE_RULES_CHANGES = {2: "PNGs with a transparency key colour, 16-bit PGM/PPM images, 32-bit integer TIFFs, "
                           "float images with NaN pixels, "
                           "DICOM with a SIGMOID or LINEAR_EXACT VOI function, multi-picture (MPO) JPEGs under "
                           "--fast-decode, and float16/bfloat16 checkpoints (now run in float32)",
                    3: "DICOM with an 8-bit VOI LUT of more than 256 entries (was wrapped), Enhanced DICOM (its "
                       "functional groups' rescale and window now apply, per frame under --frame), JPEG 2000 colour "
                       "DICOM (YBR_RCT/YBR_ICT, was an error) and DICOM with empty window tags (was an error)",
                    4: "16-bit grey PNGs with a transparency key colour (key pixels now black, as at 8 bits) and "
                       "float / 32-bit integer images of a single value (now black)"}


def to_rgb(img: "Image.Image") -> "Image.Image":
    """Any PIL mode -> 8-bit RGB: EXIF orientation applied, 16-bit scaled (not clipped), CMYK and
    palette converted, alpha composited onto black (what the pixels show without transparency)."""
    from PIL import Image, ImageOps

    # before exif_transpose, which returns a copy without it: the formats whose 16-bit grayscale
    # Pillow opens as mode I (PNG in older Pillow, PGM/PPM with maxval 65535) rather than I;16
    sixteen_bit = img.format in SIXTEEN_BIT_AS_I
    key = img.info.get("transparency") if img.mode.startswith("I") else None  # a 16-bit PNG's tRNS grey
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (img.mode == "I" and sixteen_bit):
        # 16-bit data: its full range; the transparency key colour onto black, as at 8 bits
        raw = np.asarray(img, dtype=np.float64)
        arr = raw * 255.0 / 65535.0
        if isinstance(key, int):
            arr[raw == key] = 0.0
        return Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)              # NaN / inf "no data" pixels: black, outside the range
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        # 32-bit integer / float data (TIFF): its own range; a constant image is black whatever
        # its value (as DICOM's), not its value rounded and clipped (0.7 -> 1, 1000 -> 255)
        arr = (arr - lo) * 255.0 / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.where(finite, arr, 0.0)
        return Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" or (img.mode in ("L", "RGB") and img.info.get("transparency") is not None):
        img = img.convert("RGBA")  # a palette, or a PNG transparency key colour (tRNS): alpha, below
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_dicom(path: "Path | object", options: DecodeOptions = DecodeOptions(), name: str | None = None
               ) -> "Image.Image":
    """DICOM -> 8-bit RGB: modality LUT, then VOI LUT / window (or options.window), MONOCHROME1
    inverted; without any window the full range of the rescaled data maps to 0..255. An Enhanced
    multi-frame file's per-frame (or shared) rescale and window apply to the chosen frame. Anything
    pydicom cannot apply is an ImageDecodeError with a one-line reason (the errors table's)."""
    from PIL import Image

    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise ImageDecodeError("pydicom is not installed: pip install 'featcache[dicom]'") from None
    label = name or (Path(path).name if isinstance(path, (str, Path)) else "the file")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        other = _image_format(path)
        raise ImageDecodeError(f"a {other} image named like a DICOM file: rename it to its own extension" if other
                               else "not a DICOM Part 10 file (no 'DICM' preamble or file meta information): save "
                                    "it as a standard DICOM file") from None
    except Exception as exc:
        raise ImageDecodeError(f"not a readable DICOM file: {_one_line(exc)}") from None
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise ImageDecodeError(f"DICOM {other[0]} (float pixels, e.g. a parametric map) is not supported" if other
                               else "DICOM file has no pixel data (or it is truncated before them)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImageDecodeError(f"DICOM NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number") from None
    if frames > 1 and options.frame is None:
        raise ImageDecodeError(f"multi-frame DICOM ({frames} frames) in {label}: pass --frame N to pick one")
    if frames > 1 and not 0 <= options.frame < frames:
        raise ImageDecodeError(f"--frame {options.frame} out of range: {label} has {frames} frames")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        raise ImageDecodeError(f"DICOM Rows / Columns {ds.get('Rows')!r} / {ds.get('Columns')!r} are not "
                               f"numbers") from None
    check_pixel_count(cols, rows, options)   # before pydicom allocates them (an 8 KB file can claim 30000 x 30000)
    one_frame = frames > 1 and hasattr(ds, "pixel_array_options")
    if hasattr(ds, "pixel_array_options"):
        # pydicom >= 3 converts YBR to RGB by default (the stored values are converted once, below),
        # and decodes only the chosen frame of a multi-frame file (pydicom 2 decodes them all)
        ds.pixel_array_options(as_rgb=False, **({"index": options.frame} if one_frame else {}))
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ImageDecodeError(f"cannot decode DICOM pixel data (transfer syntax {getattr(ts, 'name', ts)}): "
                               f"{_one_line(exc)}") from None
    if frames > 1 and not one_frame:
        arr = arr[options.frame]
    if ds.get("PerFrameFunctionalGroupsSequence") or ds.get("SharedFunctionalGroupsSequence"):
        _frame_functional_groups(ds, options.frame if frames > 1 else 0)  # Enhanced IODs, one frame too
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR" or photometric in COLOUR_PHOTOMETRICS or arr.ndim == 3:
            return Image.fromarray(_dicom_colour(arr, ds, photometric), "RGB")
        out = _dicom_grey(apply_modality_lut(arr, ds).astype(np.float64), ds, options)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a malformed LUT or tag: the file's problem, said in one line
        raise ImageDecodeError(f"DICOM pixel pipeline failed ({type(exc).__name__}): {_one_line(exc)}") from None
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L").convert("RGB")


def _image_format(path: "Path | object") -> str | None:
    """The format PIL recognises in a file's header (PNG, JPEG ...), or None: a cheap sniff that
    decodes no pixel."""
    from PIL import Image, UnidentifiedImageError

    try:
        if hasattr(path, "seek"):
            path.seek(0)
        with Image.open(path) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, TypeError):
        return None


# photometric interpretations whose decoded samples are RGB or YBR_FULL-family colour. YBR_RCT /
# YBR_ICT (JPEG 2000) are RGB once decoded: the decoder undoes the component transform (PS3.5 8.2.4).
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


def _dicom_colour(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Colour DICOM as 8-bit RGB: YBR_FULL(_422) converted once, 8-bit samples as stored, deeper
    ones scaled by BitsStored; PALETTE COLOR through the file's colour table."""
    if photometric == "PALETTE COLOR":  # stored values are indices into the file's colour table
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:
            raise ImageDecodeError(f"PALETTE COLOR DICOM whose colour table cannot be applied: {_one_line(exc)}"
                                   ) from None
        if bits <= 8:
            return np.ascontiguousarray(rgb.astype(np.uint8))
        return _scale_to_uint8(rgb.astype(np.float64), (0.0, float(2 ** bits - 1)))
    if photometric not in COLOUR_PHOTOMETRICS:
        raise ImageDecodeError(f"DICOM photometric interpretation {photometric} is not supported (expected "
                               f"MONOCHROME1/2, PALETTE COLOR or one of {', '.join(COLOUR_PHOTOMETRICS)})")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageDecodeError(f"{photometric} DICOM with pixel array of shape {arr.shape} (expected rows x "
                               f"columns x 3)")
    if photometric.startswith("YBR_FULL"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    if arr.dtype == np.uint8:  # 8-bit colour is shown as stored, never stretched to its own min..max
        return np.ascontiguousarray(arr)
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize))
    return _scale_to_uint8(arr.astype(np.float64), (0.0, float(2 ** bits - 1)))


def _dicom_grey(data: np.ndarray, ds: Any, options: DecodeOptions) -> np.ndarray:
    """Modality values -> 0..255: --window, else the file's VOI LUT, else its window, else its own
    min..max (an empty VOI LUT sequence or window tag counts as absent)."""
    if options.window is not None:
        centre, width = options.window
        return _window(data, centre, width)
    if ds.get("VOILUTSequence"):
        return _voi_lut(data, ds)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre not in (None, "") and width not in (None, ""):
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return _window(data, _first(centre), _first(width), function)
    return _scale_to_uint8(data, None)


def _voi_lut(data: np.ndarray, ds: Any) -> np.ndarray:
    """The file's first VOI LUT (PS3.3 C.11.2.1.2): a value below the first mapped one takes the first
    entry, one past the table the last, and the entries' bit depth maps onto 0..255. Indexed here in
    int64 (pydicom 3.0 indexes in the entries' own dtype: an 8-bit LUT of 4,096 entries wrapped)."""
    item = ds.VOILUTSequence[0]
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 2 ** 16
    if bits not in (8, *range(10, 17)):
        raise ImageDecodeError(f"DICOM VOI LUT with {bits} bits per entry (expected 8 or 10-16)")
    lut = _lut_entries(item, ds, count, bits)
    index = np.clip(np.floor(data) - first, 0, count - 1).astype(np.int64)
    return _scale_to_uint8(lut[index].astype(np.float64), (0.0, float(2 ** bits - 1)))


def _lut_entries(item: Any, ds: Any, count: int, bits: int) -> np.ndarray:
    """A LUT item's LUTData as `count` integers: US values as pydicom parsed them, OW bytes as
    16-bit words in the file's byte order (8-bit entries packed two to a word where the data hold
    `count` bytes)."""
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, (bytes, bytearray)):
        raw = bytes(element.value)
        little = getattr(ds, "original_encoding", (None, True))[1]
        if little is None:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            little = True if ts is None else bool(ts.is_little_endian)
        if bits == 8 and len(raw) in (count, count + 1):
            lut = np.frombuffer(raw[:count], dtype=np.uint8)
        else:
            lut = np.frombuffer(raw[:2 * (len(raw) // 2)], dtype="<u2" if little else ">u2")
    else:
        value = element.value
        lut = np.atleast_1d(np.asarray(value if value is not None else [], dtype=np.int64))
    if len(lut) < count:
        raise ImageDecodeError(f"DICOM VOI LUT holds {len(lut)} entries; its descriptor says {count}")
    return lut[:count].astype(np.int64)


def _frame_functional_groups(ds: Any, frame: int) -> None:
    """Enhanced multi-frame files keep rescale and window in functional groups, per frame or shared
    (PS3.3 C.7.6.16.2.9 Pixel Value Transformation, C.7.6.16.2.10 Frame VOI LUT): the chosen frame's
    values (else the shared ones) are set at the top level, where the modality and VOI steps read them."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    groups = ([per_frame[frame]] if frame < len(per_frame) else []) + ([shared[0]] if shared else [])
    for sequence, keys in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                           ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
        for group in groups:
            items = group.get(sequence)
            if items:
                for key in keys:
                    if key in items[0]:
                        setattr(ds, key, items[0][key].value)
                break


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for the errors table (a malformed tag can hold kilobytes)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # DICOM VOILUTFunction values (PS3.3 C.11.2.1.3)


def _window(data: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM window mapped onto 0..255: the file's VOILUTFunction (LINEAR, PS3.3 C.11.2.1.2.1;
    LINEAR_EXACT and SIGMOID, C.11.2.1.3), so pixels are what a conformant viewer shows."""
    if not (math.isfinite(centre) and math.isfinite(width)):
        raise ImageDecodeError(f"DICOM window centre {centre:g} / width {width:g} must be finite numbers")
    if function not in VOI_FUNCTIONS:
        raise ImageDecodeError(f"unknown DICOM VOILUTFunction {function!r} (expected one of "
                               f"{', '.join(VOI_FUNCTIONS)}): pass --window C,W to window it linearly")
    if function != "LINEAR" and width <= 0:
        raise ImageDecodeError(f"DICOM window width {width:g} must be > 0 for VOILUTFunction {function}: "
                               f"pass --window C,W")
    if function == "LINEAR" and width < 1:  # PS3.3 C.11.2.1.2.1: a LINEAR window is at least 1 wide
        raise ImageDecodeError(f"DICOM window width {width:g} must be >= 1 for a LINEAR window: pass "
                               f"--window C,W with W >= 1")
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflow far below the centre is 0, as it should be
            out = 1.0 / (1.0 + np.exp(-4.0 * (data - centre) / width))
    elif function == "LINEAR_EXACT":
        out = np.clip((data - centre) / width + 0.5, 0.0, 1.0)
    else:
        lo, hi = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
        out = (data - (centre - 0.5)) / max(width - 1, 1e-9) + 0.5
        out = np.where(data <= lo, 0.0, np.where(data > hi, 1.0, out))
    return np.round(out * 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter/Width may hold several values; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _scale_to_uint8(data: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map data linearly onto 0..255 by a known range or its own min..max (never clipping detail)."""
    lo, hi = value_range if value_range else (float(data.min()), float(data.max()))
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) * 255.0 / (hi - lo)).clip(0, 255).astype(np.uint8)
