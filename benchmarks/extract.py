"""Extraction throughput vs a bare forward loop, measured side by side in one run.

ratio = images/s of featcache's extraction (decode JPEG + model's image processor in loader
workers + forward + HDF5 writes) / images/s of a bare `model(pixel_values)` loop over tensors
that were decoded and preprocessed beforehand, same model, same batch size.

Target (issue 3): >= 0.85 on the CPU machine with a ViT-S/16-sized random model on 224 px JPEGs;
>= 0.90 on a GPU with ViT-B/16 bf16 on pre-resized images (`--preset vit-b16 --amp`).

    python benchmarks/extract.py                    # ViT-S/16, 128 JPEGs, CPU
    python benchmarks/extract.py --images 32 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PRESETS = {
    "vit-s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def make_jpegs(root: Path, n: int, size: int) -> None:
    """Smooth synthetic photos (gradients + blobs) so JPEG decoding costs what a real photo costs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        f = rng.uniform(1, 6, 3)
        img = np.stack([np.sin(f[k] * (xx + yy * (k + 1)) * np.pi) for k in range(3)], -1)
        img = ((img + 1) * 127 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / ("a" if i % 2 else "b") / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit-s16")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--image-px", type=int, default=256, help="size of the JPEGs on disk (224 = pre-resized)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="featcache loader workers (default: featcache's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()

    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from featcache.backbones import load_backbone
    from featcache.extraction import ExtractConfig, RunOptions, default_workers, prepare_backbone, resolve_device, run_extraction

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    make_jpegs(tmp / "data", args.images, args.image_px)
    model_dir = tmp / "model"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=224, patch_size=16, **PRESETS[args.preset])).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(model_dir)

    # bare forward over pre-decoded, pre-processed tensors
    bb = load_backbone(str(model_dir)).to(device)
    files = sorted((tmp / "data").rglob("*.jpg"))
    pixels = torch.cat([bb.processor(images=Image.open(f).convert("RGB"), return_tensors="pt")["pixel_values"]
                        for f in files]).to(device)
    amp = args.amp and device.type == "cuda"

    def bare() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for i in range(0, len(pixels), args.batch_size):
                out = bb.model(pixel_values=pixels[i:i + args.batch_size]).last_hidden_state
                _ = out[:, 0].float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(pixels) / (time.perf_counter() - t)

    cfg = ExtractConfig(model=str(model_dir))
    prepared = prepare_backbone(cfg)
    prepared[0].to(device)
    workers = default_workers() if args.workers is None else args.workers

    def featcache_run(i: int) -> float:
        run = RunOptions(batch_size=args.batch_size, workers=workers, device=str(device), amp=args.amp, progress=False)
        summary = run_extraction(cfg, tmp / "data", tmp / f"out{i}.h5", run, backbone=prepared)
        (tmp / f"out{i}.h5").unlink()
        return summary.images_per_second

    bare()  # warm-up
    bare_rates, fc_rates = [], []
    for i in range(args.repeats):  # interleaved so machine noise hits both alike
        bare_rates.append(bare())
        fc_rates.append(featcache_run(i))
    b, f = statistics.median(bare_rates), statistics.median(fc_rates)
    print(f"preset={args.preset} images={args.images} jpeg_px={args.image_px} batch={args.batch_size} "
          f"workers={workers} device={device} amp={amp} torch_threads={torch.get_num_threads()}")
    print(f"bare forward      : {b:8.2f} images/s  (runs: {', '.join(f'{r:.2f}' for r in bare_rates)})")
    print(f"featcache extract : {f:8.2f} images/s  (runs: {', '.join(f'{r:.2f}' for r in fc_rates)})")
    print(f"ratio extract/bare: {f / b:.3f}")


if __name__ == "__main__":
    main()
