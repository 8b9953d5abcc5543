"""Input-pipeline throughput: featcache extraction with a model that costs nothing vs bare PIL decoding.

ratio = images/s of `run_extraction` (one loader worker, batch 64, a model whose forward returns
zeros of the right shapes, HDF5 writes included) / images/s of a bare `Image.open(f).convert("RGB")`
loop over the same JPEGs on one core. Decoding is the stage's physical limit (ratio 1.0).

Both pixel paths run side by side, interleaved: `uint8` (the workers run the processor's 8-bit
steps and ship uint8; rescale + normalise run in the main process, in batch) and `processor` (the
old path, forced: the whole image processor runs in the worker and float32 crosses over).

Target (issue 9): uint8 path >= 0.7 of bare decoding on one core.

    python benchmarks/loader.py                      # 320 JPEGs of 500x375, ViT processor (224, bilinear)
    python benchmarks/loader.py --processor dinov2   # shortest edge 256 bicubic + crop 224
    python benchmarks/loader.py --profile            # cProfile one worker's items (what limits it)
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_jpegs(root: Path, n: int, width: int, height: int) -> list[Path]:
    """ImageNet-like photos: smooth random colour fields (upsampled noise) + grain, PIL quality 90."""
    rng = np.random.default_rng(0)
    files = []
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        img = (smooth + rng.normal(0, 6, smooth.shape)).clip(0, 255).astype(np.uint8)
        f = root / ("a" if i % 2 else "b") / f"{i:05d}.jpg"
        Image.fromarray(img).save(f, quality=90)
        files.append(f)
    return sorted(files)


def bare_decode(files: list[Path]) -> float:
    """images/s of open + decode + convert('RGB') on this process's one core."""
    t = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            img.convert("RGB")
    return len(files) / (time.perf_counter() - t)


def save_model(model_dir: Path, processor: str) -> None:
    """A 1-layer ViT of width 8 at 224 px (forward ~free) with a ViT- or DINOv2-style processor."""
    from transformers import BitImageProcessor, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16)).save_pretrained(model_dir)
    if processor == "vit":
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(model_dir)
    else:
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(model_dir)


def free_forward(backbone) -> None:
    """Make the backbone's forward cost nothing: zeros of the shapes its real forward gives.

    Even a 1-layer width-8 ViT costs ~1 ms/image here (the 16x16 patch convolution, and torch's
    two OpenMP threads contending with the loader worker for the 2 cores), which would measure the
    model, not the input pipeline.
    """
    with torch.inference_mode():
        cls, _, tokens = backbone.features(torch.zeros(1, 3, 224, 224))
    t, d = tokens.shape[1], tokens.shape[2]

    def features(pixel_values: torch.Tensor, native: bool = False, blocks: int | None = None):
        b = pixel_values.shape[0]
        return torch.zeros(b, d), torch.zeros(b, d), torch.zeros(b, t, d)

    backbone.features = features


def profile_items(prepared, files: list[Path], mode: str) -> None:
    """cProfile of what one worker does per item (decode + pixel steps), in this process."""
    import cProfile
    import pstats

    from featcache.sources import DecodeOptions
    from featcache.extraction import ImageRows
    from featcache.pixels import plan_from_processor

    backbone = prepared[0]
    plan = plan_from_processor(backbone.processor) if mode == "uint8" else None
    rows = ImageRows([(0, i, f) for i, f in enumerate(files)], backbone.processor, DecodeOptions(), plan)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(len(rows)):
        rows[i]
    prof.disable()
    print(f"\n--- cProfile of {len(files)} worker items, {mode} path ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--processor", choices=("vit", "dinov2"), default="vit")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also cProfile the worker's per-item work")
    p.add_argument("--fast-decode", action="store_true",
                   help="also time the uint8 path with --fast-decode (JPEG draft mode; changes pixels)")
    args = p.parse_args()

    from featcache.extraction import ExtractConfig, RunOptions, prepare_backbone, run_extraction

    tmp = Path(tempfile.mkdtemp(prefix="featcache-loader-"))
    files = make_jpegs(tmp / "data", args.images, args.width, args.height)
    save_model(tmp / "model", args.processor)
    cfg = ExtractConfig(model=str(tmp / "model"))
    prepared = prepare_backbone(cfg)
    free_forward(prepared[0])

    def extract(mode: str, i: int) -> tuple[float, str]:
        run = RunOptions(batch_size=args.batch_size, workers=args.workers, device="cpu", progress=False,
                         pixels="processor" if mode == "processor" else "auto")
        out = tmp / f"{mode}{i}.h5"
        summary = run_extraction(replace(cfg, fast_decode=mode == "fast"), tmp / "data", out, run, backbone=prepared)
        out.unlink()
        return summary.images_per_second, summary.pixel_path

    bare_decode(files)  # warm the page cache
    modes = ("uint8", "processor") + (("fast",) if args.fast_decode else ())
    rates: dict[str, list[float]] = {"bare": [], **{m: [] for m in modes}}
    paths = {}
    for i in range(args.repeats):  # interleaved so machine noise hits all three alike
        rates["bare"].append(bare_decode(files))
        for mode in modes:
            r, paths[mode] = extract(mode, i)
            rates[mode].append(r)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"images={args.images} jpeg={args.width}x{args.height} processor={args.processor} batch={args.batch_size} "
          f"workers={args.workers} model=zeros torch_threads={torch.get_num_threads()}")
    runs = lambda k: ", ".join(f"{r:.1f}" for r in rates[k])  # noqa: E731
    print(f"bare PIL decode (1 core)          : {med['bare']:8.1f} images/s  (runs: {runs('bare')})")
    print(f"extract, {paths['uint8']:<24}: {med['uint8']:8.1f} images/s  (runs: {runs('uint8')})")
    print(f"extract, {paths['processor']:<24}: {med['processor']:8.1f} images/s  (runs: {runs('processor')})")
    print(f"ratio uint8 path / bare decode    : {med['uint8'] / med['bare']:.3f}   (target >= 0.7)")
    print(f"ratio old path / bare decode      : {med['processor'] / med['bare']:.3f}")
    if args.fast_decode:
        print(f"extract, uint8 + --fast-decode    : {med['fast']:8.1f} images/s  (runs: {runs('fast')}); "
              f"ratio to bare (exact) decode {med['fast'] / med['bare']:.3f} (pixels differ: README '--fast-decode')")
    if args.profile:
        for mode in ("uint8", "processor"):
            profile_items(prepared, files[:128], mode)


if __name__ == "__main__":
    main()
