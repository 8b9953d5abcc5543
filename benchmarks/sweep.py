"""Fused sweep vs heads trained one by one, side by side in one run.

Synthetic 50,000 x 768 features (cls and pooled), 10 classes, a 48-config linear grid
(4 lr x 4 weight decay x 3 feature choices), the same epochs for every config (no early stop):
ratio = time of training each config with featcache.train_head / time of one featcache.sweep.
Target (issue 4): >= 8x on the CPU machine, the sweep's best val accuracy within 0.5 points of
the one-by-one best. Also: one linear head, 10 epochs on 50,000 x 768 (target < 5 s).

    python benchmarks/sweep.py            # full size
    python benchmarks/sweep.py --quick    # 10,000 rows, 12 configs
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def make_file(path: Path, n: int, d: int, c: int) -> None:
    from featcache.store import write_arrays

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(c, d)).astype(np.float32) * 0.15

    def split(m: int) -> dict:
        y = rng.integers(0, c, m)
        cls = centres[y] + rng.normal(size=(m, d)).astype(np.float32)
        pooled = 0.5 * centres[y][:, ::-1] + rng.normal(size=(m, d)).astype(np.float32)
        return {"cls": cls, "pooled": np.ascontiguousarray(pooled), "labels": y}

    write_arrays(path, {"train": split(n), "val": split(n // 5), "test": split(n // 5)},
                 [str(i) for i in range(c)], {"model": "synthetic"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    import featcache as fc

    n, d = (10_000, 768) if args.quick else (50_000, 768)
    lrs, wds = (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-4, 1e-3, 1e-2)
    feats = ("cls", "pooled", "cls+pooled")
    if args.quick:
        lrs, wds = lrs[:2], wds[:2]
    path = Path(tempfile.mkdtemp()) / "sweep.h5"
    make_file(path, n, d, 10)
    common = dict(epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size)

    fc.train_head(path, lr=1e-3, epochs=1)  # warm-up: first-call imports (scipy, sklearn) are not training
    t = time.perf_counter()
    single = fc.train_head(path, lr=1e-3, **common)
    one_head = time.perf_counter() - t

    t = time.perf_counter()
    result = fc.sweep(path, lrs=lrs, weight_decays=wds, features=feats, **common)
    sweep_t = time.perf_counter() - t

    t = time.perf_counter()
    alone = []
    for f in feats:
        for lr in lrs:
            for wd in wds:
                alone.append(fc.train_head(path, lr=lr, weight_decay=wd, features=f, **common).best_score_)
    one_by_one = time.perf_counter() - t
    k = len(alone)
    print(f"{n} x {d} train, 10 classes, {k} configs, {args.epochs} epochs, batch {args.batch_size}")
    print(f"one linear head, {args.epochs} epochs (warm, incl. reading the file): {one_head:7.2f} s  (val acc {single.best_score_:.4f})")
    print(f"{k} heads one by one with train_head        : {one_by_one:7.2f} s  (best val acc {max(alone):.4f})")
    print(f"one featcache.sweep of the same grid       : {sweep_t:7.2f} s  (best val acc {result.best['val_accuracy']:.4f})")
    print(f"speed-up one-by-one / sweep: {one_by_one / sweep_t:.2f}x  (target >= 8)")
    print(f"best val accuracy difference: {100 * abs(max(alone) - result.best['val_accuracy']):.2f} points (target <= 0.5)")
    path.unlink()


if __name__ == "__main__":
    main()
