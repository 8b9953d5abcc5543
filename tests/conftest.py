"""Shared fixtures: small real data (scikit-learn's digits) and tiny models built in the test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real scanned digits as 64-d float32 vectors, split 60/20/20 train/val/test (fixed seed)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order].astype(np.float32) / 16.0, y[order].astype(np.int64)
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    """240 rows of 9 random tokens x 8 dims in 3 classes (train/val/test 160/40/40); the class
    shows in one feature dimension of every token, so token heads can learn it."""
    from featcache.store import write_arrays

    rng = np.random.default_rng(0)
    n, t, d = 240, 9, 8
    y = rng.integers(0, 3, n)
    tokens = rng.normal(size=(n, t, d)).astype(np.float32)
    tokens[np.arange(n), :, y] += 1.0
    path = tmp_path_factory.mktemp("tokens") / "tok.h5"
    cut = {"train": slice(0, 160), "val": slice(160, 200), "test": slice(200, 240)}
    write_arrays(path, {k: {"cls": tokens[s, 0], "pooled": tokens[s].mean(1), "tokens": tokens[s], "labels": y[s]}
                        for k, s in cut.items()}, ["a", "b", "c"], {"model": "tok"})
    return path


@pytest.fixture(scope="session")
def digits_feature_file(tmp_path_factory, digits_arrays) -> Path:
    """A complete featcache file whose cls/pooled are the digits vectors (no backbone needed)."""
    from featcache.store import write_arrays

    path = tmp_path_factory.mktemp("digits") / "digits.h5"
    splits = {}
    for name, (x, y) in digits_arrays.items():
        splits[name] = {"cls": x, "pooled": np.sqrt(x), "labels": y,
                        "paths": [f"{name}/{y[i]}/{i:05d}.png" for i in range(len(y))]}
    write_arrays(path, splits, [str(c) for c in range(10)],
                 {"model": "digits-pixels", "tokens": "none", "dtype": "float32"})
    return path


# ------------------------------------------------------------------------------------------------
# tiny backbones of every supported family, saved like hub checkpoints and loaded by path
# ------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def _build_tiny(kind: str, path: Path) -> Path:
    import torch
    from transformers import (BitImageProcessor, ConvNextImageProcessor, DeiTConfig, DeiTModel,
                              Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel, ResNetConfig, ResNetModel, ViTConfig,
                              ViTImageProcessor, ViTModel)

    torch.manual_seed(0)
    vit_proc = ViTImageProcessor(size={"height": 32, "width": 32})
    if kind == "vit":
        model, proc = ViTModel(ViTConfig(image_size=32, patch_size=4, intermediate_size=37, **TINY)), vit_proc
    elif kind == "vit_wide":  # non-square input: an 8 x 12 patch grid
        model = ViTModel(ViTConfig(image_size=32, patch_size=4, intermediate_size=37, **TINY))
        proc = ViTImageProcessor(size={"height": 32, "width": 48})
    elif kind == "deit":  # distilled DeiT: CLS + distillation token
        model, proc = DeiTModel(DeiTConfig(image_size=32, patch_size=4, intermediate_size=37, **TINY)), vit_proc
    elif kind == "dinov2":  # resize shortest edge then centre-crop, as DINOv2's own processor
        model = Dinov2Model(Dinov2Config(image_size=32, patch_size=4, mlp_ratio=2, **TINY))
        proc = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                 do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225])
    elif kind == "dinov2_reg":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            image_size=32, patch_size=4, mlp_ratio=2, num_register_tokens=4, **TINY))
        proc = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 do_center_crop=True)
    elif kind == "resnet":
        model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        proc = ConvNextImageProcessor(size={"shortest_edge": 32})
    else:
        raise ValueError(kind)
    # at init DeiT's CLS and distillation tokens, DINOv2's registers and ViT-family position
    # embeddings are zeros (or alike): token 0 and token 1 would then be equal, and a test could not
    # tell the CLS token from the distillation token or a register
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cls_token", "distillation_token", "register_tokens", "position_embeddings"):
                param.normal_(0.0, 0.02)  # the scale of the other weights at init: images still matter
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Directories of tiny randomly initialised ViT (square and 32x48 input), DeiT (distilled), DINOv2
    (+4 registers) and ResNet: the one set every test file uses."""
    root = tmp_path_factory.mktemp("models")
    return {k: _build_tiny(k, root / k) for k in ("vit", "vit_wide", "deit", "dinov2", "dinov2_reg", "resnet")}


@pytest.fixture(scope="session")
def tiny_vit(tiny_models) -> Path:
    return tiny_models["vit"]


def assert_png(path: Path, min_side: int = 100) -> None:
    """A real, non-blank picture: a PNG that opens, of a sensible size, with more than one colour."""
    from PIL import Image

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        assert min(img.size) >= min_side, f"{path} is only {img.size}"
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 5, f"{path} is blank"


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest path,label,split of `rows`."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def render_digits(root: Path, per_class: int = 10, classes: tuple[int, ...] = (0, 1, 2),
                  splits: tuple[str, ...] = ("train", "test"), size: int = 32) -> Path:
    """Write real scanned digits as grayscale PNGs in root/<split>/<class>/ (sorted, deterministic)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for c in classes:
        idx = np.flatnonzero(y == c)
        for s, split in enumerate(splits):
            out = root / split / str(c)
            out.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(idx[s * per_class:(s + 1) * per_class]):
                img = Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L")
                img.resize((size, size), Image.NEAREST).save(out / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """60 real digit images (classes 0, 1, 2) as root/train|test/<class>/*.png."""
    return render_digits(tmp_path_factory.mktemp("digits_images"))


def wilson_by_patient(hits, patients=None, z: float = 1.959963984540054) -> tuple[float, float]:
    """Reference Wilson score interval (Wilson 1927) of a share of hits, written out loop by loop:
    with patients, n is divided by the design effect (Kish) of the ratio estimator's variance over
    patients, floored at 1; a share of 0 or 1 counts each patient once."""
    hits = [float(h) for h in hits]
    n, p = len(hits), sum(hits) / len(hits)
    n_eff = float(n)
    if patients is not None and len(set(patients)) < n:
        ids = sorted(set(patients))
        m = len(ids)
        if 0 < p < 1 and m > 1:
            var = 0.0
            for g in ids:
                rows = [h for h, q in zip(hits, patients) if q == g]
                var += (sum(rows) - p * len(rows)) ** 2
            var *= m / (m - 1) / n ** 2
            n_eff = n / max(var / (p * (1 - p) / n), 1.0)
        else:
            n_eff = float(m)
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * (p * (1 - p) / n_eff + z * z / (4 * n_eff ** 2)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)
