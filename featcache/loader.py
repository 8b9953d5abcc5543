"""Streaming reads of cached features that do not fit in memory.

An epoch reads the requested rows as sorted contiguous blocks (one `read_direct` per run, never
fancy indexing on an HDF5 dataset), visits the blocks in a shuffled order, and shuffles rows
in memory within a window of a few blocks. With workers, each worker opens the file lazily in its
own process (an open h5py file is never pickled).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from featcache.store import READ_LOCKING, read_rows

_BYTES_READ = 0  # bytes of blocks delivered by every TokenBlockLoader in this process


def bytes_read() -> int:
    """Bytes of stored rows that TokenBlockLoaders in this process have read so far (all instances,
    with or without workers: counted where blocks arrive). Take differences to measure one run."""
    return _BYTES_READ


class _BlockReader(torch.utils.data.Dataset):
    """Item i = the rows of block i, read in one go; the file is opened on first use per process."""

    def __init__(self, path: Path, split: str, key: str, blocks: list[np.ndarray]):
        self.path, self.split, self.key, self.blocks = str(path), split, key, blocks
        self._file = None
        self._pid = None

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", locking=READ_LOCKING)
            self._pid = os.getpid()
        return self._file[self.split][self.key]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.blocks[i]
        return read_rows(self._dataset(), rows), rows

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None  # reopen in the worker
        return state


# 64 blocks of 64 rows shuffled together: rows sorted by class (folder and CSV sources sort by path)
# give batches near an i.i.d. class mix (majority share per batch 0.385 vs 0.364 i.i.d., 3 classes;
# 1024-row blocks x 4 gave 0.506), at the read speed of larger blocks (benchmarks/RESULTS.md)
BLOCK_ROWS = 64
WINDOW_BLOCKS = 64


class TokenBlockLoader:
    """Shuffled epochs of (x float32 tensor, file rows) batches read by contiguous blocks.

    rows: file rows to visit (default: every done row). Each row appears exactly once per epoch;
    `set_epoch` changes the order deterministically (seed + epoch).
    """

    def __init__(self, path: str | os.PathLike, split: str, key: str = "tokens", rows: np.ndarray | None = None,
                 batch_size: int = 256, block_rows: int = BLOCK_ROWS, shuffle: bool = True, seed: int = 0,
                 num_workers: int = 0, window_blocks: int = WINDOW_BLOCKS, drop_last: bool = False):
        self.path, self.split, self.key = Path(path), split, key
        with h5py.File(self.path, "r", locking=READ_LOCKING) as f:
            if key not in f[split]:
                raise ValueError(f"{self.path.name} split {split!r} has no {key!r} dataset; "
                                 f"it has {', '.join(f[split].keys())}.")
            if rows is None:
                rows = np.flatnonzero(f[split]["done"][()])
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size, self.block_rows = int(batch_size), int(block_rows)
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0
        self.num_workers, self.window_blocks, self.drop_last = int(num_workers), int(window_blocks), drop_last
        self.blocks = [self.rows[i:i + self.block_rows] for i in range(0, self.rows.size, self.block_rows)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.rows.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _block_stream(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks in `order`, each counted in bytes_read() as it arrives."""
        global _BYTES_READ
        for x, r in self._read_blocks(order):
            _BYTES_READ += x.nbytes
            yield x, r

    def _read_blocks(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        reader = _BlockReader(self.path, self.split, self.key, [self.blocks[i] for i in order])
        if self.num_workers == 0:
            for i in range(len(reader)):
                yield reader[i]
            return
        loader = torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             prefetch_factor=2, persistent_workers=False)
        yield from ((x.numpy() if torch.is_tensor(x) else x, r.numpy() if torch.is_tensor(r) else r)
                    for x, r in loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        pending_x: list[np.ndarray] = []
        pending_r: list[np.ndarray] = []
        carry_x = carry_r = None

        def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for x, r in self._block_stream(order):
                pending_x.append(x)
                pending_r.append(r)
                if len(pending_x) == self.window_blocks:
                    yield np.concatenate(pending_x), np.concatenate(pending_r)
                    pending_x.clear()
                    pending_r.clear()
            if pending_x:
                yield np.concatenate(pending_x), np.concatenate(pending_r)

        for x, r in windows():
            if self.shuffle:
                perm = rng.permutation(r.size)
                x, r = x[perm], r[perm]
            if carry_x is not None:  # rows left over from the last window start this one
                x, r = np.concatenate([carry_x, x]), np.concatenate([carry_r, r])
            full = (r.size // self.batch_size) * self.batch_size
            for i in range(0, full, self.batch_size):
                yield torch.from_numpy(x[i:i + self.batch_size].astype(np.float32)), r[i:i + self.batch_size]
            carry_x, carry_r = (x[full:], r[full:]) if full < r.size else (None, None)
        if carry_x is not None and not self.drop_last:
            yield torch.from_numpy(carry_x.astype(np.float32)), carry_r
