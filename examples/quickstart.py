"""featcache quick start (`make demo`): the main job end to end on real bundled data, offline.

1. Render scikit-learn's digits (1,797 real scanned digits) as PNGs in train/val/test folders.
2. Pick a backbone: facebook/dino-vits16 when the model hub can be reached (or is cached);
   otherwise, saying so, a small ViT built and saved locally (random weights, the same
   loading code path as a hub model).
3. featcache extract -> info -> knn -> probe -> sweep -> train, each printing its table.
4. A second backbone (a small local ViT with 8 px patches, always built locally so this step works
   offline) extracted from the same images, then `featcache compare` of the two files: a ranked
   table with CIs (Wilson for top-1, a paired bootstrap for the rest and for every difference) and
   few-shot curves per backbone.
5. featcache report over every run directory, the comparison included.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

HUB_MODEL = "facebook/dino-vits16"


def render_digits(root: Path, size: int = 32) -> Path:
    """Write every digit as a grayscale PNG under root/<split>/<digit>/ (60/20/20 split, fixed seed)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    cuts = {"train": order[: int(0.6 * len(y))], "val": order[int(0.6 * len(y)): int(0.8 * len(y))],
            "test": order[int(0.8 * len(y)):]}
    for split, idx in cuts.items():
        for i in idx:
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L")
            img.resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    return root


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when the hub answers on port 443 (offline mode set means no)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def local_vit(path: Path, patch_size: int = 4, seed: int = 0) -> Path:
    """A small ViT (32 px input, 4 px patches: 65 tokens) with random weights, saved like a hub model."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=32, patch_size=patch_size, hidden_size=96, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=192)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def featcache(*args: str) -> None:
    """Run one featcache command exactly as a user would type it."""
    print(f"\n$ featcache {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "featcache", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="working directory for the demo's files")
    parser.add_argument("--model", default=None, help="backbone to use instead of the automatic choice")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = render_digits(out / "digits")
    print(f"rendered scikit-learn's digits into {data} (train/val/test)")

    if args.model:
        model = args.model
    elif hub_reachable() or hub_cached(HUB_MODEL):
        model = HUB_MODEL
        print(f"using {HUB_MODEL} from the model hub")
    else:
        model = str(local_vit(out / "small-vit"))
        print(f"NOTE: the model hub cannot be reached from this machine, so the demo uses a small "
              f"randomly initialised ViT built locally in {model} (same loading path as a hub id). "
              f"Numbers below measure that random backbone, not DINO.")

    feats = str(out / "digits.h5")
    featcache("extract", "--model", model, "--data", str(data), "--out", feats, "--tokens", "full")
    featcache("info", feats)
    featcache("knn", feats, "--train-split", "train", "--eval-split", "test", "--k", "10,20",
              "--out", str(out / "runs" / "knn"), "--quiet")
    featcache("probe", feats, "--train-split", "train", "--val-split", "val", "--test-split", "test",
              "--out", str(out / "runs" / "probe"), "--quiet")
    featcache("sweep", feats, "--head", "linear", "--lr", "1e-4,1e-3,1e-2", "--wd", "0,1e-2",
              "--features", "cls,pooled,cls+pooled", "--epochs", "100", "--out", str(out / "runs" / "sweep"),
              "--quiet")
    featcache("train", feats, "--head", "mixer", "--epochs", "15", "--out", str(out / "runs" / "mixer"), "--quiet")

    # a second backbone on the same images, then both side by side with paired confidence intervals
    second = str(local_vit(out / "small-vit-p8", patch_size=8, seed=1))
    print(f"\nsecond backbone for the comparison: a small random ViT with 8 px patches, built locally in {second}")
    feats_b = str(out / "digits_vit_p8.h5")
    featcache("extract", "--model", second, "--data", str(data), "--out", feats_b)
    featcache("compare", feats, feats_b, "--k", "20", "--bootstrap", "1000", "--shots", "1,5,10", "--tries", "3",
              "--json", str(out / "compare.json"), "--out", str(out / "runs" / "compare"))
    featcache("report", str(out / "runs" / "compare"), str(out / "runs" / "knn"), str(out / "runs" / "probe"),
              str(out / "runs" / "sweep"), str(out / "runs" / "mixer"), "--out", str(out / "report"))
    print(f"\nDone. Features in {feats}; report in {out / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
