"""One shuffled epoch of full tokens through featcache's loader vs an np.memmap of the same bytes.

ratio = time of a TokenBlockLoader epoch / time of the same epoch (same shuffled block order,
same in-memory window shuffle, same float32 batches) read from an np.memmap of the dataset's
bytes. Target (issue 7): <= 1.5. Naive h5py fancy indexing `ds[sorted_idx]` is shown for
contrast (timed on a slice of the rows and scaled up, since a full epoch takes too long).
Both main readers run warm (the file is read once before timing), so the page cache is alike.

    python benchmarks/read.py              # 20,000 x 197 x 384 float16 (about 3 GB in /tmp)
    python benchmarks/read.py --small      # 2,000 rows
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from featcache.loader import BLOCK_ROWS, WINDOW_BLOCKS, TokenBlockLoader
from featcache.store import FeatureLayout, SplitSpec, StoreWriter
from featcache.tokens import TokenLayout


def make_file(path: Path, n: int, t: int, d: int) -> None:
    layout = FeatureLayout(dim=d, tokens=TokenLayout(1, None, d, t), dtype="float16")
    spec = SplitSpec(paths=[f"{i:07d}" for i in range(n)], labels=np.zeros(n, dtype=np.int64))
    rng = np.random.default_rng(0)
    with StoreWriter(path, {"model": "bench"}, ["a"], {"train": spec}, layout, overwrite=True) as w:
        for start in range(0, n, 1000):
            rows = np.arange(start, min(n, start + 1000))
            tok = rng.standard_normal((rows.size, t, d), dtype=np.float32).astype(np.float16)
            w.write("train", rows, tok[:, 0], tok.mean(1), tok)


def memmap_epoch(path: Path, loader: TokenBlockLoader) -> float:
    """The loader's exact access pattern, but slicing an np.memmap of the dataset's bytes."""
    with h5py.File(path, "r") as f:
        ds = f["train"]["tokens"]
        offset, shape, dtype = ds.id.get_offset(), ds.shape, ds.dtype
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    rng = np.random.default_rng((loader.seed, loader.epoch))
    order = rng.permutation(len(loader.blocks))
    t = time.perf_counter()
    window_x, window_r, n = [], [], 0
    for i in order:
        rows = loader.blocks[i]
        window_x.append(np.array(mm[rows[0]:rows[-1] + 1]))
        window_r.append(rows)
        if len(window_x) == loader.window_blocks or i == order[-1]:
            x, r = np.concatenate(window_x), np.concatenate(window_r)
            perm = rng.permutation(r.size)
            x, r = x[perm], r[perm]
            for b in range(0, r.size, loader.batch_size):
                n += x[b:b + loader.batch_size].astype(np.float32).shape[0]
            window_x, window_r = [], []
    return time.perf_counter() - t


def loader_epoch(loader: TokenBlockLoader) -> float:
    t = time.perf_counter()
    n = sum(r.size for _, r in loader)
    assert n == loader.rows.size
    return time.perf_counter() - t


def naive_epoch(path: Path, n: int, sample: int) -> float:
    """h5py fancy indexing with sorted random indices, scaled from `sample` rows to n."""
    idx = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))
    with h5py.File(path, "r") as f:
        ds = f["train"]["tokens"]
        t = time.perf_counter()
        for b in range(0, sample, 256):
            ds[idx[b:b + 256]].astype(np.float32)
        return (time.perf_counter() - t) * n / sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--small", action="store_true", help="2,000 rows")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--block-rows", type=int, default=BLOCK_ROWS)
    p.add_argument("--window-blocks", type=int, default=WINDOW_BLOCKS, help="blocks shuffled together in memory")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    n = 2_000 if args.small else args.rows
    t, d = 197, 384
    path = Path(args.dir) / f"featcache-read-bench-{os.getpid()}.h5"
    try:
        t0 = time.perf_counter()
        make_file(path, n, t, d)
        gb = n * t * d * 2 / 1e9
        print(f"wrote {n} x {t} x {d} float16 ({gb:.2f} GB) in {time.perf_counter() - t0:.1f}s")
        loader = TokenBlockLoader(path, "train", batch_size=args.batch_size, block_rows=args.block_rows,
                                  num_workers=args.workers, seed=0, window_blocks=args.window_blocks)
        loader_epoch(loader)  # warm the page cache
        fc_times, mm_times = [], []
        for epoch in range(3):
            loader.set_epoch(epoch)
            fc_times.append(loader_epoch(loader))
            mm_times.append(memmap_epoch(path, loader))
        fc, mm = min(fc_times), min(mm_times)
        naive = naive_epoch(path, n, min(n, 2_000))
        print(f"featcache TokenBlockLoader epoch : {fc:7.2f} s  ({gb / fc:.2f} GB/s)  runs {', '.join(f'{x:.2f}' for x in fc_times)}")
        print(f"np.memmap same block order       : {mm:7.2f} s  ({gb / mm:.2f} GB/s)  runs {', '.join(f'{x:.2f}' for x in mm_times)}")
        print(f"naive ds[sorted_idx] (scaled)    : {naive:7.2f} s")
        print(f"ratio loader/memmap: {fc / mm:.2f}   naive/memmap: {naive / mm:.1f}")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
