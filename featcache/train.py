"""Train heads on cached features: one trainer for one head, a fused trainer for a sweep.

Features that fit in memory live in one float32 tensor (on the GPU when there is one) and
batches are index gathers, so an epoch of a linear head on 50,000 rows costs well under a
second. Token caches larger than the memory budget are streamed by contiguous blocks
(featcache.loader). A sweep of linear heads trains every configuration as one batched model over
shared batches: each batch of features is read once for all K heads.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featcache.extraction import resolve_device
from featcache.heads import HeadSpec, build_head, num_params, uses_tokens
from featcache.store import FeatureStore, read_rows

BALANCE = ("weights", "sampler", "none")
OPTIMIZERS = ("adamw", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """One head's training recipe (written to config.json and every checkpoint)."""

    head: str = "linear"                 # linear | mlp | mixer | attn
    features: str = "cls"                # vector heads: cls | pooled | cls+pooled (token heads use tokens)
    lr: float = 1e-3                     # learning rate
    weight_decay: float = 1e-4           # decoupled (AdamW) or L2 (Adam)
    optimizer: str = "adamw"             # adamw | adam
    epochs: int = 100                    # upper bound; early stopping usually ends sooner
    batch_size: int = 256                # rows per step
    patience: int = 10                   # epochs without a better validation score before stopping
    metric: str = "accuracy"             # early-stopping metric: accuracy | balanced_accuracy | auroc | loss
    balance: str = "weights"             # weights: class-weighted loss; sampler: balanced batches; none
    seed: int = 0                        # init, batch order, held-out split
    train_split: str = "train"           # split to fit on
    val_split: str | None = None         # None: "val" when the file has it, else held out from train
    test_split: str | None = None        # None: "test" when the file has it
    val_fraction: float = 0.1            # held-out share of train when there is no val split
    hidden: int = 512                    # mlp hidden width
    dropout: float = 0.1                 # mlp / attn dropout
    max_memory_gb: float = 4.0           # token caches bigger than this are streamed from disk
    standardize: bool = True             # z-score each feature with train mean/std (MAE-style linear probing)
    device: str = "auto"                 # auto | cpu | cuda

    def check(self) -> None:
        from featcache.metrics import SELECTION_METRICS

        for name, value, allowed in (("balance", self.balance, BALANCE), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("metric", self.metric, SELECTION_METRICS),
                                     ("features", self.features, ("cls", "pooled", "cls+pooled"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"lr, epochs and batch_size must be positive; got {self.lr}, {self.epochs}, {self.batch_size}.")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """Inputs and labels of one split: x is a tensor in memory, or None when streamed."""

    name: str
    rows: np.ndarray                     # file rows
    y: torch.Tensor                      # (N,) int64 or (N, C) float for multi-label
    x: torch.Tensor | None               # (N, D) or (N, T, D) float32, or None when streamed
    groups: list[str] | None = None


@dataclass
class Dataset:
    """Train / val / test inputs resolved from a feature file for one head kind."""

    store: FeatureStore
    train: SplitData
    val: SplitData
    test: SplitData | None
    classes: list[str]
    multilabel: bool
    in_dim: int
    num_tokens: int | None
    streamed: bool
    val_source: str                      # "split 'val'" or "held out from train"
    mean: torch.Tensor | None = None     # per-feature train mean (standardize), applied to every split
    std: torch.Tensor | None = None      # per-feature train std


def load_dataset(store: FeatureStore, cfg: TrainConfig, device: torch.device) -> Dataset:
    """Pick the splits, hold out validation rows when needed, and load (or plan to stream) inputs."""
    if cfg.train_split not in store.splits:
        raise ValueError(f"{store.path.name} has no split {cfg.train_split!r} to train on; it has "
                         f"{', '.join(store.splits)}.")
    val_name = cfg.val_split or ("val" if "val" in store.splits else None)
    if val_name and val_name not in store.splits:
        raise ValueError(f"no split {val_name!r} for validation; the file has {', '.join(store.splits)}.")
    test_name = cfg.test_split or ("test" if "test" in store.splits else None)
    if test_name and test_name not in store.splits:
        raise ValueError(f"no split {test_name!r} to test on; the file has {', '.join(store.splits)}.")
    tokens = uses_tokens(cfg.head)
    train_view = store[cfg.train_split]
    if tokens and train_view.tokens is None:
        raise ValueError(f"head {cfg.head!r} reads full tokens, but {store.path.name} has none; extract with "
                         f"--tokens full, or use --head linear/mlp.")
    streamed = False
    if tokens:
        t, d = train_view.tokens.shape[1:]
        total = sum(len(store[s].valid_index()) for s in {cfg.train_split, val_name, test_name} if s) * t * d * 4
        streamed = total > cfg.max_memory_gb * 2**30
        in_dim, num_tokens = int(d), int(t)
    else:
        in_dim, num_tokens = int(store[cfg.train_split].features(cfg.features, rows=np.arange(1)).shape[1]), None

    def split_rows(name: str) -> np.ndarray:
        view = store[name]
        rows = view.valid_index()
        labels = view.labels
        return rows[labels[rows] >= 0] if labels.ndim == 1 else rows

    train_rows = split_rows(cfg.train_split)
    if len(train_rows) == 0:
        raise ValueError(f"split {cfg.train_split!r} has no labelled, extracted rows to train on.")
    if val_name:
        val_rows, val_source = split_rows(val_name), f"split {val_name!r}"
    else:
        from featcache.splitting import holdout_split

        labels = store[cfg.train_split].labels[train_rows]
        groups = store[cfg.train_split].groups
        g = None if groups is None else [groups[i] for i in train_rows]
        strat = labels if labels.ndim == 1 else labels.argmax(1)
        keep, hold = holdout_split(strat, g, cfg.val_fraction, cfg.seed)
        train_rows, val_rows = train_rows[np.sort(keep)], train_rows[np.sort(hold)]
        val_name, val_source = cfg.train_split, f"{len(val_rows)} rows held out from {cfg.train_split!r}" + (
            " by group" if g is not None else "")

    def make(name: str, rows: np.ndarray) -> SplitData:
        view = store[name]
        labels = view.labels[rows]
        y = torch.as_tensor(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
        if streamed:
            x = None
        elif tokens:
            x = torch.from_numpy(read_rows(view.tokens, rows).astype(np.float32)).to(device)
        else:
            x = torch.from_numpy(view.features(cfg.features, rows)).to(device)
        groups = view.groups
        return SplitData(name, rows, y.to(device), x, None if groups is None else [groups[i] for i in rows])

    data = Dataset(store, make(cfg.train_split, train_rows), make(val_name, val_rows),
                   make(test_name, split_rows(test_name)) if test_name else None, store.classes,
                   store.multilabel, in_dim, num_tokens, streamed, val_source)
    if cfg.standardize:
        data.mean, data.std = feature_stats(data, cfg, device)
        for split in (data.train, data.val, data.test):
            if split is not None and split.x is not None:
                split.x = (split.x - data.mean) / data.std
    return data


def feature_stats(data: Dataset, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the training inputs (over rows, and tokens for token heads)."""
    if data.train.x is not None:
        x = data.train.x.reshape(-1, data.train.x.shape[-1])
        return x.mean(0), x.std(0).clamp(min=1e-6)
    from featcache.loader import TokenBlockLoader

    total = sq = None
    count = 0
    for x, _ in TokenBlockLoader(data.store.path, data.train.name, "tokens", rows=data.train.rows,
                                 batch_size=1024, shuffle=False):
        x = x.reshape(-1, x.shape[-1]).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = ((sq / count - mean * mean).clamp(min=0) * count / max(count - 1, 1)).sqrt()
    return mean.float().to(device), std.float().clamp(min=1e-6).to(device)


def _batches(data: Dataset, split: SplitData, cfg: TrainConfig, gen: torch.Generator, epoch: int,
             shuffle: bool, sample_weights: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        for i in range(0, n, cfg.batch_size):
            yield x[i:i + cfg.batch_size], y[i:i + cfg.batch_size]
        return
    from featcache.loader import TokenBlockLoader

    loader = TokenBlockLoader(data.store.path, split.name, "tokens", rows=split.rows, batch_size=cfg.batch_size,
                              shuffle=shuffle, seed=cfg.seed)
    loader.set_epoch(epoch)
    position = {int(r): i for i, r in enumerate(split.rows)}
    device = split.y.device
    for x, rows in loader:
        idx = torch.as_tensor([position[int(r)] for r in rows], device=device)
        x = x.to(device)
        yield (x if data.mean is None else (x - data.mean) / data.std), split.y[idx]


# ------------------------------------------------------------------------------------------------
# one head
# ------------------------------------------------------------------------------------------------

def _loss_fn(data: Dataset, cfg: TrainConfig, y: torch.Tensor) -> nn.Module:
    if data.multilabel:
        if cfg.balance == "weights":
            pos = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
            return nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
        return nn.BCEWithLogitsLoss()
    if cfg.balance == "weights":
        return nn.CrossEntropyLoss(weight=class_weights(y, len(data.classes)))
    return nn.CrossEntropyLoss()


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean one over the classes present."""
    counts = torch.bincount(y, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


def _sample_weights(data: Dataset, cfg: TrainConfig) -> torch.Tensor | None:
    if cfg.balance != "sampler" or data.multilabel:
        return None
    y = data.train.y.cpu()
    per_class = 1.0 / torch.bincount(y, minlength=len(data.classes)).float().clamp(min=1)
    return per_class[y]


def predict_proba(model: nn.Module, data: Dataset, split: SplitData, cfg: TrainConfig, multilabel: bool) -> np.ndarray:
    """Class probabilities (softmax) or per-label probabilities (sigmoid) of a split, in row order."""
    model.eval()
    out = []
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        for x, _ in _batches(data, split, replace(cfg, batch_size=max(cfg.batch_size, 1024)), gen, 0, False, None):
            logits = model(x)
            out.append((logits.sigmoid() if multilabel else logits.softmax(dim=1)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(data.classes)))


class HeadTrainer:
    """Train one head on a feature file (scikit-learn style: parameters in, `fit` returns self).

    Fitted attributes: model_, spec_, history_, best_epoch_, best_score_, classes_, fingerprint_,
    val_metrics_, test_metrics_, num_params_, seconds_.
    """

    def __init__(self, config: TrainConfig = TrainConfig(), progress: bool = False):
        self.config = config
        self.progress = progress

    def fit(self, features_file: str | Path | FeatureStore) -> "HeadTrainer":
        from featcache.metrics import selection_score

        cfg = self.config
        cfg.check()
        device = resolve_device(cfg.device)
        store = features_file if isinstance(features_file, FeatureStore) else FeatureStore(features_file)
        data = load_dataset(store, cfg, device)
        torch.manual_seed(cfg.seed)
        spec = HeadSpec(cfg.head, data.in_dim, len(data.classes), data.num_tokens, cfg.hidden, dropout=cfg.dropout)
        model = build_head(spec).to(device)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        loss_fn = _loss_fn(data, cfg, data.train.y).to(device)
        weights = _sample_weights(data, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        history, best, best_state, best_epoch, waited = [], -math.inf, None, -1, 0
        start = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(range(cfg.epochs), desc=f"train {cfg.head}", disable=not self.progress, unit="epoch")
        for epoch in bar:
            model.train()
            total, seen = 0.0, 0
            for x, y in _batches(data, data.train, cfg, gen, epoch, True, weights):
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                seen += len(y)
            proba = predict_proba(model, data, data.val, cfg, data.multilabel)
            score = selection_score(data.val.y.cpu().numpy(), proba, cfg.metric)
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), f"val_{cfg.metric}": score})
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}", val=f"{score:.4f}")
            if score > best:  # strictly better: ties keep the earlier, simpler epoch
                best, best_epoch, waited = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
                if waited >= cfg.patience:
                    break
        model.load_state_dict(best_state)
        return self._finish(model, spec, data, history, best_epoch, best, time.perf_counter() - start)

    def _finish(self, model: nn.Module, spec: HeadSpec, data: Dataset, history: list[dict[str, Any]],
                best_epoch: int, best_score: float, seconds: float) -> "HeadTrainer":
        """Set the fitted attributes and the val/test metrics of the chosen weights."""
        from featcache.metrics import classification_metrics

        cfg, store = self.config, data.store
        self.model_, self.spec_, self.history_ = model.eval(), spec, history
        self.best_epoch_, self.best_score_, self.seconds_ = best_epoch, best_score, seconds
        self.classes_, self.fingerprint_, self.model_name_ = data.classes, store.fingerprint, store.config.get("model")
        self.num_params_, self.val_source_, self.streamed_ = num_params(model), data.val_source, data.streamed
        self.feature_mean_, self.feature_std_ = data.mean, data.std
        self.features_file_ = str(store.path)
        self.val_y_ = data.val.y.cpu().numpy()
        self.val_proba_ = predict_proba(model, data, data.val, cfg, data.multilabel)
        self.val_metrics_ = classification_metrics(self.val_y_, self.val_proba_, classes=data.classes)
        self.threshold_ = None
        self.test_metrics_ = self.test_proba_ = self.test_y_ = self.test_groups_ = None
        if data.test is not None and len(data.test.rows):
            self.test_y_ = data.test.y.cpu().numpy()
            self.test_proba_ = predict_proba(model, data, data.test, cfg, data.multilabel)
            self.test_groups_ = data.test.groups
            self.test_metrics_ = classification_metrics(self.test_y_, self.test_proba_, classes=data.classes)
        self.extra_metrics_: dict[str, Any] = {}
        return self

    def apply_threshold(self, rule: str) -> float | list[float] | None:
        """Binary and multi-label tasks: pick the decision threshold on validation ("youden",
        "sensitivity:0.95" or a number), then recompute val and test metrics at it. Multi-label
        labels each get their own threshold. Multiclass tasks keep the argmax (returns None)."""
        from featcache.metrics import choose_threshold, classification_metrics

        binary = self.val_proba_.shape[1] == 2 and self.val_y_.ndim == 1
        if not (binary or self.val_y_.ndim == 2):
            return None
        method, _, target = rule.partition(":")

        def pick(y: np.ndarray, scores: np.ndarray) -> float:
            if method not in ("youden", "sensitivity"):
                try:
                    return float(rule)
                except ValueError:
                    raise ValueError(f"threshold must be youden, sensitivity:TARGET or a number; got {rule!r}.") from None
            if y.min() == y.max():
                return 0.5  # one class only in validation: nothing to tune on
            return choose_threshold(y, scores, method, float(target) if target else None)

        if binary:
            t: float | list[float] = pick(self.val_y_, self.val_proba_[:, 1])
        else:
            t = [pick(self.val_y_[:, j], self.val_proba_[:, j]) for j in range(self.val_y_.shape[1])]
        self.threshold_ = t
        self.val_metrics_ = classification_metrics(self.val_y_, self.val_proba_, classes=self.classes_, threshold=t)
        if self.test_proba_ is not None:
            self.test_metrics_ = classification_metrics(self.test_y_, self.test_proba_, classes=self.classes_,
                                                        threshold=t)
        self.extra_metrics_["threshold"] = {"rule": rule, "value": t, "chosen_on": "val"}
        return t

    def add_bootstrap_ci(self, n_boot: int, seed: int = 0) -> dict[str, tuple[float, float]]:
        """95 % bootstrap CIs of the test metrics (whole groups resampled when the split has groups),
        stored under test_metrics_["ci"]."""
        from featcache.metrics import bootstrap_ci

        if self.test_metrics_ is None:
            raise ValueError("no test split was evaluated, so there is nothing to bootstrap; give --test-split.")
        names = [m for m in ("top1", "balanced_accuracy", "macro_f1", "auroc", "sensitivity", "specificity")
                 if self.test_metrics_.get(m) is not None]
        ci = bootstrap_ci(self.test_y_, self.test_proba_, metrics=names, n_boot=n_boot, groups=self.test_groups_,
                          seed=seed, threshold=self.threshold_)
        self.test_metrics_["ci"] = {k: [lo, hi] for k, (lo, hi) in ci.items()}
        return ci

    def checkpoint(self) -> dict[str, Any]:
        """What predict needs: head spec and weights, recipe, classes, the feature file's identity."""
        return {"format": "featcache-head-1", "spec": self.spec_.as_dict(), "state_dict": self.model_.state_dict(),
                "train_config": asdict(self.config), "classes": self.classes_, "fingerprint": self.fingerprint_,
                "model": self.model_name_,
                "feature_mean": None if self.feature_mean_ is None else self.feature_mean_.cpu(),
                "feature_std": None if self.feature_std_ is None else self.feature_std_.cpu()}

    def save(self, out: str | Path) -> Path:
        """Write the run directory: config.json, metrics.json, history.json, best.pt."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        config = {"kind": "train", "features_file": self.features_file_, "fingerprint": self.fingerprint_,
                  "model": self.model_name_, **cfg,
                  "features": "tokens" if uses_tokens(self.config.head) else self.config.features}
        metrics = {"kind": "train", "head": self.config.head, "num_params": self.num_params_,
                   "best_epoch": self.best_epoch_, f"best_val_{self.config.metric}": self.best_score_,
                   "val_source": self.val_source_, "streamed": self.streamed_, "seconds": self.seconds_,
                   "val": self.val_metrics_, "test": self.test_metrics_, **self.extra_metrics_}
        _write_json(out / "config.json", config)
        _write_json(out / "metrics.json", metrics)
        _write_json(out / "history.json", self.history_)
        torch.save(self.checkpoint(), out / "best.pt")
        if self.test_proba_ is not None:
            _figures(out, self.test_metrics_, self.test_y_, self.test_proba_, self.classes_, self.threshold_)
        else:
            _figures(out, self.val_metrics_, self.val_y_, self.val_proba_, self.classes_, self.threshold_)
        return out


def train_repeats(features_file: str | Path, repeats: int, head: str = "linear", threshold: str | None = None,
                  **options: Any) -> tuple[list[HeadTrainer], dict[str, Any]]:
    """Train the same recipe with seeds seed, seed+1, ...; median ± std of every metric over them
    (the Matsoukas et al. protocol for small medical datasets). Each seed picks its own
    validation threshold with the same rule."""
    from featcache.metrics import summarize_repeats

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}.")
    seed = int(options.pop("seed", 0))
    trainers = [train_head(features_file, head=head, seed=seed + i, **options) for i in range(repeats)]
    if threshold is not None:
        for t in trainers:
            t.apply_threshold(threshold)
    summary = {"n": repeats, "seeds": [seed + i for i in range(repeats)],
               "val": summarize_repeats([t.val_metrics_ for t in trainers])}
    if all(t.test_metrics_ is not None for t in trainers):
        summary["test"] = summarize_repeats([t.test_metrics_ for t in trainers])
    return trainers, summary


def train_head(features_file: str | Path, head: str = "linear", out: str | Path | None = None,
               progress: bool = False, **options: Any) -> HeadTrainer:
    """Train one head (options are TrainConfig fields); write a run directory when `out` is given."""
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}.")
    trainer = HeadTrainer(TrainConfig(head=head, **options), progress=progress).fit(features_file)
    if out is not None:
        trainer.save(out)
    return trainer


# ------------------------------------------------------------------------------------------------
# a sweep: many linear heads as one batched model
# ------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """A sweep's leaderboard (sorted by validation score) and its best head."""

    leaderboard: list[dict[str, Any]]     # one row per configuration, best first
    best: dict[str, Any]                  # the best row
    trainer: HeadTrainer                  # the best head, as if trained alone
    seconds: float
    fused: bool                           # trained as one batched model (every head kind)
    bytes_read: int | None = None         # bytes streamed from disk by the sweep (None: inputs in memory)

    def save(self, out: str | Path, heat: tuple[str, str] = ("lr", "weight_decay")) -> Path:
        out = Path(out)
        self.trainer.save(out)
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.update({"kind": "sweep", "leaderboard": self.leaderboard, "best": self.best,
                        "fused": self.fused, "sweep_seconds": self.seconds, "bytes_read": self.bytes_read})
        _write_json(out / "metrics.json", metrics)
        config = json.loads((out / "config.json").read_text())
        config.update({"kind": "sweep", "grid_size": len(self.leaderboard)})
        _write_json(out / "config.json", config)
        try:
            from featcache.plots import sweep_heatmap_plot

            metric = f"val_{self.trainer.config.metric}"
            for feats in sorted({r["features"] for r in self.leaderboard}):
                rows = [r for r in self.leaderboard if r["features"] == feats]
                sweep_heatmap_plot(rows, heat[0], heat[1], metric, out / "figures" / f"sweep_{feats.replace('+', '_')}")
        except (ImportError, ValueError):
            pass
        return out


def sweep(features_file: str | Path, head: str = "linear", lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3),
          weight_decays: Sequence[float] = (0.0, 1e-4, 1e-2), features: Sequence[str] = ("cls",),
          out: str | Path | None = None, progress: bool = False, **options: Any) -> SweepResult:
    """Train every (lr, weight decay, features) configuration and rank them on validation.

    Every head kind trains as one batched model per feature choice, each batch read once for all
    configurations (linear with AdamW: `_fused_linear_sweep`; the rest: featcache.fused). The best
    configuration is chosen by validation only; test metrics are computed for it alone.
    """
    grid = [dict(lr=float(lr), weight_decay=float(wd), features=f) for f, lr, wd in itertools.product(features, lrs, weight_decays)]
    if not grid:
        raise ValueError("the sweep grid is empty: give at least one lr, weight decay and features choice.")
    base = TrainConfig(head=head, **options)
    for g in grid:
        replace(base, **g).check()
    start = time.perf_counter()
    bytes_read = None
    if head == "linear" and base.optimizer == "adamw":
        rows, states, loaded = _fused_linear_sweep(features_file, base, grid, progress)
    else:
        from featcache.fused import fused_sweep

        run = fused_sweep(features_file, base, grid, progress)
        rows, bytes_read = run.rows, run.bytes_read
    metric = f"val_{base.metric}"
    order = sorted(range(len(rows)), key=lambda i: (-_finite(rows[i][metric]), i))
    leaderboard = [dict(rows[i], rank=r + 1) for r, i in enumerate(order)]
    best = leaderboard[0]
    best_cfg = replace(base, **{k: best[k] for k in ("lr", "weight_decay", "features")})
    if head == "linear" and base.optimizer == "adamw":
        trainer = _trainer_from_state(loaded[best_cfg.features], best_cfg, states[best["config"]], best)
    else:
        trainer = run.trainer(best["config"], best_cfg)
    result = SweepResult(leaderboard, best, trainer, time.perf_counter() - start, True, bytes_read)
    if out is not None:
        result.save(out)
    return result


def _finite(x: float) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


def _fused_linear_sweep(features_file: str | Path, base: TrainConfig, grid: list[dict[str, Any]],
                        progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]], dict[str, Dataset]]:
    """K linear heads trained at once: per feature choice one (D, K_f * C) weight matrix, per-config
    AdamW (lr, wd as tensors), the same init, batch order and early stopping as HeadTrainer."""
    from featcache.metrics import selection_score

    device = resolve_device(base.device)
    store = FeatureStore(features_file)
    kinds = sorted({g["features"] for g in grid}, key=["cls", "pooled", "cls+pooled"].index)
    data = {k: load_dataset(store, replace(base, features=k), device) for k in kinds}
    first = data[kinds[0]]
    c = len(first.classes)
    multilabel = first.multilabel
    loss_fn = _loss_fn(first, base, first.train.y)
    weights = _sample_weights(first, base)
    groups = []  # per feature choice: config indices and stacked parameters
    for kind in kinds:
        members = [i for i, g in enumerate(grid) if g["features"] == kind]
        d = data[kind].in_dim
        w = torch.empty(len(members), c, d)
        b = torch.empty(len(members), c)
        for j, _ in enumerate(members):  # exactly HeadTrainer's init: seed, then nn.Linear(d, c)
            torch.manual_seed(base.seed)
            lin = nn.Linear(d, c)
            w[j], b[j] = lin.weight.detach(), lin.bias.detach()
        lr = torch.tensor([grid[i]["lr"] for i in members], device=device)
        wd = torch.tensor([grid[i]["weight_decay"] for i in members], device=device)
        params = [w.to(device), b.to(device)]
        groups.append({"kind": kind, "members": members, "params": params, "lr": lr, "wd": wd,
                       "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]})
    k_total = len(grid)
    best = [-math.inf] * k_total
    best_epoch = [-1] * k_total
    waited = [0] * k_total
    active = [True] * k_total
    best_state: list[dict[str, torch.Tensor] | None] = [None] * k_total
    gen = torch.Generator().manual_seed(base.seed)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = len(first.train.rows)
    from tqdm.auto import tqdm

    bar = tqdm(range(base.epochs), desc=f"sweep {k_total} heads", disable=not progress, unit="epoch")
    step = 0
    for epoch in bar:
        if weights is not None:
            order = torch.multinomial(weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        order = order.to(device)
        xs = _epoch_views(data, kinds, order)                      # one gather per epoch, shared by all K
        ys = first.train.y[order]
        for i in range(0, n, base.batch_size):
            y = ys[i:i + base.batch_size]
            step += 1
            for g in groups:
                x = xs[g["kind"]][i:i + base.batch_size]
                w, b = g["params"]
                dlogits = _stacked_loss_grad(_stacked_logits(x, w, b), y, loss_fn, multilabel)  # (K, B, C)
                g_flat = dlogits.transpose(0, 1).reshape(len(y), -1)                          # (B, K*C)
                w.grad = (g_flat.T @ x).view_as(w)
                b.grad = g_flat.sum(0).view_as(b)
            with torch.no_grad():  # torch.optim.AdamW's update, with per-config lr and wd
                bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
                for g in groups:
                    for p, m, v in zip(g["params"], g["m"], g["v"]):
                        shape = (-1,) + (1,) * (p.dim() - 1)
                        lr, wd = g["lr"].view(shape), g["wd"].view(shape)
                        p.mul_(1 - lr * wd)
                        m.lerp_(p.grad, 1 - beta1)
                        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                        p.sub_(lr / bc1 * m / denom)
        with torch.no_grad():
            yv = first.val.y.cpu().numpy()
            for g in groups:
                w, b = g["params"]
                logits = _stacked_logits(data[g["kind"]].val.x, w, b)
                if base.metric == "accuracy" and not multilabel:  # all K at once, no probabilities needed
                    scores = (logits.argmax(dim=2) == first.val.y).double().mean(dim=1).tolist()
                else:
                    proba = (logits.sigmoid() if multilabel else logits.softmax(dim=2)).cpu().numpy()
                    scores = [selection_score(yv, proba[j], base.metric) for j in range(len(g["members"]))]
                for j, k in enumerate(g["members"]):
                    if not active[k]:
                        continue
                    score = scores[j]
                    if score > best[k]:
                        best[k], best_epoch[k], waited[k] = score, epoch, 0
                        best_state[k] = {"weight": w[j].detach().clone().cpu(), "bias": b[j].detach().clone().cpu()}
                    else:
                        waited[k] += 1
                        active[k] = waited[k] < base.patience
        bar.set_postfix(active=sum(active), best=f"{max(best):.4f}")
        if not any(active):
            break
    rows = [{**g, "config": i, "best_epoch": best_epoch[i], f"val_{base.metric}": best[i]} for i, g in enumerate(grid)]
    return rows, best_state, data


def _epoch_views(data: dict[str, Dataset], kinds: list[str], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """This epoch's shuffled inputs per feature choice. cls and pooled are column views of the one
    gathered cls+pooled matrix when it is in the grid (BLAS reads strided rows without a copy)."""
    if "cls+pooled" not in kinds:
        return {kind: data[kind].train.x[order] for kind in kinds}
    both = data["cls+pooled"].train.x[order]
    d = both.shape[1] // 2
    views = {"cls": both[:, :d], "pooled": both[:, d:], "cls+pooled": both}
    return {kind: views[kind] for kind in kinds}


def _stacked_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D) inputs through K linear heads (K, C, D) -> (K, B, C), as one matrix product."""
    k, c, d = w.shape
    return (x @ w.reshape(k * c, d).T + b.reshape(-1)).view(len(x), k, c).transpose(0, 1)


def _stacked_loss_grad(logits: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, multilabel: bool) -> torch.Tensor:
    """d(loss_k)/d(logits_k) for K heads at once, each exactly the gradient loss_fn would give one
    head (weighted cross-entropy mean, or BCE-with-logits mean): no autograd graph over K heads."""
    k, bsz, c = logits.shape
    if multilabel:
        p = logits.sigmoid()
        pw = loss_fn.pos_weight
        if pw is None:
            grad = p - y
        else:  # d/dz of -(pw*y*log(s) + (1-y)*log(1-s)) = (pw*y + 1 - y) * s - pw*y
            grad = (pw * y + 1 - y) * p - pw * y
        return grad / (bsz * c)
    grad = logits.softmax(dim=2)
    grad[:, torch.arange(bsz), y] -= 1
    if loss_fn.weight is None:
        return grad / bsz
    wy = loss_fn.weight[y]
    return grad * (wy / wy.sum())[None, :, None]


def _trainer_from_state(data: Dataset, cfg: TrainConfig, state: dict[str, torch.Tensor],
                        row: dict[str, Any]) -> HeadTrainer:
    """A fitted HeadTrainer around weights that the fused sweep learned (for metrics, save, predict)."""
    spec = HeadSpec("linear", data.in_dim, len(data.classes))
    model = build_head(spec)
    model.load_state_dict(state)
    model.to(resolve_device(cfg.device))
    return HeadTrainer(cfg)._finish(model, spec, data, [], row["best_epoch"], row[f"val_{cfg.metric}"], 0.0)


# ------------------------------------------------------------------------------------------------
# predictions from a saved run
# ------------------------------------------------------------------------------------------------

def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir)
    path = path / "best.pt" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a run directory written by `featcache train --out` "
                                f"or `featcache sweep --out`.")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "featcache-head-1":
        raise ValueError(f"{path} is not a featcache head checkpoint.")
    return ckpt


def predict(run_dir: str | Path, features_file: str | Path, split: str = "test") -> dict[str, Any]:
    """Probabilities of a saved head on a split, refusing features of another backbone/preprocessing."""
    ckpt = load_checkpoint(run_dir)
    store = FeatureStore(features_file)
    if store.fingerprint != ckpt["fingerprint"]:
        raise ValueError(f"the head in {run_dir} was trained on features of {ckpt.get('model')!r} (fingerprint "
                         f"{ckpt['fingerprint'][:12]}), but {Path(features_file).name} holds features of "
                         f"{store.config.get('model')!r} (fingerprint {store.fingerprint[:12]}). Predict on a file "
                         f"extracted with the same model and settings.")
    if split not in store.splits:
        raise ValueError(f"{Path(features_file).name} has no split {split!r}; it has {', '.join(store.splits)}.")
    spec = HeadSpec(**ckpt["spec"])
    model = build_head(spec)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    view = store[split]
    rows = view.valid_index()
    cfg = TrainConfig(**ckpt["train_config"])
    with torch.inference_mode():
        out = []
        for i in range(0, len(rows), 1024):
            r = rows[i:i + 1024]
            x = read_rows(view.tokens, r).astype(np.float32) if uses_tokens(spec.kind) else view.features(cfg.features, r)
            x = torch.from_numpy(x)
            if ckpt.get("feature_mean") is not None:
                x = (x - ckpt["feature_mean"]) / ckpt["feature_std"]
            logits = model(x)
            out.append((logits.sigmoid() if view.multilabel else logits.softmax(dim=1)).numpy())
    proba = np.concatenate(out) if out else np.zeros((0, spec.num_classes))
    paths = view.paths
    return {"paths": [paths[i] for i in rows], "labels": view.labels[rows], "proba": proba,
            "classes": ckpt["classes"], "multilabel": view.multilabel}


def write_predictions_csv(pred: dict[str, Any], out: str | Path, threshold: float = 0.5) -> Path:
    """image_path,probability,label,prediction (binary) or one prob_<class> column per class."""
    import csv

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes, proba = pred["classes"], pred["proba"]
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        if pred["multilabel"]:
            w.writerow(["image_path"] + [f"prob_{c}" for c in classes] + [f"label_{c}" for c in classes])
            for p, pr, lab in zip(pred["paths"], proba, pred["labels"]):
                w.writerow([p, *[f"{v:.6f}" for v in pr], *map(int, lab)])
        elif len(classes) == 2:
            w.writerow(["image_path", "probability", "label", "prediction"])
            for p, pr, lab in zip(pred["paths"], proba, pred["labels"]):
                w.writerow([p, f"{pr[1]:.6f}", classes[lab] if lab >= 0 else "", classes[int(pr[1] >= threshold)]])
        else:
            w.writerow(["image_path"] + [f"prob_{c}" for c in classes] + ["label", "prediction"])
            for p, pr, lab in zip(pred["paths"], proba, pred["labels"]):
                w.writerow([p, *[f"{v:.6f}" for v in pr], classes[lab] if lab >= 0 else "", classes[int(pr.argmax())]])
    return out


def _write_json(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(obj), indent=2, default=default) + "\n")


def _figures(out: Path, metrics: dict, y: np.ndarray, proba: np.ndarray, classes: list[str],
             threshold: float | list[float] | None) -> None:
    """Figures of the evaluated split: confusion matrix, ROC/PR with the operating point (binary and
    multi-label), reliability diagram."""
    from featcache import plots

    fig = out / "figures"
    if "confusion_matrix" in metrics:
        plots.confusion_matrix_plot(metrics["confusion_matrix"], classes, fig / "confusion_matrix")
    if y.ndim == 2 or proba.shape[1] == 2:
        t = threshold if isinstance(threshold, float) else (0.5 if y.ndim == 1 else None)
        plots.roc_pr_plot(y, proba, fig / "roc_pr", classes=classes, threshold=t)
    if y.ndim == 1:
        plots.calibration_plot(y, proba, fig / "calibration")
