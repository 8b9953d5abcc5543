"""Train / val / test inputs of a head, resolved from a feature file.

Picks the splits (holding validation rows out of train, by group, when the file has no val
split), loads the rows into one float32 tensor per split (on the GPU when there is one) or plans
to stream them by contiguous blocks when a token cache is larger than the memory budget, and
standardises features with the training rows' mean and std. Heads, sweeps and predict read
what this module returns; nothing here knows about training recipes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from featcache.loader import TokenBlockLoader
from featcache.splitting import holdout_split
from featcache.names import VAL_SPLIT
from featcache.store import (FeatureStore, check_distinct_splits, check_finite, check_labels, read_rows,
                             resolve_val_split)


@dataclass(frozen=True)
class SplitChoice:
    """Which splits a head trains, selects and is tested on."""

    train: str = "train"                 # split to fit on
    val: str | None = None               # None: "val" when the file has it, else held out from train
    test: str | None = None              # None: "test" when the file has it
    val_fraction: float = 0.1            # held-out share of train when there is no val split
    seed: int = 0                        # seed of the held-out rows


@dataclass
class SplitData:
    """Inputs and labels of one split: x is a tensor in memory, or None when streamed."""

    name: str
    rows: np.ndarray                     # file rows
    y: torch.Tensor                      # (N,) int64 or (N, C) float for multi-label
    x: torch.Tensor | None               # (N, D) or (N, T, D) float32, or None when streamed
    groups: list[str] | None = None


@dataclass
class CachedSplits:
    """Train / val / test inputs resolved from a feature file for one input kind."""

    store: FeatureStore
    train: SplitData
    val: SplitData
    test: SplitData | None
    classes: list[str]
    multilabel: bool
    in_dim: int
    num_tokens: int | None
    streamed: bool
    val_source: str                      # "split 'val'" or "N rows held out from 'train'"
    features: str                        # feature kind, or "tokens"
    mean: torch.Tensor | None = None     # per-feature train mean (standardize), applied to every split
    std: torch.Tensor | None = None      # per-feature train std


def resolve_split_names(store: FeatureStore, choice: SplitChoice) -> tuple[str, str | None, str | None]:
    """(train, val or None = hold out, test or None), refusing names the file does not have."""
    have = ", ".join(store.splits)
    if choice.train not in store.splits:
        raise ValueError(f"{store.path.name} has no split {choice.train!r} to train on; it has {have}.")
    val = resolve_val_split(store.splits, choice.val or VAL_SPLIT)
    val = val if choice.val or val in store.splits else None
    if val and val not in store.splits:
        raise ValueError(f"no split {val!r} for validation; {store.path.name} has {have}.")
    test = choice.test or ("test" if "test" in store.splits else None)
    if test and test not in store.splits:
        raise ValueError(f"no split {test!r} to test on; {store.path.name} has {have}.")
    check_distinct_splits(choice.train, val, test)
    return choice.train, val, test


def labelled_rows(store: FeatureStore, split: str) -> np.ndarray:
    """Done rows of a split that carry a label, ascending."""
    view = store[split]
    rows = view.valid_index()
    labels = view.labels
    return rows[labels[rows] >= 0] if labels.ndim == 1 else rows


def load_cached_splits(store: FeatureStore, *, features: str, tokens: bool, choice: SplitChoice,
                       max_memory_gb: float, standardize: bool, device: torch.device) -> CachedSplits:
    """Pick the splits, hold out validation rows when needed, and load (or plan to stream) inputs."""
    train_name, val_name, test_name = resolve_split_names(store, choice)
    train_view = store[train_name]
    if tokens and train_view.tokens is None:
        raise ValueError(f"this head reads full tokens, but {store.path.name} has none; extract with "
                         f"--tokens full, or use --head linear/mlp.")
    streamed = False
    if tokens:
        t, d = train_view.tokens.shape[1:]
        total = sum(len(store[s].valid_index()) for s in {train_name, val_name, test_name} if s) * t * d * 4
        streamed = total > max_memory_gb * 2**30
        in_dim, num_tokens = int(d), int(t)
    else:
        in_dim, num_tokens = int(store.feature_dim(features)), None

    train_rows = labelled_rows(store, train_name)
    if len(train_rows) == 0:
        raise ValueError(f"split {train_name!r} has no labelled, extracted rows to train on.")
    if val_name:
        val_rows, val_source = labelled_rows(store, val_name), f"split {val_name!r}"
    else:
        labels = train_view.labels[train_rows]
        g = train_view.row_groups(train_rows)
        keep, hold = holdout_split(labels, g, choice.val_fraction, choice.seed)  # multi-label: by rarest finding
        train_rows, val_rows = train_rows[np.sort(keep)], train_rows[np.sort(hold)]
        val_name, val_source = train_name, f"{len(val_rows)} rows held out from {train_name!r}" + (
            " by group" if g is not None else "")
    if len(val_rows) == 0:
        raise ValueError(f"the validation rows ({val_source}) are empty: nothing to select epochs on. "
                         f"Extract a val split, or use --val-split with a split that has labelled rows.")
    test_rows = labelled_rows(store, test_name) if test_name else None
    if test_rows is not None and len(test_rows) == 0:
        raise ValueError(f"split {test_name!r} has no labelled, extracted rows to test on; pass "
                         f"--test-split with another split.")

    def make(name: str, rows: np.ndarray) -> SplitData:
        view = store[name]
        labels = view.labels[rows]
        check_labels(labels, len(store.classes), f"{store.path.name} split {name!r}")
        y = torch.as_tensor(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
        if streamed:
            x = None
        elif tokens:
            arr = read_rows(view.tokens, rows).astype(np.float32)
            check_finite(arr, f"{store.path.name} split {name!r} tokens")
            x = torch.from_numpy(arr).to(device)
        else:
            x = torch.from_numpy(view.features(features, rows)).to(device)
        groups = view.groups
        return SplitData(name, rows, y.to(device), x, None if groups is None else [groups[i] for i in rows])

    cached = CachedSplits(store, make(train_name, train_rows), make(val_name, val_rows),
                        make(test_name, test_rows) if test_name else None, store.classes,
                        store.multilabel, in_dim, num_tokens, streamed, val_source,
                        "tokens" if tokens else features)
    warn_single_class(cached)
    if standardize:
        cached.mean, cached.std = feature_stats(cached, device)
        for split in (cached.train, cached.val, cached.test):
            if split is not None and split.x is not None:
                split.x = (split.x - cached.mean) / cached.std
    return cached


def warn_single_class(cached: CachedSplits) -> None:
    """A split with one class trains or scores trivially (accuracy 0 or 1, AUROC undefined): refuse
    for train, warn for val (epochs cannot be ranked by anything but loss)."""
    if cached.multilabel:
        return
    names = cached.classes
    train_classes = np.unique(cached.train.y.cpu().numpy())
    if train_classes.size < 2:
        raise ValueError(f"split {cached.train.name!r} has a single class ({names[int(train_classes[0])]}); a head "
                         f"needs at least two classes to learn anything.")
    val_classes = np.unique(cached.val.y.cpu().numpy())
    if val_classes.size < 2:
        warnings.warn(f"the validation rows ({cached.val_source}) hold a single class "
                      f"({names[int(val_classes[0])]}): accuracy there only counts how often the head "
                      f"predicts {names[int(val_classes[0])]} and AUROC is undefined, so early stopping is close "
                      f"to arbitrary. Use --metric loss or a larger val split.",
                      stacklevel=3)


def feature_stats(cached: CachedSplits, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (ddof 1) of the training inputs (over rows, and tokens for token
    heads); std 1 where a feature is constant on train."""
    if cached.train.x is not None:
        x = cached.train.x.reshape(-1, cached.train.x.shape[-1])
        return x.mean(0), unit_where_constant(x.std(0), x.amax(0) == x.amin(0))
    # block by block in float64, merged by Chan et al.'s pairwise rule (each block's own mean and
    # sum of squared deviations): mean of squares minus squared mean lost the std of features far
    # from zero (1000 +- 0.001: relative error 1e-4, against 4e-8 in memory)
    mean = m2 = lo = hi = None
    count = 0
    for x, _ in TokenBlockLoader(cached.store.path, cached.train.name, "tokens", rows=cached.train.rows,
                                 batch_size=1024, shuffle=False):
        x = x.reshape(-1, x.shape[-1]).double()
        n_b, mean_b = x.shape[0], x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if mean is None:
            mean, m2 = mean_b, m2_b
        else:
            delta = mean_b - mean
            mean = mean + delta * (n_b / (count + n_b))
            m2 = m2 + m2_b + delta * delta * (count * n_b / (count + n_b))
        lo = x.amin(0) if lo is None else torch.minimum(lo, x.amin(0))
        hi = x.amax(0) if hi is None else torch.maximum(hi, x.amax(0))
        count += n_b
    std = (m2 / max(count - 1, 1)).sqrt()
    return mean.float().to(device), unit_where_constant(std.float(), hi == lo).to(device)


def unit_where_constant(std: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """Std 1 for features constant on train (every train value the same: `constant`), as
    scikit-learn's StandardScaler does: dividing by a clamped 1e-6 turned any other value at
    val/test time into a z-score of ~1e4 that a weight never trained on decided the prediction.
    Constant is exact equality, never a size: a real feature of std 2e-7 around 0 (small-norm
    backbones) or of two values 1000.000 and 1000.001 is scaled, as StandardScaler scales it."""
    return torch.where(constant | (std == 0), torch.ones_like(std), std)


def epoch_batches(cached: CachedSplits, split: SplitData, batch_size: int, gen: torch.Generator, epoch: int,
                  shuffle: bool, sample_weights: torch.Tensor | None, seed: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of one epoch: index gathers in memory, or contiguous blocks from disk."""
    n = len(split.rows)
    if split.x is not None:
        if not shuffle:
            order = torch.arange(n)
        elif sample_weights is not None:
            order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        order = order.to(split.x.device)
        x, y = (split.x[order], split.y[order]) if shuffle else (split.x, split.y)  # one gather per epoch
        for i in range(0, n, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    loader = TokenBlockLoader(cached.store.path, split.name, "tokens", rows=split.rows, batch_size=batch_size,
                              shuffle=shuffle, seed=seed)
    loader.set_epoch(epoch)
    position = {int(r): i for i, r in enumerate(split.rows)}
    device = split.y.device
    for x, rows in loader:
        check_finite(x.numpy(), f"{cached.store.path.name} split {split.name!r} tokens")
        idx = torch.as_tensor([position[int(r)] for r in rows], device=device)
        x = x.to(device)
        yield (x if cached.mean is None else (x - cached.mean) / cached.std), split.y[idx]
