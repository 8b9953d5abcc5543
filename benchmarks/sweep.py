"""Fused sweep vs heads trained one by one, side by side in one run.

Synthetic 50,000 x 768 features (cls and pooled), 10 classes, a 48-config linear grid
(4 lr x 4 weight decay x 3 feature choices), the same epochs for every config (no early stop):
ratio = time of training each config with featcache.train_head / time of one featcache.sweep.
Target (issue 4): >= 8x on the CPU machine, the sweep's best val accuracy within 0.5 points of
the one-by-one best. Also: one linear head, 10 epochs on 50,000 x 768 (target < 5 s).

Issue 2 (fused sweeps of every head kind), same method, 12 configs (4 lr x 3 weight decay):
  mlp    20,000 x 384 cls features, hidden --mlp-hidden (default 512 and 64), 10 epochs: target >= 4x
  mixer  4,000 x 65 tokens x 64 dims, 5 epochs: target >= 1.5x
  stream the mixer's token file with --max-memory-gb = a quarter of its size: bytes read from disk by
         the fused sweep (once per epoch for all heads) vs one by one (once per epoch per head)

    python benchmarks/sweep.py                                # every section, full size
    python benchmarks/sweep.py --quick                        # 10,000 rows, 12 configs (linear)
    python benchmarks/sweep.py --sections mlp,mixer,stream    # issue 2 only
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


def make_token_file(path: Path, n: int, t: int, d: int, c: int) -> None:
    """Synthetic token cache: the class shifts a few dims of every token, plus noise."""
    from featcache.store import write_arrays

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(c, d)).astype(np.float32) * 0.3

    def split(m: int) -> dict:
        y = rng.integers(0, c, m)
        tokens = centres[y][:, None, :] + rng.normal(size=(m, t, d)).astype(np.float32)
        return {"cls": tokens[:, 0], "pooled": tokens.mean(1), "tokens": tokens, "labels": y}

    write_arrays(path, {"train": split(n), "val": split(n // 4), "test": split(n // 4)},
                 [str(i) for i in range(c)], {"model": "synthetic-tokens"})


def side_by_side(path: Path, head: str, lrs: tuple, wds: tuple, **common) -> dict:
    """Time one fused featcache.sweep and the same grid as featcache.train_head calls one by one;
    also the bytes each reads from disk (streamed token caches)."""
    import featcache as fc
    from featcache.loader import bytes_read

    fc.train_head(path, head=head, lr=lrs[0], **{**common, "epochs": 1})  # warm-up (imports, page cache)
    b, t = bytes_read(), time.perf_counter()
    result = fc.sweep(path, head=head, lrs=lrs, weight_decays=wds, **common)
    sweep_t, sweep_b = time.perf_counter() - t, bytes_read() - b
    b, t = bytes_read(), time.perf_counter()
    alone = [fc.train_head(path, head=head, lr=lr, weight_decay=wd, **common).best_score_ for lr in lrs for wd in wds]
    one_t, one_b = time.perf_counter() - t, bytes_read() - b
    return {"sweep_s": sweep_t, "one_s": one_t, "ratio": one_t / sweep_t, "sweep_bytes": sweep_b, "one_bytes": one_b,
            "sweep_best": result.best["val_accuracy"], "one_best": max(alone), "k": len(alone), "fused": result.fused}


def report(title: str, r: dict, target: float) -> None:
    print(f"{title}: {r['k']} configs one by one {r['one_s']:7.2f} s (best val {r['one_best']:.4f}) | fused sweep "
          f"{r['sweep_s']:7.2f} s (best val {r['sweep_best']:.4f}, fused={r['fused']}) | ratio {r['ratio']:.2f}x "
          f"(target >= {target})")


def issue2(sections: set[str], args: argparse.Namespace) -> None:
    """mlp, mixer and streamed-mixer sweeps, fused vs one by one."""
    lrs, wds = (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-4, 1e-2)
    root = Path(tempfile.mkdtemp())
    if "mlp" in sections:
        make_file(root / "mlp.h5", 20_000, 384, 10)
        for hidden in args.mlp_hidden:
            r = side_by_side(root / "mlp.h5", "mlp", lrs, wds, hidden=hidden, epochs=10, patience=10, batch_size=256)
            report(f"mlp 20,000 x 384, hidden {hidden}, 10 epochs", r, 4)
    if sections & {"mixer", "stream"}:
        make_token_file(root / "tok.h5", 4_000, 65, 64, 10)
        common = dict(epochs=5, patience=5, batch_size=256)
    if "mixer" in sections:
        report("mixer 4,000 x 65 x 64 in memory, 5 epochs", side_by_side(root / "tok.h5", "mixer", lrs, wds, **common), 1.5)
    if "stream" in sections:
        size = (4_000 + 2 * 1_000) * 65 * 64 * 4
        budget = size / 4 / 2**30
        r = side_by_side(root / "tok.h5", "mixer", lrs, wds, max_memory_gb=budget, **common)
        report(f"mixer streamed (tokens {size / 2**20:.1f} MiB = 4 x --max-memory-gb {budget:.5f})", r, 1.5)
        train = 4_000 * 65 * 64 * 4
        print(f"  bytes read: fused sweep {r['sweep_bytes'] / 2**20:.1f} MiB, one by one {r['one_bytes'] / 2**20:.1f} MiB; "
              f"train split {train / 2**20:.1f} MiB x 5 epochs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sections", default="linear,mlp,mixer,stream")
    p.add_argument("--mlp-hidden", type=lambda v: [int(x) for x in v.split(",")], default=[512, 64])
    args = p.parse_args()
    sections = set(args.sections.split(","))
    issue2(sections, args)
    if "linear" in sections:
        linear(args)


def linear(args: argparse.Namespace) -> None:
    """Issue 4: 48 linear heads, fused vs one by one."""
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
