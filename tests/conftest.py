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
