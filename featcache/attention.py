"""CLS-to-patch attention maps of a ViT-family backbone, drawn over the images it saw.

For each image the map is the attention the CLS token pays to every patch in one layer (the
last by default): row 0 of the attention matrix, with the prefix tokens (CLS, DeiT's
distillation token, DINOv2's registers) dropped and the rest renormalised to sum to one over
the patches, then laid out on the patch grid (h, w) = input size / patch size. The head-mean map
is the mean over heads of the raw attention, renormalised (heads that look mostly at prefix
tokens weigh less); per-head maps are each renormalised on their own.

The "top-50% mass" mask is the smallest set of patches holding at least half of the map's
attention (Matsoukas et al., "What makes transfer learning work for medical images"; DINO's
visualize_attention thresholds the sorted cumulative attention the same way). It shows where
the model looks, independent of how peaked the map is.

transformers' default SDPA attention does not return attention weights, so the model is
switched to the "eager" implementation, which gives the same outputs and the weights.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from featcache.backbones import Backbone, interpolation_kwargs, load_backbone, use_eager_attention
from featcache.sources import IMAGE_EXTENSIONS, DecodeOptions, discover, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = set(IMAGE_EXTENSIONS)  # the extensions extract reads (sources.py), one list


# ------------------------------------------------------------------------------------------------
# the model side
# ------------------------------------------------------------------------------------------------

def load_attention_backbone(model: str, image_size: int | None = None) -> Backbone:
    """Load a transformer backbone with eager attention so its forward returns attention weights."""
    # strict: a map over dropped pixels would be stretched over the whole image
    backbone = load_backbone(model, image_size=image_size, strict_image_size=True)
    if backbone.family.cnn:
        raise ValueError(f"{model} is a {backbone.family.name} CNN and has no attention; attention "
                         f"maps need a ViT, DeiT, DINO or DINOv2 model.")
    use_eager_attention(backbone.model)
    return backbone


@dataclass
class AttentionMaps:
    """CLS-to-patch attention of one batch, each map summing to one over its patches."""

    mean: np.ndarray              # (B, h, w) mean over heads, renormalised
    heads: np.ndarray             # (B, H, h, w) per head, each renormalised
    grid: tuple[int, int]         # patch grid (h, w)
    patch_size: int               # pixels per patch side
    layer: int                    # layer index used (negative counts from the end)


def cls_attention(backbone: Backbone, pixel_values: torch.Tensor, layer: int = -1) -> AttentionMaps:
    """CLS-to-patch attention maps of one batch of preprocessed pixels (B, 3, H, W)."""
    model, n_prefix, p = backbone.model, backbone.n_prefix, backbone.patch_size
    kwargs = interpolation_kwargs(backbone, pixel_values)
    try:
        with torch.inference_mode():
            out = model(pixel_values=pixel_values, output_attentions=True, **kwargs)
    except RuntimeError as exc:
        if not kwargs:
            raise
        trained = getattr(model.config, "image_size", "?")
        size = "x".join(map(str, trained)) if isinstance(trained, (list, tuple)) else f"{trained}x{trained}"
        raise ValueError(f"{backbone.name} was trained at {size} px and cannot run at "
                         f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]} ({exc}); use its own size (without "
                         f"--image-size).") from None
    attentions = out.attentions
    if not attentions:
        raise ValueError(f"{backbone.name} returned no attention weights; it must run with "
                         f"attn_implementation='eager' (use load_attention_backbone).")
    n_layers = len(attentions)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"--layer {layer} is out of range: {backbone.name} has {n_layers} layers "
                         f"(use -{n_layers}..{n_layers - 1}; -1 is the last).")
    h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
    attn = attentions[layer][:, :, 0, n_prefix:].float()          # (B, H, patches)
    if attn.shape[-1] != h * w:
        raise ValueError(f"{backbone.name}: {attn.shape[-1]} patch tokens after {n_prefix} prefix "
                         f"tokens do not form the {h}x{w} grid of a "
                         f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]} input.")
    heads = attn / attn.sum(dim=-1, keepdim=True)
    mean = attn.mean(dim=1)
    mean = mean / mean.sum(dim=-1, keepdim=True)
    b, n_heads = attn.shape[:2]
    return AttentionMaps(mean=mean.reshape(b, h, w).cpu().numpy(),
                         heads=heads.reshape(b, n_heads, h, w).cpu().numpy(),
                         grid=(h, w), patch_size=p, layer=layer)


def top_mass_mask(attn_map: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """Boolean mask (same shape) of the smallest set of cells whose attention sums to >= mass;
    cells tied with the last one kept are kept too, so the mask never depends on cell order (a
    flat map keeps every cell rather than its first rows)."""
    flat = np.asarray(attn_map, dtype=np.float64).ravel()
    total = flat.sum()
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order])
    # a cell is kept when the mass of the cells ranked above it is still short of the target
    keep_sorted = (cum - flat[order]) < mass * total
    if not keep_sorted.any():
        return np.zeros(np.shape(attn_map), dtype=bool)
    lowest_kept = flat[order[keep_sorted]].min()
    return (flat >= lowest_kept).reshape(np.shape(attn_map))


def upsample(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize (h, w) or (B, h, w) maps to size (H, W) with torch interpolate (bilinear by default)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[:, None]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(t, size=size, mode=mode, **kwargs)[:, 0]
    return (up[0] if squeeze else up).numpy()


def display_image(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """The picture the model saw, (H, W, 3) floats in [0, 1]: the processor's normalisation undone."""
    x = pixel_values.detach().float().cpu().numpy().transpose(1, 2, 0)
    if getattr(processor, "do_normalize", False):
        mean = np.asarray(processor.image_mean, dtype=np.float32).reshape(1, 1, -1)
        std = np.asarray(processor.image_std, dtype=np.float32).reshape(1, 1, -1)
        x = x * std + mean
    if not getattr(processor, "do_rescale", True):
        x = x / 255.0
    return np.clip(x, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# the data side
# ------------------------------------------------------------------------------------------------

def list_images(data: str | Path, split: str | None = None) -> list[Path]:
    """Image files of a data source: featcache.sources's discover (folders, CSV manifests) when it
    can read it, else every image file under a folder (sorted), or a single image file."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist; give an image folder, a CSV "
                                f"manifest or one image file.")
    if data.is_file() and data.suffix.lower() in IMAGE_SUFFIXES:
        return [data]
    try:
        source = discover(data)
    except (ValueError, FileNotFoundError):
        if not data.is_dir():
            raise
    else:
        names = list(source.splits)
        if split is not None:
            if split not in source.splits:
                raise ValueError(f"split {split!r} is not in {data}; it has {', '.join(names)}.")
            names = [split]
        return [Path(f) for name in names for f in source.splits[name].files]
    if not data.is_dir():
        raise ValueError(f"--data {data} is neither a folder nor an image file ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    root = data / split if split is not None and (data / split).is_dir() else data
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def decode_image(path: Path) -> Any:
    """One RGB PIL image decoded exactly as extract decodes it (sources.load_image: EXIF, 16-bit,
    DICOM windowing, decompression-bomb limit)."""
    return load_image(Path(path), DecodeOptions())


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------

ATTENTION_CMAP = "inferno"  # perceptually uniform: equal steps of attention look like equal steps of colour


def _overlay(ax: Any, image: np.ndarray, attn_map: np.ndarray, title: str, vmax: float, alpha: float = 0.5) -> Any:
    """Heat map of one (h, w) map over the image on the scale [0, vmax] (so a flat map looks flat,
    not like stretched rounding noise), with the top-50%-mass region outlined; returns the
    heat-map artist (for a colour bar)."""
    size = image.shape[:2]
    ax.imshow(image)
    heat = ax.imshow(upsample(attn_map, size), cmap=ATTENTION_CMAP, alpha=alpha, vmin=0.0,
                     vmax=vmax if vmax > 0 else 1.0)
    mask = upsample(top_mass_mask(attn_map).astype(np.float32), size, mode="nearest")
    if 0 < mask.sum() < mask.size:
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return heat


def save_image_figure(path: Path, image: np.ndarray, attn_map: np.ndarray, title: str) -> Path:
    """Three panels: the input, the heat-map overlay with the 50%-mass contour, the masked input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = upsample(top_mass_mask(attn_map).astype(np.float32), image.shape[:2], mode="nearest")
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    axes[0].axis("off")
    heat = _overlay(axes[1], image, attn_map, "CLS attention (mean of heads)", vmax=float(np.max(attn_map)))
    bar = fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02, label="attention weight")
    bar.solids.set(alpha=1)  # the colour scale itself, not its blend with the overlay
    axes[2].imshow(image * (0.15 + 0.85 * mask[..., None]))
    axes[2].set_title("top 50% attention mass", fontsize=8)
    axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_grid_figure(path: Path, images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                     titles: Sequence[str], cols: int = 8, shared_scale: bool = False) -> Path:
    """One PNG with an overlay per image (or per head), ``cols`` per row, and one colour bar that
    is true of every panel: with ``shared_scale`` (the heads of one image) all panels share
    [0, the largest weight] and the bar is in attention weight; otherwise (different images)
    each map is drawn relative to its own largest weight and the bar says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.9, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    top = max((float(np.max(m)) for m in maps), default=0.0)
    heat = None
    for ax, image, m, t in zip(axes.ravel(), images, maps, titles):
        if shared_scale:
            heat = _overlay(ax, image, m, t, vmax=top)
        else:
            peak = float(np.max(m))
            heat = _overlay(ax, image, m / peak if peak > 0 else m, t, vmax=1.0)
    fig.tight_layout(rect=(0, 0, 1 - 0.8 / fig.get_figwidth(), 1))  # room for the bar on the right
    if heat is not None:
        bar_ax = fig.add_axes((1 - 0.65 / fig.get_figwidth(), 0.15, 0.12 / fig.get_figwidth(), 0.7))
        bar = fig.colorbar(heat, cax=bar_ax)
        bar.solids.set(alpha=1)
        bar.set_label("attention weight" if shared_scale else "attention / the image's largest", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(path: Path) -> str:
    """A panel title that tells images apart when they sit in class folders (0/00.png, 1/00.png)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------

@dataclass
class AttentionRun:
    """What ``attention_maps_for_images`` wrote and skipped."""

    out: Path                                   # output directory
    paths: list[Path] = field(default_factory=list)       # images drawn, in order
    figures: list[Path] = field(default_factory=list)     # per-image PNGs (and per-head PNGs)
    grid: Path | None = None                    # grid PNG of all images
    arrays: Path | None = None                  # attention.npz with the maps
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    grid_shape: tuple[int, int] = (0, 0)        # patch grid (h, w)


PARTIAL = "attention.partial.txt"   # the figures a run has written so far, one name per line


def remove_earlier_outputs(out: Path) -> None:
    """Remove what an earlier attention run wrote into ``out``: the figures its attention.npz
    names (a run before the npz named them: the names it gives its images' figures), grid.png and
    the npz itself, or, for a run interrupted before its npz, the figures its PARTIAL list names.
    Only those exact names are removed; a directory without either, or with an npz that cannot be
    read (a run killed while writing it), keeps every file."""
    partial = out / PARTIAL
    if partial.is_file():
        _remove_names(out, [*partial.read_text(encoding="utf-8").splitlines(), PARTIAL])
    npz = out / "attention.npz"
    if not npz.is_file():
        return
    try:
        with np.load(npz) as old:
            if "figures" in old:
                names = [str(n) for n in old["figures"]]
            else:
                stems = [_safe_stem(i, Path(str(p))) for i, p in enumerate(old["paths"])]
                names = [f"{st}{tail}.png" for st in stems for tail in ("", "_heads")] + ["grid.png"]
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign npz: leave every file as it is
        log.warning("%s could not be read (%s: %s): the figures of the run that wrote it, if any, are left in %s.",
                    npz, type(exc).__name__, exc, out)
        return
    _remove_names(out, [*names, npz.name])


def _remove_names(out: Path, names: Sequence[str]) -> None:
    """Remove the files of these names in out (names only: never a path outside it)."""
    for name in names:
        target = out / Path(name).name
        if name and target.is_file():
            target.unlink()


def _safe_stem(i: int, path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return f"{i:04d}_{stem}"


def attention_maps_for_images(model: str | Backbone, files: Sequence[Path], out: str | Path,
                              layer: int = -1, per_head: bool = False, grid_cols: int = 8,
                              batch_size: int = 8, device: str = "cpu", max_images: int | None = None,
                              progress: bool = False, log_skipped: bool = True) -> AttentionRun:
    """Compute and draw the CLS attention maps of ``files``; returns what was written.

    Writes ``<i>_<stem>.png`` per image (plus ``<i>_<stem>_heads.png`` with ``per_head``),
    ``grid.png`` of all overlays, and ``attention.npz`` (paths, mean (N, h, w), mask (N, h, w),
    heads (N, H, h, w) with ``per_head``, layer as given, layer_index from 0, and the figures'
    names). What an earlier run wrote into ``out`` is removed first, so no figure of another run
    is left beside these. Files that fail to decode are skipped, recorded in
    ``AttentionRun.skipped`` and logged as warnings (``log_skipped=False``: the caller reports
    them); ``max_images`` counts drawn images, so skipped files do not use up the budget.
    """
    backbone = load_attention_backbone(model) if isinstance(model, str) else model
    use_eager_attention(backbone.model)
    n_layers = getattr(backbone.model.config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and not -n_layers <= layer < n_layers:  # before any image is read or written
        raise ValueError(f"--layer {layer} is out of range: {backbone.name} has {n_layers} layers "
                         f"(use -{n_layers}..{n_layers - 1}; -1 is the last).")
    backbone.to(device)
    out = Path(out)
    run = AttentionRun(out)
    means, heads_all, images = [], [], []

    def flush(batch: list[tuple[Path, torch.Tensor]]) -> None:
        pixels = torch.stack([b[1] for b in batch]).to(device)
        maps = cls_attention(backbone, pixels, layer)
        if not run.figures:  # the first maps exist: now the directory is this run's
            out.mkdir(parents=True, exist_ok=True)
            remove_earlier_outputs(out)
        run.grid_shape = maps.grid
        # the figures this batch is about to draw are listed first, so that a run interrupted while
        # drawing them leaves none the next run into --out does not know of
        planned = [f"{_safe_stem(len(run.paths) + j, path)}{tail}.png" for j, (path, _) in enumerate(batch)
                   for tail in ("", "_heads") if tail == "" or per_head]
        tmp = out / (PARTIAL + ".tmp")
        tmp.write_text("".join(f"{name}\n" for name in [*(f.name for f in run.figures), *planned, "grid.png"]),
                       encoding="utf-8")   # grid.png: the one figure written after the last batch
        os.replace(tmp, out / PARTIAL)
        for j, (path, px) in enumerate(batch):
            i = len(run.paths)
            image = display_image(px, backbone.processor)
            stem = _safe_stem(i, path)
            run.figures.append(save_image_figure(out / f"{stem}.png", image, maps.mean[j], _title(path)))
            if per_head:
                n_heads = maps.heads.shape[1]
                run.figures.append(save_grid_figure(
                    out / f"{stem}_heads.png", [image] * n_heads, list(maps.heads[j]),
                    [f"head {k}" for k in range(n_heads)], cols=grid_cols, shared_scale=True))
                heads_all.append(maps.heads[j])
            run.paths.append(path)
            means.append(maps.mean[j])
            images.append(image)

    from tqdm.auto import tqdm

    batch: list[tuple[Path, torch.Tensor]] = []
    bar = tqdm(total=min(len(files), max_images) if max_images else len(files), desc="attention", unit="img",
               disable=not progress)
    for path in files:
        if max_images and len(run.paths) + len(batch) >= max_images:
            break
        try:
            image = decode_image(path)
            px = backbone.processor(images=image, return_tensors="pt")["pixel_values"][0]
        except Exception as exc:  # one unreadable file must not stop the run
            reason = f"{type(exc).__name__}: {exc}"
            if log_skipped:
                log.warning("skipped %s: %s", path, reason)
            run.skipped.append((Path(path), reason))
            continue
        batch.append((Path(path), px))
        bar.update(1)  # counts images drawn (skipped files do not use up --max-images)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    if not run.paths:
        return run
    run.grid = save_grid_figure(out / "grid.png", images, means,
                                [_title(p) for p in run.paths], cols=grid_cols)
    n_layers = n_layers if isinstance(n_layers, int) else None
    arrays = {"paths": np.asarray([str(p) for p in run.paths]), "mean": np.stack(means),
              "mask": np.stack([top_mass_mask(m) for m in means]), "layer": np.asarray(layer),
              "layer_index": np.asarray(layer % n_layers if n_layers else layer),
              "figures": np.asarray([f.name for f in [*run.figures, run.grid]])}
    if per_head:
        arrays["heads"] = np.stack(heads_all)
    run.arrays = out / "attention.npz"
    np.savez_compressed(run.arrays, **arrays)
    (out / PARTIAL).unlink(missing_ok=True)   # the npz names every figure now
    return run
