"""The extraction loop: loader workers decode -> frozen model -> background writer.

Images are decoded inside DataLoader workers. When featcache knows every step of the model's
image processor (featcache.pixels), the workers run only its 8-bit steps (RGB, resize, crop) and
ship uint8 pixels; rescale and normalise then run on the device, in batch, bit-identical to the
processor. Otherwise the whole processor runs in the workers and float32 pixels cross over. The
model runs under ``torch.inference_mode`` (bf16 autocast on GPU with ``amp``);
a single background thread owns the HDF5 file and writes each batch, so the model never waits
on the disk. Rows already ``done`` in an existing file of the same fingerprint are skipped, so
re-running an interrupted command finishes only what is missing.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import featcache
from featcache.backbones import Backbone, load_backbone, processor_output_size, set_processor_size, trained_size
from featcache.sources import (DECODE_RULES, DECODE_RULES_CHANGES, IMAGE_EXTENSIONS, UNREADABLE, DecodeOptions, ImageDecodeError, RowContent, discover, file_stat,
                               load_image, read_input, row_content)
from featcache.devices import resolve_device
from featcache.names import CONTENT_CHARS, DTYPES
from featcache.pixels import (PROCESSOR_PATH, UINT8_PATH, PixelPlan, normalize_batch, plan_from_processor,
                              to_uint8)
from featcache.store import (CONTENT_DATASETS, FEATURE_DATASETS, FILE_STAT_WIDTH, READ_LOCKING, ROW_DATASETS, FeatureLayout, FeatureStore,
                             FeatureStoreError, SplitSpec, StoreWriter, check_same_data, check_same_data_root,
                             fingerprint_of,
                             merge_shards, other_settings_error, read_rows, same_rows)
from featcache.tokens import TokenLayout, apply_token_mode, native_input_size, plan_tokens

log = logging.getLogger("featcache")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what ends up in a feature file (hashed into its fingerprint)."""

    model: str                              # hub id or local directory
    revision: str | None = None             # hub commit/tag; the resolved commit is recorded
    tokens: str = "none"                    # "none": cls + pooled only; "full": last_hidden_state too
    num_tokens: int | None = None           # e.g. 257; None keeps the backbone's own count
    token_mode: str = "resize"              # resize | grid | native (tokens.py)
    dtype: str = "float16"                  # storage dtype of features
    image_size: int | None = None           # override the processor's output size (px, square)
    window: tuple[float, float] | None = None  # DICOM window centre, width override
    frame: int | None = None                # DICOM frame of multi-frame files
    blocks: int | None = None               # also store CLS / mean patch token of the last N blocks (DINOv2 eval)
    fast_decode: bool = False               # JPEG draft-mode decoding down to the processor's resize target
                                            # (changes pixels slightly; README "--fast-decode")


@dataclass(frozen=True)
class RunOptions:
    """How to run an extraction; none of these change the numbers stored, except amp (recorded)."""

    batch_size: int = 64                    # images per forward pass
    workers: int | None = None              # decoding processes; None = one per spare core
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    amp: bool = False                       # bf16 autocast on GPU: the exception, it moves the numbers,
                                            # so file_config records and fingerprints it
    overwrite: bool = False                 # replace a file made with another config
    retry_errors: bool = False              # try again the inputs that failed before
    progress: bool = True                   # tqdm bar with images/s
    compile: bool = False                   # torch.compile the model (GPU, opt-in)
    merge: str = "copy"                     # distributed runs: join shards by copy or virtual datasets
    update: bool = False                    # the data changed: keep stored rows of images still there
    pixels: str = "auto"                    # auto: uint8 from the workers when featcache knows the processor
                                            # (featcache.pixels); processor: whole processor in the workers


@dataclass
class ExtractSummary:
    """What one extraction run did, for the CLI summary and tests."""

    out: Path
    resumed: bool
    rows_total: int
    rows_done_before: int
    rows_computed: int = 0
    rows_failed: int = 0
    rows_failed_before: int = 0             # known unreadable inputs not retried (see --retry-errors)
    seconds: float = 0.0
    pixel_path: str = ""                    # uint8+device-normalize | processor-in-workers ("" if nothing ran)
    draft_px: int | None = None             # --fast-decode: JPEGs decoded in draft mode down to this side
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)
    updated: bool = False                   # --update rebuilt the file around the current data
    rows_reused: int = 0                    # --update: rows copied from the old file, never recomputed
    rows_dropped: int = 0                   # --update: old rows whose image is gone
    rows_changed: int = 0                   # stored rows whose input bytes changed since: computed again
    rows_unverified: int = 0                # stored rows without a recorded content (older files): kept by path

    @property
    def images_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else float("nan")


def default_workers() -> int:
    """One decoding process per core beyond the one that drives the model (at most 8)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------------------------
# loader side (runs in worker processes)
# ----------------------------------------------------------------------------------------------

class ImageRows(torch.utils.data.Dataset):
    """Rows to compute: each item decodes one file, then runs the processor's uint8 steps (with a
    pixel plan: (3, H, W) uint8) or the whole processor (without: (3, H, W) float32).

    A file that cannot be decoded yields its reason instead of pixels, so one bad input never
    stops the run.
    """

    def __init__(self, items: list[tuple[int, int, Path]], processor: Any, decode_options: Any,
                 pixel_plan: PixelPlan | None = None):
        self.items = items
        self.processor = processor
        self.decode_options = decode_options
        self.pixel_plan = pixel_plan

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int, torch.Tensor | None, str, RowContent | None]:
        split, row, file = self.items[i]
        content = None
        try:
            if str(file).startswith("hf:"):  # a datasets row: its bytes come memory-mapped, read twice is free
                content = row_content(Path(file))
                image = load_image(Path(file), self.decode_options)
            else:  # one read: the bytes decoded are the bytes hashed, so a later resume can tell a change
                data, content = read_input(Path(file))
                image = load_image(Path(file), self.decode_options, data=data)
            if self.pixel_plan is not None:
                return split, row, torch.from_numpy(to_uint8(image, self.pixel_plan)), "", content
            pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
            return split, row, torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), "", content
        except ImageDecodeError as exc:
            return split, row, None, str(exc), content
        except Exception as exc:  # a processor failure on one odd image must not stop the run
            return split, row, None, f"preprocessing failed: {type(exc).__name__}: {exc}", content


def collate_rows(batch: list[tuple[int, int, torch.Tensor | None, str, RowContent | None]]) -> dict[str, Any]:
    """Stack the decoded images; keep the failed ones aside with their reasons."""
    ok = [b for b in batch if b[2] is not None]
    bad = [b for b in batch if b[2] is None]
    return {
        "split": np.array([b[0] for b in ok], dtype=np.int64),
        "row": np.array([b[1] for b in ok], dtype=np.int64),
        "pixels": _stack([b[2] for b in ok]) if ok else None,
        "content": [b[4] for b in ok],
        "failed": [(b[0], b[1], b[3], b[4]) for b in bad],
    }


def content_arrays(contents: Sequence[RowContent | None]) -> dict[str, np.ndarray]:
    """StoreWriter's content and file_stat arrays for rows (an input that could not be read at all:
    UNREADABLE and zeros, so it is retried once it can be read)."""
    return {"content": np.array([c.digest if c else UNREADABLE for c in contents], dtype=f"S{CONTENT_CHARS}"),
            "file_stat": np.array([c.stat_key() if c else (0,) * FILE_STAT_WIDTH for c in contents],
                                  dtype=np.int64).reshape(-1, FILE_STAT_WIDTH)}


def _stack(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-shaped images; in a loader worker, straight into shared memory (as torch's
    default_collate does) so the batch is not copied again when it crosses to the main process.
    numpy does the copy: torch's CPU copy of uint8 was 2-60x slower on the busy 2-core test box."""
    if any(p.shape != pixels[0].shape for p in pixels):
        raise ValueError(f"images of one batch must share a size to be stacked; got "
                         f"{sorted({tuple(p.shape) for p in pixels})}. Give the processor a fixed size "
                         f"(--image-size) or a centre crop.")
    out = torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    np.stack([p.numpy() for p in pixels], out=out.numpy())
    return out


# ----------------------------------------------------------------------------------------------
# writer side (one background thread owns the file)
# ----------------------------------------------------------------------------------------------

class BackgroundWriter:
    """Runs write jobs in order on one thread; re-raises the first failure in the caller."""

    def __init__(self, max_pending: int = 4):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="featcache-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # surfaced in submit()/close()
                    self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_if_failed()
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, FeatureStoreError):  # e.g. float16 overflow: already one clear line
                raise self._error
            raise ExtractionWriteError(f"writing features failed: {' '.join(str(self._error).split())[:300]}.") \
                from self._error


class ExtractionWriteError(RuntimeError):
    """The disk refused a write (full, quota, file-size limit): rows written before stay valid."""


def saved_rows_line(out: str | Path, update: bool = False) -> str:
    """'N of M rows are saved in OUT.' read back from the file (for interrupted or failed runs); of
    OUT.updating when an --update was cut (OUT itself is untouched until the update finishes)."""
    out = Path(out)
    updating = out.with_name(out.name + ".updating")
    if update and updating.exists():
        line = saved_rows_line(updating)
        return f"{line[:-1]} (the update; {out} is unchanged until it finishes)." if line.endswith(".") else line
    try:
        with FeatureStore(out) as store:
            done = sum(int(store[s].done.sum()) for s in store.splits)
            total = sum(store[s].n for s in store.splits)
        return f"{done} of {total} rows are saved in {out}."
    except (OSError, ValueError):
        return f"no rows are saved in {out}."


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def prepare_backbone(cfg: ExtractConfig) -> tuple[Backbone, TokenLayout]:
    """Load the backbone and settle the token layout it will store (resizing the processor for
    native mode). Each layout is measured by one dummy forward, never repeated later."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}.")
    if cfg.tokens not in ("none", "full"):
        raise ValueError(f"--tokens must be none or full; got {cfg.tokens!r}.")
    if cfg.num_tokens is not None and cfg.tokens != "full" and cfg.token_mode != "native":
        raise ValueError(f"--num-tokens {cfg.num_tokens} only shapes stored tokens: add --tokens full "
                         f"(or use --token-mode native to change the input resolution).")
    if cfg.image_size is not None and cfg.token_mode == "native":
        raise ValueError(f"--image-size and --token-mode native both set the input size (native mode sizes it from "
                         f"--num-tokens {cfg.num_tokens}); give one of them.")
    with warnings.catch_warnings(record=True) as size_notes:
        # held back until the model is known to run at that size: a fixed-size model refuses every
        # size but its own, so "use 28 or 32" (not a multiple of the patch) would mislead
        warnings.simplefilter("always")
        backbone = load_backbone(cfg.model, revision=cfg.revision, image_size=cfg.image_size)
    if cfg.blocks is not None:
        backbone.check_blocks(cfg.blocks)
    try:
        source = backbone.layout()
        for note in size_notes:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    except ValueError as exc:
        if "doesn't match" not in str(exc):
            raise
        native = ("To run a ViT at another resolution with interpolated position embeddings, use --token-mode "
                  "native --num-tokens N (N = prefix tokens + (side / patch size)^2).")
        if cfg.image_size:
            raise ValueError(f"--image-size {cfg.image_size}: {cfg.model} runs at a fixed input size ({exc}). "
                             f"{native}") from None
        h, w = processor_output_size(backbone.processor)
        raise ValueError(f"{cfg.model}'s image processor makes {h}x{w} px inputs, but the model runs at a fixed input "
                         f"size ({exc}). Pass --image-size with the size it was trained at, or save the processor "
                         f"with that size. {native}") from None
    plan = plan_tokens(source, cfg.num_tokens, cfg.token_mode)
    if plan.mode == "native":
        if backbone.family.cnn:
            raise ValueError(f"--token-mode native needs a ViT-like model; {cfg.model} is a CNN. "
                             f"Use --token-mode resize or grid.")
        trained = trained_size(backbone)
        if backbone.family.interpolates_pos and trained and trained[0] != trained[1]:
            raise ValueError(f"--token-mode native interpolates position embeddings, which transformers' "
                             f"{backbone.family.name} supports for a square trained grid only; {cfg.model} was trained "
                             f"at {trained[0]}x{trained[1]} px. Use --token-mode resize or grid.")
        h, w = native_input_size(plan, backbone.patch_size)
        set_processor_size(backbone.processor, h, w)
        native = backbone.layout((h, w), native=True)
        plan = replace(native, mode="native", source_num_tokens=source.num_tokens, source_grid=source.grid)
    return backbone, plan


def draft_side(processor: Any) -> int:
    """The side (px) a --fast-decode JPEG must keep in both dimensions so that the processor's
    resize still only shrinks it: the fixed size's larger side, or the shortest edge (divided by
    crop_pct for processors that resize by it, as ConvNeXt's does below 384 px)."""
    size = getattr(processor, "size", None) or {}
    if isinstance(size, int):
        side = size
    elif "height" in size and "width" in size:
        side = max(int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        side = int(size["shortest_edge"])
        crop_pct = getattr(processor, "crop_pct", None)
        if crop_pct and side < 384:
            side = int(math.ceil(side / crop_pct))
    else:
        raise ValueError(f"--fast-decode needs to know the size the image processor resizes to; "
                         f"{type(processor).__name__} has size={size!r}. Run without --fast-decode.")
    return side


def file_config(cfg: ExtractConfig, backbone: Backbone, plan: TokenLayout, data_root: Path,
                data_kind: str | None = None, amp: bool = False) -> dict[str, Any]:
    """The config recorded in (and, minus provenance, hashed into) the feature file. `amp`: the
    forward runs under bf16 autocast (a GPU with --amp), which moves features by ~1e-2: recorded
    as "amp": "bfloat16" and fingerprinted, absent otherwise (older files keep their fingerprint)."""
    processor = {k: v for k, v in backbone.processor.to_dict().items() if not k.startswith("_")}
    config = asdict(cfg)
    config.update({
        "revision": backbone.revision,
        "weights": backbone.weights_id,
        "family": backbone.family.name,
        "processor": processor,
        "input_size": list(processor_output_size(backbone.processor)),
        **plan.config(),
        "stored_num_tokens": plan.num_tokens if cfg.tokens == "full" else None,
        "versions": {"featcache": featcache.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "h5py": h5py.__version__,
                     "python": platform.python_version()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_root": str(data_root),
        "data_kind": data_kind,
        "decode_rules": DECODE_RULES,
    })
    if not cfg.num_tokens:
        config["token_mode"] = "none"
    for key in ("blocks", "weights", "fast_decode"):  # keys added in 0.2: absent when unused, so older files
        if not config.get(key):                        # keep their fingerprint
            config.pop(key, None)
    if cfg.fast_decode:
        config["draft_px"] = draft_side(backbone.processor)
    if amp:
        config["amp"] = "bfloat16"
    return config


NOT_DICOM_SUFFIXES = frozenset(IMAGE_EXTENSIONS) - {".dcm", ".dicom"}


def check_dicom_options(cfg: ExtractConfig, source: Any, out: str | Path | None = None) -> None:
    """Refuse --window / --frame for data without DICOM files: they would change no pixel but enter
    the fingerprint, so a later run without them would be refused as 'other settings'. A file made
    before this check with the same options (`out`) is still resumed and updated with them."""
    if cfg.window is None and cfg.frame is None:
        return
    if out is not None and Path(out).is_file():
        try:
            with FeatureStore(out) as old:
                window = old.config.get("window")
                if (tuple(window) if window is not None else None) == (tuple(cfg.window) if cfg.window else None) \
                        and old.config.get("frame") == cfg.frame:
                    return
        except (FeatureStoreError, OSError):
            pass  # not a readable featcache file: the writer says so later
    paths = [p for rows in source.splits.values() for p in rows.paths]
    if source.kind == "hf" or (paths and all(Path(str(p)).suffix.lower() in NOT_DICOM_SUFFIXES for p in paths)):
        given = " and ".join(o for o, v in (("--window", cfg.window), ("--frame", cfg.frame)) if v is not None)
        raise ValueError(f"{given} appl{'ies' if ' and ' not in given else 'y'} to DICOM files, but every input here "
                         f"is another format (.png, .jpg, ...): drop {'it' if ' and ' not in given else 'them'}.")


def run_extraction(cfg: ExtractConfig, data: str | Path, out: str | Path, run: RunOptions = RunOptions(),
                   backbone: tuple[Backbone, TokenLayout] | None = None, **source_options: Any) -> ExtractSummary:
    """Extract features of every image under `data` into `out`, resuming what is already done.

    Under torchrun (WORLD_SIZE > 1) each rank extracts a contiguous share of every split into
    its own shard file, then rank 0 joins the shards into `out` (run.merge: copy or virtual).
    """
    source = discover(data, **source_options)
    check_dicom_options(cfg, source, out)
    backbone_, plan = backbone or prepare_backbone(cfg)
    rank, world = distributed_rank()
    device = resolve_device(run.device, rank if world > 1 else None)
    config = file_config(cfg, backbone_, plan, Path(source.root), source.kind, amp=run.amp and device.type == "cuda")
    layout = FeatureLayout(dim=plan.dim, tokens=plan if cfg.tokens == "full" else None, dtype=cfg.dtype,
                           blocks=cfg.blocks)
    specs = {name: SplitSpec(paths=rows.paths, labels=rows.labels, groups=rows.groups)
             for name, rows in source.splits.items()}
    if world == 1:
        return _extract_file(source.splits, specs, out, config, layout, source.classes, backbone_, plan,
                             cfg, run, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(out)
    if out.exists() and not run.overwrite:
        # rank 0 replaces OUT by the joined shards at the end: refuse now what one process refuses
        check_out_before_shards(out, config, source.classes, specs, run.update)
    ranges = [shard_ranges(specs, r, world) for r in range(world)]
    shards = [shard_path(out, r, world) for r in range(world)]
    mine = {name: _slice_rows(source.splits[name], *ranges[rank][name]) for name in specs}
    my_specs = {name: SplitSpec(paths=r.paths, labels=r.labels, groups=r.groups) for name, r in mine.items()}
    shard = shards[rank]
    # stored rows a rank may take over: other shards of this world (rows move between ranks when the
    # data grows) and OUT itself when it is a standalone file (made by one process, or a copy merge)
    sources = [p for p in shards if p != shard and p.exists()]
    if out.exists() and not run.overwrite:
        behind = _virtual_sources(out)  # a virtual OUT: the shards it reads (maybe of another world size)
        ours = {p.resolve() for p in shards}
        sources += [p for p in behind if p not in ours and p.exists()] if behind else [out]
    fresh_shard = not shard.exists() or (run.update and not same_rows(shard, source.classes, my_specs))
    if run.overwrite or not sources or not fresh_shard:
        summary = _extract_file(mine, my_specs, shard, config, layout, source.classes, backbone_, plan,
                                cfg, run, device)
    else:
        # the first source is the one whose rows no longer in the data count as dropped: the rank's own
        # old shard, or (rank 0 only, so that they are counted once) a file one process made
        first = [shard] if shard.exists() else [out] if rank == 0 and out in sources else []
        summary = _update_file(mine, my_specs, shard, config, layout, source.classes, backbone_, plan, cfg, run,
                               device, sources=first + [p for p in sources if p not in first],
                               current={p for spec in specs.values() for p in spec.paths}, count_dropped=bool(first),
                               keep_failed=not run.update)
        if not run.update:  # a first torchrun over a file one process made: a resume of it
            summary.updated, summary.rows_done_before, summary.rows_reused = (
                False, summary.rows_done_before + summary.rows_reused, 0)
    dist.barrier()
    if rank == 0:
        # the joined file says which rules its oldest rows followed (a resumed shard may hold older ones)
        oldest = min(_decode_rules_of(s) for s in shards)
        merge_shards(shards, out, {**config, "decode_rules": min(oldest, DECODE_RULES)}, source.classes, specs,
                     layout, ranges, method=run.merge, overwrite=True)
    dist.barrier()
    summary.out = Path(out)
    return summary


def check_out_before_shards(out: Path, config: dict[str, Any], classes: Sequence[str], specs: dict[str, SplitSpec],
                            update: bool) -> None:
    """Refuse, before any rank computes, an OUT that one process would refuse: made with another
    model or setting, another data root, or (without --update) other rows. Read-only."""
    with FeatureStore(out) as old:
        if old.fingerprint != fingerprint_of(config):
            raise other_settings_error(out, old.config, config)
        check_same_data_root(old.config, config, out)
        if not update:
            check_same_data(old.h5, out, classes, specs)


def _virtual_sources(path: Path) -> list[Path]:
    """The shard files a --merge virtual feature file reads its rows from ([] for a standalone file)."""
    found: dict[Path, None] = {}
    with h5py.File(path, "r", locking=READ_LOCKING) as f:
        for g in f.values():
            if isinstance(g, h5py.Group) and "cls" in g and g["cls"].is_virtual:
                for source in g["cls"].virtual_sources():
                    found[(path.parent / source.file_name).resolve()] = None
    return list(found)


def decode_rules_of(config: dict[str, Any]) -> int:
    """The decoding-rules version a file's config records (1: made before featcache recorded it)."""
    return int(config.get("decode_rules", 1))


def _decode_rules_of(path: Path) -> int:
    """The decoding-rules version of a feature file (the current one when it cannot be read)."""
    try:
        with FeatureStore(path) as store:
            return decode_rules_of(store.config)
    except (OSError, FeatureStoreError, ValueError):
        return DECODE_RULES


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_ranges(specs: dict[str, SplitSpec], rank: int, world: int) -> dict[str, tuple[int, int]]:
    """The contiguous [lo, hi) rows of each split that one rank extracts."""
    out = {}
    for name, spec in specs.items():
        n = len(spec.paths)
        out[name] = (n * rank // world, n * (rank + 1) // world)
    return out


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    """out.h5 -> out.shard-00001-of-00004.h5, beside the final file."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{rank:05d}-of-{world:05d}{out.suffix}")


def _slice_rows(rows: Any, lo: int, hi: int) -> Any:
    return replace(rows, paths=rows.paths[lo:hi], files=rows.files[lo:hi], labels=rows.labels[lo:hi],
                               groups=None if rows.groups is None else rows.groups[lo:hi])


def _extract_file(split_rows: dict[str, Any], specs: dict[str, SplitSpec], out: str | Path,
                  config: dict[str, Any], layout: FeatureLayout, classes: Sequence[str], backbone: Backbone,
                  plan: TokenLayout, cfg: ExtractConfig, run: RunOptions, device: torch.device) -> ExtractSummary:
    """Create or resume one feature file and compute its missing rows (--update: rebuild it)."""
    if not run.overwrite and Path(out).exists():
        warn_older_decode_rules(Path(out), config)
    if run.update and not run.overwrite and Path(out).exists() and not same_rows(out, classes, specs):
        # the data changed since OUT was made; decided read-only, so OUT is never opened for writing
        # (an unchanged data set resumes below, exactly as without --update)
        return _update_file(split_rows, specs, Path(out), config, layout, classes, backbone, plan, cfg, run, device)
    writer = StoreWriter(out, config, classes, specs, layout, overwrite=run.overwrite,
                         retry_errors=run.retry_errors)
    return _fill(writer, split_rows, specs, out, backbone, plan, cfg, run, device)


def warn_older_decode_rules(out: Path, config: dict[str, Any]) -> None:
    """Say so when OUT, which this run resumes or updates, was made under older decoding rules: its
    stored rows are kept (the fingerprint does not change), but for some inputs new rows would
    follow another rule. Silent for a file this run will refuse anyway (another model or setting)
    and on every torchrun rank but the first."""
    if distributed_rank()[0] != 0:
        return
    try:
        with FeatureStore(out) as old:
            if old.fingerprint != fingerprint_of(config):
                return  # refused below, with the settings that differ
            made_with = decode_rules_of(old.config)
    except (OSError, FeatureStoreError, ValueError):
        return  # not a readable featcache file: StoreWriter says why
    changes = [DECODE_RULES_CHANGES[v] for v in range(made_with + 1, DECODE_RULES + 1) if v in DECODE_RULES_CHANGES]
    if changes:
        log.warning("%s was made by an earlier featcache whose decoding differed for: %s. Its stored rows are "
                    "kept; if your data holds such inputs, re-extract with --overwrite so every row follows one "
                    "rule.", out.name, "; ".join(changes))


def _fill(writer: StoreWriter, split_rows: dict[str, Any], specs: dict[str, SplitSpec], out: str | Path,
          backbone: Backbone, plan: TokenLayout, cfg: ExtractConfig, run: RunOptions, device: torch.device,
          rows_done_before: int | None = None) -> ExtractSummary:
    """Compute every row of an open writer that is not done (nor known unreadable), then close it."""
    split_names = list(split_rows)
    changed, unverified = forget_changed_rows(writer, split_rows, progress=run.progress)
    items: list[tuple[int, int, Path]] = []
    for s, name in enumerate(split_names):
        files = split_rows[name].files
        items.extend((s, int(r), files[r]) for r in writer.pending_rows(name))
    total = sum(len(spec.paths) for spec in specs.values())
    done_now = sum(writer.done_count(name) for name in split_names)
    summary = ExtractSummary(Path(out), writer.resumed, total,
                             rows_done_before=done_now if rows_done_before is None else rows_done_before,
                             rows_failed_before=total - done_now - len(items),
                             rows_changed=changed, rows_unverified=unverified)
    try:
        if items:
            paths = [split_rows[name].paths for name in split_names]
            draft = draft_side(backbone.processor) if cfg.fast_decode else None
            _extract_items(items, split_names, paths, backbone, plan, cfg, run, device, writer, summary,
                           DecodeOptions(window=cfg.window, frame=cfg.frame, draft=draft))
    finally:
        writer.close()
    if items and done_now == 0 and summary.rows_computed == 0 and summary.errors:
        # every image failed: a broken setting (a processor that refuses its size), not bad files
        split, path, reason = summary.errors[0]
        raise ValueError(f"every one of the {len(items)} images failed, so {Path(out).name} has no features; the "
                         f"first, {split}/{path}: {reason}. Fix the cause, then re-run with --retry-errors (or "
                         f"--overwrite).")
    return summary


def _update_file(split_rows: dict[str, Any], specs: dict[str, SplitSpec], out: Path, config: dict[str, Any],
                 layout: FeatureLayout, classes: Sequence[str], backbone: Backbone, plan: TokenLayout,
                 cfg: ExtractConfig, run: RunOptions, device: torch.device, sources: Sequence[Path] | None = None,
                 current: set[str] | None = None, count_dropped: bool = True,
                 keep_failed: bool = False) -> ExtractSummary:
    """--update: build OUT.updating for the data as it is now, copying the stored features of every
    image still present (found by path, in whatever split it now sits) and computing the new ones,
    then replace OUT with it. OUT stays intact until the rename, and an interrupted update resumes
    its OUT.updating, so a kill at any moment loses nothing.

    Under torchrun a rank's shard also takes rows from `sources` (the other shards, a standalone
    OUT; the first is the shard itself when it exists), `current` holds every path of the data (not
    only this rank's), and only a rank's own old file counts rows as dropped (`count_dropped`)."""
    tmp = out.with_name(out.name + ".updating")
    sources = [out] if sources is None else list(sources)
    olds = [FeatureStore(path) for path in sources]
    try:
        for old, path in zip(olds, sources):
            if old.fingerprint != fingerprint_of(config):
                raise other_settings_error(path, old.config, config, "--update keeps rows of the same model and "
                                           "settings only: use another --out, or --overwrite to re-extract everything.")
            check_same_data_root(old.config, config, path)
        # the file keeps saying which rules its oldest rows followed (warn_older_decode_rules)
        config = {**config, "decode_rules": min([decode_rules_of(old.config) for old in olds] + [DECODE_RULES])}
        try:
            writer = StoreWriter(tmp, config, classes, specs, layout)
        except FeatureStoreError:
            if not tmp.exists():
                raise
            tmp.unlink()  # an earlier update for data that has changed again since: start it afresh
            writer = StoreWriter(tmp, config, classes, specs, layout)
        current = {p for spec in specs.values() for p in spec.paths} if current is None else current
        wheres = [_done_rows_by_path(old) for old in olds]
        # what an interrupted update of OUT.updating did: rows it copied, and rows it computed (of which
        # those whose recorded content differs from the old file's were changed images)
        done_at_start = sum(writer.done_count(name) for name in specs)
        copied_before, recomputed_before = _copied_before(writer, olds, wheres, specs)
        reused = copied_before
        try:
            for old, where in zip(olds, wheres):  # each copies only rows still pending: the first source with a path wins
                reused += _copy_stored_rows(old, writer, specs, where)
            if keep_failed and not run.retry_errors:  # a resume (not --update): known-unreadable stays so
                for old in olds:
                    _copy_failed_rows(old, writer, specs)
        except BaseException:
            writer.close()
            raise
        dropped = sum(1 for p in wheres[0] if p not in current) if count_dropped else 0
    finally:
        for old in olds:
            old.close()
    summary = _fill(writer, split_rows, specs, out, backbone, plan, cfg, run, device,
                    rows_done_before=done_at_start - copied_before)
    os.replace(tmp, out)
    summary.out, summary.resumed, summary.updated = out, True, True
    summary.rows_reused, summary.rows_dropped = reused - summary.rows_changed, dropped
    summary.rows_changed += recomputed_before
    return summary


def _done_rows_by_path(store: FeatureStore) -> dict[str, tuple[str, int]]:
    """path -> (split, row) of every done row of a feature file (the first, if a path repeats)."""
    where: dict[str, tuple[str, int]] = {}
    for name in store.splits:
        view = store[name]
        paths = view.paths
        for r in view.valid_index():
            where.setdefault(paths[r], (name, int(r)))
    return where


def _copied_before(writer: StoreWriter, olds: Sequence[FeatureStore], wheres: Sequence[dict[str, tuple[str, int]]],
                   specs: dict[str, SplitSpec]) -> tuple[int, int]:
    """(copied, changed): rows an interrupted update already copied into the resumed OUT.updating
    (done rows whose path an old file holds, the first that has it as the copy takes it, with the
    content recorded there), and rows it computed again because their content had changed (the
    old file records other bytes). Rows it computed for new images are in neither count, so
    rows_reused says only what came from the old file and rows_changed every change found."""
    copied = changed = 0
    recorded: dict[tuple[int, str], np.ndarray | None] = {}  # each old split's contents, read once
    for name, spec in specs.items():
        done = writer.done_rows(name)
        mine = writer.row_contents(name, done)
        for i, row in enumerate(done.tolist()):
            path = spec.paths[row]
            k = next((k for k, where in enumerate(wheres) if path in where), None)
            if k is None:
                continue
            old_split, old_row = wheres[k][path]
            if (k, old_split) not in recorded:
                view = olds[k][old_split]
                recorded[(k, old_split)] = view.contents(np.arange(view.n))
            theirs = recorded[(k, old_split)]
            same = mine is None or theirs is None or theirs[old_row] == b"" or mine[i] == theirs[old_row]
            copied += int(same)
            changed += int(not same)
    return copied, changed


def _copy_stored_rows(old: FeatureStore, writer: StoreWriter, specs: dict[str, SplitSpec],
                      where: dict[str, tuple[str, int]], block: int = 1024) -> int:
    """Copy the features of rows whose image the old file already holds; returns how many."""
    copied = 0
    for name, spec in specs.items():
        pending = set(writer.pending_rows(name).tolist())
        pairs = [(i, where[p]) for i, p in enumerate(spec.paths) if i in pending and p in where]
        by_old_split: dict[str, list[tuple[int, int]]] = {}
        for new_row, (old_split, old_row) in pairs:
            by_old_split.setdefault(old_split, []).append((new_row, old_row))
        for old_split, rows in by_old_split.items():
            g = old[old_split]._g
            for start in range(0, len(rows), block):
                chunk = np.array(rows[start:start + block], dtype=np.int64)
                new_rows, old_rows = chunk[:, 0], chunk[:, 1]
                arrays = {k: read_rows(g[k], old_rows) for k in ROW_DATASETS if k in g}
                writer.write(name, new_rows, **arrays)
                copied += len(chunk)
    return copied


def _copy_failed_rows(old: FeatureStore, writer: StoreWriter, specs: dict[str, SplitSpec]) -> None:
    """Record as unreadable the pending rows whose image the old file recorded as unreadable (its
    reason and content), so a resume does not retry them unless --retry-errors, as in place."""
    failed: dict[str, tuple[str, int, str]] = {}
    for split in old.splits:
        view = old[split]
        reasons, paths, done = view.error_reasons, view.paths, view.done
        for r in np.flatnonzero((reasons != "") & ~done):
            failed.setdefault(paths[r], (split, int(r), str(reasons[r])))
    for name, spec in specs.items():
        pending = set(writer.pending_rows(name).tolist())
        hits = [(i, failed[p]) for i, p in enumerate(spec.paths) if i in pending and p in failed]
        for old_split in {s for _, (s, _, _) in hits}:
            mine = [(i, r, why) for i, (s, r, why) in hits if s == old_split]
            g = old[old_split]._g
            rows = np.array([r for _, r, _ in mine], dtype=np.int64)
            writer.write_errors(name, [i for i, _, _ in mine], [why for _, _, why in mine],
                                **{k: read_rows(g[k], rows) if k in g else None for k in CONTENT_DATASETS})


def _extract_items(items: list[tuple[int, int, Path]], split_names: Sequence[str],
                   paths: Sequence[Sequence[str]], backbone: Backbone,
                   plan: TokenLayout, cfg: ExtractConfig, run: RunOptions, device: torch.device,
                   writer: StoreWriter, summary: ExtractSummary, decode_options: Any) -> None:
    workers = default_workers() if run.workers is None else run.workers
    if run.pixels not in ("auto", "processor"):
        raise ValueError(f"RunOptions.pixels must be auto or processor; got {run.pixels!r}.")
    pixel_plan = plan_from_processor(backbone.processor) if run.pixels == "auto" else None
    summary.pixel_path = UINT8_PATH if pixel_plan is not None else PROCESSOR_PATH
    summary.draft_px = decode_options.draft
    loader = torch.utils.data.DataLoader(
        ImageRows(items, backbone.processor, decode_options, pixel_plan), batch_size=run.batch_size,
        shuffle=False, num_workers=workers, collate_fn=collate_rows,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
    model = backbone.to(device)
    forward = model.features
    if run.compile:
        forward = torch.compile(model.features)
    amp = run.amp and device.type == "cuda"
    if run.amp and device.type != "cuda":
        log.warning("--amp applies on a GPU only; running in float32 on %s.", device)
    keep_tokens = cfg.tokens == "full"
    native = plan.mode == "native"
    background = BackgroundWriter()
    normalized: torch.Tensor | None = None  # CPU: one float32 batch buffer reused (the forward is synchronous)
    bar = tqdm(total=len(items), unit="img", desc="extract", disable=not run.progress, smoothing=0.1)
    start = time.perf_counter()
    try:
        for batch in loader:
            if batch["failed"]:
                failed = batch["failed"]
                for s, row, reason, _ in failed:
                    path = paths[s][row]
                    summary.errors.append((split_names[s], path, reason))
                    log.warning("skipped %s: %s", path, reason)
                summary.rows_failed += len(failed)
                background.submit(_error_job(writer, split_names, failed))
            if batch["pixels"] is not None:
                pixels = batch["pixels"].to(device, non_blocking=True)  # pinned by the loader on cuda
                if pixel_plan is not None:
                    pixels = normalize_batch(pixels, pixel_plan, normalized)
                    normalized = pixels if device.type == "cpu" else None
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = forward(pixels, native=native, blocks=cfg.blocks)
                    tokens = apply_token_mode(out[2], plan) if keep_tokens else None
                arrays = dict(zip(FEATURE_DATASETS, (out[0], out[1], tokens, *out[3:])))
                # float32 to the writer thread, which casts to the storage dtype and refuses values
                # that overflow it (float16 above 65504) before any row is marked done
                result = {k: t.float().cpu().numpy() for k, t in arrays.items() if t is not None}
                result.update(content_arrays(batch["content"]))
                background.submit(_write_job(writer, split_names, batch["split"], batch["row"], result))
                summary.rows_computed += len(batch["row"])
            bar.update(len(batch["row"]) + len(batch["failed"]))
    finally:
        try:
            background.close()
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - start


def _write_job(writer: StoreWriter, split_names: Sequence[str], splits: np.ndarray, rows: np.ndarray,
               arrays: dict[str, np.ndarray]) -> Callable[[], None]:
    """One batch's rows, written split by split (StoreWriter.write: features, flush, done, flush)."""
    def job() -> None:
        for s in np.unique(splits):
            m = splits == s
            writer.write(split_names[s], rows[m], **{k: a[m] for k, a in arrays.items()})
    return job


def _error_job(writer: StoreWriter, split_names: Sequence[str],
               failed: list[tuple[int, int, str, RowContent | None]]) -> Callable[[], None]:
    def job() -> None:
        for s in {f[0] for f in failed}:
            mine = [f for f in failed if f[0] == s]
            writer.write_errors(split_names[s], [f[1] for f in mine], [f[2] for f in mine],
                                **content_arrays([f[3] for f in mine]))
    return job


def forget_changed_rows(writer: StoreWriter, split_rows: dict[str, Any], progress: bool = False) -> tuple[int, int]:
    """Make every stored row whose input changed since it was read pending again (features and
    "unreadable" alike), so a file never keeps features of an image that is no longer there.

    A row is unchanged when its file has the recorded stat (size, mtime, ctime, inode), or else (a
    touched or copied file, a datasets row) when its bytes hash to the recorded content; the stat
    of rows found unchanged by hash is refreshed. A row whose input could not be read at all is
    retried once it can be. Rows an interrupted run made pending for the same reason (they keep
    the content recorded before) are counted as changed again, so a run killed after the check
    does not turn changed images into plain unfinished ones. Returns (rows changed, rows without
    a recorded content, which files made before featcache recorded contents have, and which stay
    as they are).
    """
    changed = unverified = 0
    for name, rows in split_rows.items():
        recorded = writer.recorded_content(name)
        if recorded is None:
            unverified += writer.done_count(name)
            continue
        settled, digests, stats = recorded
        known = digests != b""
        unverified += int((~known).sum())
        verdicts = _content_verdicts(rows, settled[known], digests[known], stats[known], progress, f"check {name}")
        stale = [r for r, (v, _) in verdicts.items() if v == "stale"]
        touched = [(r, now) for r, (v, now) in verdicts.items() if v == "touched"]
        missing = [r for r, (v, _) in verdicts.items() if v == "missing"]
        pending = writer.pending_recorded(name)
        if pending is not None:  # a row recorded unreadable is pending under --retry-errors: retried, not "changed"
            readable = pending[1] != UNREADABLE.encode()
            pending = tuple(a[readable] for a in pending)
        before = [] if pending is None else [
            r for r, (v, _) in _content_verdicts(rows, *pending, progress, f"check {name}").items() if v == "stale"]
        if stale:
            writer.forget_rows(name, np.array(stale))
        if stale or before:
            first = rows.paths[(stale or before)[0]]
            log.warning("%d image(s) of split %s changed since they were extracted (first: %s)%s: computing them "
                        "again.", len(stale) + len(before), name, first,
                        f"; {len(before)} of them found so by an interrupted run" if before else "")
        if touched:
            writer.set_file_stat(name, np.array([r for r, _ in touched]), np.array([t for _, t in touched]))
        if missing:
            log.warning("%d stored row(s) of split %s have no file any more (first: %s): their features are kept, "
                        "as computed from the file then; if the data moved or a share is not mounted, mount it "
                        "and run again; if the images were removed, drop them from the manifest and use --update.",
                        len(missing), name, rows.paths[missing[0]])
        changed += len(stale) + len(before)
    if unverified:
        log.warning("%d stored row(s) of %s were extracted before featcache recorded each image's content: they "
                    "are kept by path, and an image changed in place among them is not noticed (--overwrite "
                    "re-extracts).", unverified, writer.path.name)
    return changed, unverified


def _content_verdicts(rows: Any, which: np.ndarray, digests: np.ndarray, stats: np.ndarray, progress: bool,
                      desc: str) -> dict[int, tuple[str, tuple[int, ...] | None]]:
    """Each row's input against what was recorded of it: "same" (the recorded stat, or the bytes
    hash alike), "touched" (same bytes, another stat: the new stat given), "stale" (other bytes, or
    unreadable now; an unreadable row readable now) or "missing" (its file is gone)."""
    unreadable = UNREADABLE.encode()
    out: dict[int, tuple[str, tuple[int, ...] | None]] = {}
    bar = tqdm(total=len(which), unit="img", desc=desc, leave=False, disable=not progress or len(which) < 10_000)
    for row, digest, stat in zip(which.tolist(), digests, stats):
        bar.update(1)
        file = rows.files[row]
        stored = tuple(int(v) for v in stat)  # (size, mtime) in files of the dataset's first version
        if digest != unreadable and stored[1] != 0:
            now_stat = file_stat(file)
            if now_stat is not None and now_stat[:len(stored)] == stored:
                out[row] = ("same", None)
                continue
        try:
            now = row_content(Path(file))
        except ImageDecodeError:
            if digest != unreadable and file_stat(file) is None and not str(file).startswith("hf:"):
                out[row] = ("missing", None)  # gone (an unmounted share?): kept, as computed from the file then
            else:  # unreadable now: computed again (and recorded as failed if so); still unreadable: as it was
                out[row] = ("stale" if digest != unreadable else "same", None)
            continue
        if digest == unreadable or now.digest.encode() != digest:
            out[row] = ("stale", None)
        elif now.stat_key()[:len(stored)] != stored:
            out[row] = ("touched", now.stat_key())
        else:
            out[row] = ("same", None)
    bar.close()
    return out


def extract(model: str, data: str | Path, out: str | Path, **options: Any) -> FeatureStore:
    """Extract features of the images under `data` with `model` into `out` (pinned API).

    Options are the fields of ExtractConfig (tokens, num_tokens, token_mode, dtype, revision,
    image_size, window, frame), of RunOptions (batch_size, workers, device, amp, overwrite,
    retry_errors, progress) and data-source options (split, label_columns, ...).
    Returns the finished file opened read-only.
    """
    cfg_keys = set(ExtractConfig.__dataclass_fields__)
    run_keys = set(RunOptions.__dataclass_fields__)
    cfg = ExtractConfig(model=str(model), **{k: v for k, v in options.items() if k in cfg_keys})
    run = RunOptions(**{k: v for k, v in options.items() if k in run_keys})
    if run.workers is not None and run.workers < 0:  # before any file is created
        raise ValueError(f"workers must be 0 (decode in this process) or more; got {run.workers}.")
    source_options = {k: v for k, v in options.items() if k not in cfg_keys | run_keys}
    run_extraction(cfg, data, out, run, **source_options)
    return FeatureStore(out)
