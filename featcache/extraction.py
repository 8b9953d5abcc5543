"""The extraction loop: loader workers decode -> frozen model -> background writer.

Images are decoded and preprocessed by the model's own image processor inside DataLoader
workers; the model runs under ``torch.inference_mode`` (bf16 autocast on GPU with ``amp``);
a single background thread owns the HDF5 file and writes each batch, so the model never waits
on the disk. Rows already ``done`` in an existing file of the same fingerprint are skipped, so
re-running an interrupted command finishes only what is missing.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import featcache
from featcache.backbones import Backbone, load_backbone, processor_output_size, set_processor_size
from featcache.data import DecodeOptions, ImageDecodeError, discover, load_image
from featcache.devices import resolve_device
from featcache.store import FeatureLayout, FeatureStore, FeatureStoreError, SplitSpec, StoreWriter, merge_shards
from featcache.tokens import TokenLayout, apply_token_mode, native_input_size, plan_tokens

log = logging.getLogger("featcache")

DTYPES = ("float16", "float32")


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


@dataclass(frozen=True)
class RunOptions:
    """How to run an extraction; none of these change the numbers stored."""

    batch_size: int = 64                    # images per forward pass
    workers: int | None = None              # decoding processes; None = one per spare core
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    amp: bool = False                       # bf16 autocast on GPU
    overwrite: bool = False                 # replace a file made with another config
    retry_errors: bool = False              # try again the inputs that failed before
    progress: bool = True                   # tqdm bar with images/s
    compile: bool = False                   # torch.compile the model (GPU, opt-in)
    merge: str = "copy"                     # distributed runs: join shards by copy or virtual datasets


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
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)

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
    """Rows to compute: each item decodes one file and preprocesses it with the model's processor.

    A file that cannot be decoded yields its reason instead of pixels, so one bad input never
    stops the run.
    """

    def __init__(self, items: list[tuple[int, int, Path]], processor: Any, decode_options: Any):
        self.items = items
        self.processor = processor
        self.decode_options = decode_options

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int, torch.Tensor | None, str]:
        split, row, file = self.items[i]
        try:
            image = load_image(Path(file), self.decode_options)
            pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
            return split, row, torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), ""
        except ImageDecodeError as exc:
            return split, row, None, str(exc)
        except Exception as exc:  # a processor failure on one odd image must not stop the run
            return split, row, None, f"preprocessing failed: {type(exc).__name__}: {exc}"


def collate_rows(batch: list[tuple[int, int, torch.Tensor | None, str]]) -> dict[str, Any]:
    """Stack the decoded images; keep the failed ones aside with their reasons."""
    ok = [b for b in batch if b[2] is not None]
    bad = [b for b in batch if b[2] is None]
    return {
        "split": np.array([b[0] for b in ok], dtype=np.int64),
        "row": np.array([b[1] for b in ok], dtype=np.int64),
        "pixels": torch.stack([b[2] for b in ok]) if ok else None,
        "failed": [(b[0], b[1], b[3]) for b in bad],
    }


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


def saved_rows_line(out: str | Path) -> str:
    """'N of M rows are saved in OUT.' read back from the file (for interrupted or failed runs)."""
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
    backbone = load_backbone(cfg.model, revision=cfg.revision, image_size=cfg.image_size)
    source = backbone.layout()
    plan = plan_tokens(source, cfg.num_tokens, cfg.token_mode)
    if plan.mode == "native":
        if backbone.family.cnn:
            raise ValueError(f"--token-mode native needs a ViT-like model; {cfg.model} is a CNN. "
                             f"Use --token-mode resize.")
        h, w = native_input_size(plan, backbone.patch_size)
        set_processor_size(backbone.processor, h, w)
        native = backbone.layout((h, w), native=True)
        plan = replace(native, mode="native", source_num_tokens=source.num_tokens, source_grid=source.grid)
    return backbone, plan


def file_config(cfg: ExtractConfig, backbone: Backbone, plan: TokenLayout, data_root: Path) -> dict[str, Any]:
    """The config recorded in (and, minus provenance, hashed into) the feature file."""
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
    })
    if not cfg.num_tokens:
        config["token_mode"] = "none"
    return config


def run_extraction(cfg: ExtractConfig, data: str | Path, out: str | Path, run: RunOptions = RunOptions(),
                   backbone: tuple[Backbone, TokenLayout] | None = None, **source_options: Any) -> ExtractSummary:
    """Extract features of every image under `data` into `out`, resuming what is already done.

    Under torchrun (WORLD_SIZE > 1) each rank extracts a contiguous share of every split into
    its own shard file, then rank 0 joins the shards into `out` (run.merge: copy or virtual).
    """
    source = discover(data, **source_options)
    backbone_, plan = backbone or prepare_backbone(cfg)
    rank, world = distributed_rank()
    device = resolve_device(run.device, rank if world > 1 else None)
    config = file_config(cfg, backbone_, plan, Path(source.root))
    layout = FeatureLayout(dim=plan.dim, tokens=plan if cfg.tokens == "full" else None, dtype=cfg.dtype)
    specs = {name: SplitSpec(paths=rows.paths, labels=rows.labels, groups=rows.groups)
             for name, rows in source.splits.items()}
    if world == 1:
        return _extract_file(source.splits, specs, out, config, layout, source.classes, backbone_, plan,
                             cfg, run, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ranges = [shard_ranges(specs, r, world) for r in range(world)]
    shards = [shard_path(out, r, world) for r in range(world)]
    mine = {name: _slice_rows(source.splits[name], *ranges[rank][name]) for name in specs}
    my_specs = {name: SplitSpec(paths=r.paths, labels=r.labels, groups=r.groups) for name, r in mine.items()}
    summary = _extract_file(mine, my_specs, shards[rank], config, layout, source.classes, backbone_, plan,
                            cfg, run, device)
    dist.barrier()
    if rank == 0:
        merge_shards(shards, out, config, source.classes, specs, layout, ranges, mode=run.merge,
                     overwrite=True)
    dist.barrier()
    summary.out = Path(out)
    return summary


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
    """Create or resume one feature file and compute its missing rows."""
    writer = StoreWriter(out, config, classes, specs, layout, overwrite=run.overwrite,
                         retry_errors=run.retry_errors)
    split_names = list(split_rows)
    items: list[tuple[int, int, Path]] = []
    for s, name in enumerate(split_names):
        files = split_rows[name].files
        items.extend((s, int(r), files[r]) for r in writer.pending_rows(name))
    total = sum(len(spec.paths) for spec in specs.values())
    done_before = sum(writer.done_count(name) for name in split_names)
    summary = ExtractSummary(Path(out), writer.resumed, total, rows_done_before=done_before,
                             rows_failed_before=total - done_before - len(items))
    try:
        if items:
            paths = [split_rows[name].paths for name in split_names]
            _extract_items(items, split_names, paths, backbone, plan, cfg, run, device, writer, summary,
                           DecodeOptions(window=cfg.window, frame=cfg.frame))
    finally:
        writer.close()
    return summary


def _extract_items(items: list[tuple[int, int, Path]], split_names: Sequence[str],
                   paths: Sequence[Sequence[str]], backbone: Backbone,
                   plan: TokenLayout, cfg: ExtractConfig, run: RunOptions, device: torch.device,
                   writer: StoreWriter, summary: ExtractSummary, decode_options: Any) -> None:
    workers = default_workers() if run.workers is None else run.workers
    loader = torch.utils.data.DataLoader(
        ImageRows(items, backbone.processor, decode_options), batch_size=run.batch_size,
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
    bar = tqdm(total=len(items), unit="img", desc="extract", disable=not run.progress, smoothing=0.1)
    start = time.perf_counter()
    try:
        for batch in loader:
            if batch["failed"]:
                failed = batch["failed"]
                for s, row, reason in failed:
                    path = paths[s][row]
                    summary.errors.append((split_names[s], path, reason))
                    log.warning("skipped %s: %s", path, reason)
                summary.rows_failed += len(failed)
                background.submit(_error_job(writer, split_names, failed))
            if batch["pixels"] is not None:
                pixels = batch["pixels"].to(device, non_blocking=True)
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    cls, pooled, hidden = forward(pixels, native=native)
                    tokens = apply_token_mode(hidden, plan) if keep_tokens else None
                # float32 to the writer, which casts to the storage dtype itself: it must see the
                # values before a float16 cast turns those above 65504 into inf (StoreWriter.write)
                result = [t.float().cpu().numpy() if t is not None else None for t in (cls, pooled, tokens)]
                background.submit(_write_job(writer, split_names, batch["split"], batch["row"], *result))
                summary.rows_computed += len(batch["row"])
            bar.update(len(batch["row"]) + len(batch["failed"]))
    finally:
        try:
            background.close()
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - start


def _write_job(writer: StoreWriter, split_names: Sequence[str], splits: np.ndarray, rows: np.ndarray,
               cls: np.ndarray, pooled: np.ndarray, tokens: np.ndarray | None) -> Callable[[], None]:
    def job() -> None:
        for s in np.unique(splits):
            m = splits == s
            writer.write(split_names[s], rows[m], cls[m], pooled[m], None if tokens is None else tokens[m])
    return job


def _error_job(writer: StoreWriter, split_names: Sequence[str], failed: list[tuple[int, int, str]]
               ) -> Callable[[], None]:
    def job() -> None:
        for s in {f[0] for f in failed}:
            mine = [f for f in failed if f[0] == s]
            writer.write_errors(split_names[s], [f[1] for f in mine], [f[2] for f in mine])
    return job


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
    source_options = {k: v for k, v in options.items() if k not in cfg_keys | run_keys}
    run_extraction(cfg, data, out, run, **source_options)
    return FeatureStore(out)
