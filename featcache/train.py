"""Train one head on cached features (scikit-learn style), and repeat it over seeds.

Features that fit in memory live in one float32 tensor (on the GPU when there is one) and
batches are index gathers, so an epoch of a linear head on 50,000 rows costs well under a
second. Token caches larger than the memory budget are streamed by contiguous blocks
(featcache.cached_splits). Sweeps of many heads live in featcache.sweeping; predictions from a
saved run in featcache.prediction.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from featcache.cached_splits import CachedSplits, SplitChoice, epoch_batches, load_cached_splits
from featcache.devices import resolve_device
from featcache.heads import HeadSpec, build_head, num_params, uses_tokens
from featcache.metrics import (bootstrap_metrics, choose_threshold_rule, threshold_record, train_coverage_notes,
                               classification_metrics, perfect_score, resolve_positive, selection_score,
                               summarize_repeats)
from featcache.plots import evaluation_figures, learning_curve_plot
from featcache.names import BALANCE, CI_METRICS, HEAD_NAMES, OPTIMIZERS, SELECTION_METRICS
from featcache.prediction import PREDICT_BATCH, head_payload, split_proba
from featcache.runs import write_run
from featcache.store import FeatureStore, open_features, parse_feature_kind



@dataclass(frozen=True)
class TrainConfig:
    """One head's training recipe (written to config.json and the saved head)."""

    head: str = "linear"                 # linear | mlp | mixer | attn
    features: str = "cls"                # vector heads: a feature kind (cls, pooled, cls+pooled, ...); token heads: tokens
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
    positive_class: str | None = None    # binary tasks: the class sensitivity and AUROC are about; None = train minority
    device: str = "auto"                 # auto | cpu | cuda

    def check(self) -> None:
        """Refuse values no head can train with, naming the option and what is allowed."""
        for name, value, allowed in (("head", self.head, HEAD_NAMES), ("balance", self.balance, BALANCE),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("metric", self.metric, SELECTION_METRICS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if not uses_tokens(self.head):
            parse_feature_kind(self.features)
        elif self.features not in ("cls", "tokens"):
            raise ValueError(f"head {self.head!r} reads the full token sequence; --features {self.features} "
                             f"applies to linear and mlp heads only (drop --features).")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"lr, epochs and batch_size must be positive; got {self.lr}, {self.epochs}, {self.batch_size}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            # numpy's generators (streamed batch order, held-out rows) take only non-negative seeds
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}.")

    @property
    def input_kind(self) -> str:
        """What the head reads: a feature kind, or "tokens"."""
        return "tokens" if uses_tokens(self.head) else self.features

    def split_choice(self) -> SplitChoice:
        return SplitChoice(self.train_split, self.val_split, self.test_split, self.val_fraction, self.seed)


def load_for(store: FeatureStore, cfg: TrainConfig, device: torch.device, features: str | None = None) -> CachedSplits:
    """The cached splits one recipe reads (features overrides cfg.features, for sweeps)."""
    return load_cached_splits(store, features=features or cfg.features, tokens=uses_tokens(cfg.head),
                              choice=cfg.split_choice(), max_memory_gb=cfg.max_memory_gb,
                              standardize=cfg.standardize, device=device)


# ------------------------------------------------------------------------------------------------
# losses and sampling
# ------------------------------------------------------------------------------------------------

def loss_for(cached: CachedSplits, balance: str) -> nn.Module:
    """Cross-entropy (single-label) or BCE-with-logits (multi-label), class-weighted when asked."""
    y = cached.train.y
    if cached.multilabel:
        if balance == "weights":
            pos = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
            return nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
        return nn.BCEWithLogitsLoss()
    if balance == "weights":
        return nn.CrossEntropyLoss(weight=class_weights(y, len(cached.classes)))
    return nn.CrossEntropyLoss()


def row_weights(loss_fn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """What a batch's mean loss divides by, per row: its class weight for a weighted cross-entropy,
    else 1. An epoch's train loss weighs each batch by their sum, so it is the weighted loss over the
    epoch's rows (not a mean of batch means)."""
    weight = getattr(loss_fn, "weight", None)
    if weight is not None and y.dim() == 1:
        return weight[y]
    return torch.ones(len(y), device=y.device)


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean one over the classes present."""
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))


def sample_weights(cached: CachedSplits, balance: str) -> torch.Tensor | None:
    """Per-row sampling weights for class-balanced batches ("sampler"), else None. Multi-label
    files are refused: a row holds several labels, so there is no one class to balance a batch by."""
    if balance != "sampler":
        return None
    if cached.multilabel:
        raise ValueError("--balance sampler draws class-balanced batches, which a multi-label file (rows with "
                         "several labels) has no one class for; use --balance weights (BCE pos_weight per label) "
                         "or --balance none.")
    if cached.streamed:
        raise ValueError("--balance sampler draws rows by weight from memory, but these tokens are streamed from disk "
                         "in blocks (the cache exceeds --max-memory-gb), where batches would keep the raw class "
                         "mix: use --balance weights (the same balance as a weighted loss), or raise "
                         "--max-memory-gb to hold the tokens in memory.")
    y = cached.train.y.cpu()
    per_class = 1.0 / torch.bincount(y, minlength=len(cached.classes)).float().clamp(min=1)
    return per_class[y]


# ------------------------------------------------------------------------------------------------
# one head
# ------------------------------------------------------------------------------------------------

MIN_STEPS = 100  # fewer optimizer steps before early stopping: a small train split's head may not have learned


def learning_notes(history: list[dict[str, Any]], best_epoch: int, best: float, metric: str,
                   val_y: np.ndarray, classes: list[str], steps_per_epoch: int | None = None,
                   batch_size: int | None = None, max_epochs: int | None = None) -> list[str]:
    """Notes for a head that may not have learned: validation never moved past the first epoch,
    early stopping came after fewer than MIN_STEPS optimizer steps (a small train split at the
    default batch size is one step per epoch), or the chosen accuracy is below what always
    predicting the majority class scores."""
    notes = []
    steps = len(history) * steps_per_epoch if steps_per_epoch else None
    perfect = perfect_score(best, metric)
    if steps is not None and steps < MIN_STEPS and max_epochs is not None and len(history) < max_epochs and not perfect:
        notes.append(f"early stopping ended training after {steps} optimizer step(s) in all ({len(history)} epoch(s) "
                     f"of {steps_per_epoch} step(s): --batch-size {batch_size}): too few for a head to learn much; on "
                     f"a small train split lower --batch-size (e.g. 32) or raise --patience.")
    if not math.isfinite(best):  # the selection score was undefined throughout (one class in validation)
        return [f"validation {metric} was undefined at every epoch (validation holds a single class), so the "
                f"kept epoch says nothing about learning; use --metric loss or a validation split with both "
                f"classes."]
    if best_epoch == 0 and len(history) > 1 and not perfect:
        notes.append(f"validation {metric} never improved after the first epoch ({best:.4f} at epoch 0, not "
                     f"bettered in the {len(history) - 1} epoch(s) after): the head may not be learning; raise "
                     f"--lr (or --patience) and train again."
                     + (f" An epoch here is only {steps_per_epoch} optimizer step(s) (--batch-size {batch_size}): "
                        f"lower --batch-size for a small train split." if steps_per_epoch and steps_per_epoch <= 3
                        else ""))
    if metric == "accuracy" and val_y.ndim == 1 and len(val_y):
        counts = np.bincount(val_y[val_y >= 0], minlength=len(classes))
        majority = counts.max() / max(counts.sum(), 1)
        if best < majority - 1e-12:
            notes.append(f"the chosen validation accuracy {best:.4f} is below the {majority:.4f} of always "
                         f"predicting {classes[int(counts.argmax())]!r}: with imbalanced classes plain accuracy "
                         f"picks a poor epoch (the more so when --balance trades majority-class accuracy for the "
                         f"rare classes); choose by --metric balanced_accuracy, or auroc for a binary task.")
    if metric == "accuracy" and val_y.ndim == 2 and val_y.size:
        none = 1.0 - float(np.mean(val_y > 0))  # every finding called absent, scored per label at 0.5
        if best < none - 1e-12:
            notes.append(f"the chosen validation accuracy {best:.4f} (per label, at 0.5) is below the {none:.4f} of "
                         f"calling every finding absent: on multi-label files --metric accuracy rewards that while "
                         f"the class weights push rare findings' scores above 0.5, so it picks a poor epoch; choose "
                         f"by --metric auroc (or balanced_accuracy).")
    return notes


def task_positive(cached: CachedSplits, positive_class: str | None) -> int | None:
    """A binary task's positive class index (the named one, else train's minority); None otherwise.
    Epochs and configurations are selected deciding by it, as the run's metrics decide."""
    return resolve_positive(cached.classes, cached.train.y.cpu().numpy(), positive_class, cached.multilabel)


class HeadTrainer:
    """Train one head on a feature file (scikit-learn style: parameters in, `fit` returns self).

    Fitted attributes: model_, spec_, history_, best_epoch_, best_score_, classes_, positive_,
    fingerprint_, val_metrics_, test_metrics_, threshold_, num_params_, seconds_, notes_.
    """

    def __init__(self, config: TrainConfig = TrainConfig(), progress: bool = False):
        self.config = config
        self.progress = progress

    def fit(self, features_file: str | Path | FeatureStore | dict) -> "HeadTrainer":
        """Train on a feature file, an open FeatureStore, or arrays (store.open_features)."""
        cfg = self.config
        cfg.check()
        device = resolve_device(cfg.device)
        with open_features(features_file) as store:
            return self._fit(load_for(store, cfg, device), device)

    def _fit(self, cached: CachedSplits, device: torch.device) -> "HeadTrainer":
        cfg = self.config
        torch.manual_seed(cfg.seed)
        spec = HeadSpec(cfg.head, cached.in_dim, len(cached.classes), cached.num_tokens, cfg.hidden, dropout=cfg.dropout)
        model = build_head(spec).to(device)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        loss_fn = loss_for(cached, cfg.balance).to(device)
        weights = sample_weights(cached, cfg.balance)
        gen = torch.Generator().manual_seed(cfg.seed)
        history, best, best_state, best_epoch, waited = [], -math.inf, None, -1, 0
        start = time.perf_counter()
        val_y = cached.val.y.cpu().numpy()
        positive = task_positive(cached, cfg.positive_class)
        bar = tqdm(range(cfg.epochs), desc=f"train {cfg.head}", disable=not self.progress, unit="epoch")
        for epoch in bar:
            model.train()
            total, seen = 0.0, 0
            for x, y in epoch_batches(cached, cached.train, cfg.batch_size, gen, epoch, True, weights, cfg.seed):
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                w = float(row_weights(loss_fn, y).sum())
                total += loss.item() * w
                seen += w
            train_loss = total / max(seen, 1)
            if not math.isfinite(train_loss):
                raise ValueError(f"the training loss became {train_loss} at epoch {epoch} (lr {cfg.lr:g}): the "
                                 f"head diverged. Lower --lr, or keep --standardize on.")
            proba = split_proba(model, cached, cached.val, max(cfg.batch_size, PREDICT_BATCH))
            score = selection_score(val_y, proba, cfg.metric, positive)
            history.append({"epoch": epoch, "train_loss": train_loss, f"val_{cfg.metric}": score})
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{score:.4f}")
            if score > best or best_state is None:  # strictly better: ties keep the earlier, simpler epoch
                best, best_epoch, waited = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
                if waited >= cfg.patience:
                    break
        model.load_state_dict(best_state)
        self._finish(model, spec, cached, history, best_epoch, best, time.perf_counter() - start)
        return self

    def _finish(self, model: nn.Module, spec: HeadSpec, cached: CachedSplits, history: list[dict[str, Any]],
                best_epoch: int, best_score: float, seconds: float) -> "HeadTrainer":
        """Set the fitted attributes and the val/test metrics of the chosen weights."""
        cfg, store = self.config, cached.store
        self.model_, self.spec_, self.history_ = model.eval(), spec, history
        self.best_epoch_, self.best_score_, self.seconds_ = best_epoch, best_score, seconds
        self.classes_, self.fingerprint_, self.model_name_ = cached.classes, store.fingerprint, store.config.get("model")
        self.multilabel_ = cached.multilabel
        self.num_params_, self.val_source_, self.streamed_ = num_params(model), cached.val_source, cached.streamed
        self.feature_mean_, self.feature_std_ = cached.mean, cached.std
        self.features_file_ = str(store.path.resolve())  # absolute, as every run kind records it
        self.input_kind_ = cached.features
        self.split_names_ = {"train": cached.train.name, "val": cached.val.name,
                             "test": cached.test.name if cached.test is not None else None}
        self.positive_ = task_positive(cached, cfg.positive_class)
        self.threshold_: float | list[float] | None = None
        self.threshold_rule_: str | None = None
        self.threshold_untuned_: dict[str, str] = {}   # classes / labels whose rule fell back to 0.5 -> why
        leak = store.leakage_note([cached.train.name, cached.val.name, cached.test.name if cached.test else None])
        self.notes_: list[str] = [leak] if leak else []
        # whether the kept head learned: here for a head trained alone and for a sweep's best alike
        if best_epoch == cfg.epochs - 1 and cfg.epochs > 1:
            self.notes_.append(f"the best epoch is the last one ({best_epoch}): validation was still improving "
                               f"when training stopped; raise --epochs (or --lr) and train again.")
        self.notes_ += learning_notes(history, best_epoch, best_score, cfg.metric, cached.val.y.cpu().numpy(),
                                      cached.classes, -(-len(cached.train.rows) // cfg.batch_size), cfg.batch_size,
                                      cfg.epochs)
        self.train_y_ = cached.train.y.cpu().numpy()
        self.notes_ += train_coverage_notes(self.train_y_, cached.classes, cached.train.name)
        self.val_y_ = cached.val.y.cpu().numpy()
        self.val_groups_ = cached.val.groups
        self.val_proba_ = split_proba(model, cached, cached.val)
        self.test_y_ = self.test_proba_ = self.test_groups_ = None
        if cached.test is not None:
            self.test_y_ = cached.test.y.cpu().numpy()
            self.test_proba_ = split_proba(model, cached, cached.test)
            self.test_groups_ = cached.test.groups
        self.extra_metrics_: dict[str, Any] = {}
        self._score()
        return self

    def _score(self) -> None:
        """val/test metrics at the current threshold and positive class."""
        kw = dict(classes=self.classes_, threshold=self.threshold_, positive=self.positive_)
        self.val_metrics_ = classification_metrics(self.val_y_, self.val_proba_, **kw)
        self.test_metrics_ = (classification_metrics(self.test_y_, self.test_proba_, **kw)
                              if self.test_proba_ is not None else None)

    def apply_threshold(self, rule: str) -> float | list[float] | None:
        """Binary and multi-label tasks: pick the decision threshold on validation ("youden",
        "sensitivity:0.95" or a number), then recompute val and test metrics at it. Multi-label
        labels each get their own threshold. Multiclass tasks decide by argmax: any rule but the
        default 0.5 is refused there."""
        untuned: dict[str, str] = {}
        self.threshold_ = choose_threshold_rule(rule, self.val_y_, self.val_proba_, self.positive_, self.notes_,
                                                self.classes_, untuned, train_y=self.train_y_,
                                                val_groups=self.val_groups_)
        self.threshold_rule_ = rule if self.threshold_ is not None else None
        self.threshold_untuned_ = untuned
        self._score()
        if self.threshold_ is not None:
            self.extra_metrics_["threshold"] = threshold_record(rule, self.threshold_, untuned)
        return self.threshold_

    def add_bootstrap_ci(self, n_boot: int, seed: int = 0) -> dict[str, Any]:
        """95 % bootstrap CIs of the test metrics (whole groups resampled when the split has groups),
        stored under test_metrics_["ci"] with the resample bookkeeping under ["bootstrap"]."""
        if self.test_metrics_ is None:
            raise ValueError("no test split was evaluated, so there is nothing to bootstrap; give --test-split.")
        names = [m for m in CI_METRICS if self.test_metrics_.get(m) is not None]
        boot = bootstrap_metrics(self.test_y_, self.test_proba_, metrics=names, n_boot=n_boot,
                                 groups=self.test_groups_, seed=seed, threshold=self.threshold_,
                                 positive=self.positive_, label_names=self.classes_)
        boot.attach(self.test_metrics_)
        return self.test_metrics_["ci"]

    # -- saving -------------------------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        """config.json of this head's run directory."""
        return {"kind": "train", "features_file": self.features_file_, "fingerprint": self.fingerprint_,
                "model": self.model_name_, **asdict(self.config), "features": self.input_kind_,
                "splits": self.split_names_}

    def run_metrics(self) -> dict[str, Any]:
        """metrics.json of this head's run directory."""
        return {"head": self.config.head, "num_params": self.num_params_, "best_epoch": self.best_epoch_,
                f"best_val_{self.config.metric}": self.best_score_, "val_source": self.val_source_,
                "streamed": self.streamed_, "seconds": self.seconds_,
                "positive_class": None if self.positive_ is None else self.classes_[self.positive_],
                "splits": self.split_names_, "val": self.val_metrics_, "test": self.test_metrics_,
                "notes": self.notes_, **self.extra_metrics_}

    def head_payload(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of the deployable head (prediction.save_head)."""
        return head_payload(self.model_, self.spec_, classes=self.classes_, fingerprint=self.fingerprint_,
                            model_name=self.model_name_, features=self.input_kind_,
                            mean=self.feature_mean_, std=self.feature_std_, threshold=self.threshold_,
                            threshold_rule=self.threshold_rule_, threshold_untuned=self.threshold_untuned_,
                            positive=self.positive_,
                            multilabel=self.multilabel_, source="train", recipe=asdict(self.config))

    def save(self, out: str | Path, kind: str = "train", config: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None, extra_figures: Callable[[Path], None] | None = None,
             extra_json: dict[str, Any] | None = None) -> Path:
        """Write the run directory (runs.write_run): config, metrics, history, head, figures."""
        if self.test_proba_ is not None:
            split, block, y, proba = self.split_names_["test"], self.test_metrics_, self.test_y_, self.test_proba_
            groups = self.test_groups_
        else:
            split, block, y, proba = self.split_names_["val"], self.val_metrics_, self.val_y_, self.val_proba_
            groups = None

        def figures(fig_dir: Path) -> None:
            evaluation_figures(fig_dir, block, y, proba, self.classes_, split=split, threshold=self.threshold_,
                               positive=self.positive_, groups=groups)
            if self.history_:
                learning_curve_plot(self.history_, self.config.metric, fig_dir / "learning_curve",
                                    best_epoch=self.best_epoch_,
                                    title=f"{self.config.head} head on {self.input_kind_}: learning curve")
            if extra_figures is not None:
                extra_figures(fig_dir)

        return write_run(out, {**self.run_config(), **(config or {}), "kind": kind},
                         {**self.run_metrics(), **(metrics or {})}, history=self.history_,
                         head=self.head_payload(), figures=figures, extra_json=extra_json)


def train_repeats(features_file: str | Path, repeats: int, head: str = "linear", threshold: str | None = None,
                  progress: bool = False, **options: Any) -> tuple[list[HeadTrainer], dict[str, Any]]:
    """Train the same recipe with seeds seed, seed+1, ...; median ± std of every metric over them
    (the Matsoukas et al. protocol for small medical datasets). Each seed picks its own
    validation threshold with the same rule."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}.")
    seed = int(options.pop("seed", 0))
    trainers = [train_head(features_file, head=head, seed=seed + i, progress=progress, **options)
                for i in range(repeats)]
    if threshold is not None:
        for t in trainers:
            t.apply_threshold(threshold)
    # the first seed's head is the one saved and printed: the other seeds' own notes (a best epoch
    # that was the last, a threshold tuned on few cases) are added to its notes, naming the seeds
    others: dict[str, list[int]] = {}
    for i, t in enumerate(trainers[1:], start=1):
        for note in t.notes_:
            if note not in trainers[0].notes_:
                others.setdefault(note, []).append(seed + i)
    trainers[0].notes_ += [f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}: {note}"
                           for note, s in others.items()]
    summary = {"n": repeats, "seeds": [seed + i for i in range(repeats)],
               "val": summarize_repeats([t.val_metrics_ for t in trainers])}
    if all(t.test_metrics_ is not None for t in trainers):
        summary["test"] = summarize_repeats([t.test_metrics_ for t in trainers])
    return trainers, summary


def train_head(features_file: str | Path | FeatureStore | dict, head: str = "linear",
               out: str | Path | None = None, progress: bool = False, **options: Any) -> HeadTrainer:
    """Train one head (options are TrainConfig fields); write a run directory when `out` is given."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}; expected TrainConfig "
                        f"fields ({', '.join(sorted(known))}).")
    trainer = HeadTrainer(TrainConfig(head=head, **options), progress=progress).fit(features_file)
    if out is not None:
        trainer.save(out)
    return trainer
