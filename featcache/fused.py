"""Fused sweeps: K heads of any kind (linear, mlp, mixer, attn) trained as one batched model.

The K configurations of a sweep differ only in lr, weight decay and feature choice; they share the
seed, so they share the initial weights, the batch order and (for heads with dropout) the dropout
masks. Per feature choice the K_f heads' parameters are stacked on a leading axis
(`torch.func.stack_module_state`) and run with `functional_call` under `vmap`: each batch is
gathered (or, for a streamed token cache, read from disk) once and serves every head. The update
is the kernel torch.optim.AdamW/Adam(fused=True) runs, applied to each head's slice of the stacked
tensors with that head's lr and weight decay, and every head keeps its own early stopping exactly as `HeadTrainer.fit` does. Heads that have stopped
are dropped from the stack, so late epochs cost only what is still training.

Per configuration the result is that of training it alone: same init (`torch.manual_seed(seed)`
then `build_head`), same batches (`cached_splits.epoch_batches` with a generator seeded the same way), same
dropout masks (`vmap(randomness="same")` draws one mask of the unbatched shape from the global
RNG, as the head alone does; see `heads.Dropout`) and the same update kernel. Only the order of
float sums inside batched matmuls can differ, so weights agree to float32 rounding.

Memory: activations are K times those of one head (a 12-head mixer over 256 x 64 x 65 tokens holds
about 200 MiB per activation tensor); heads are not chunked.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tqdm.auto import tqdm

from featcache import loader
from featcache.cached_splits import CachedSplits, SplitData, epoch_batches
from featcache.devices import resolve_device
from featcache.heads import HeadSpec, build_head, uses_tokens
from featcache.metrics import selection_score
from featcache.prediction import PREDICT_BATCH
from featcache.store import FeatureStore
from featcache.train import HeadTrainer, TrainConfig, load_for, loss_for, row_weights, sample_weights, task_positive

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam/AdamW defaults, which HeadTrainer uses


# ------------------------------------------------------------------------------------------------
# K heads as one stacked model
# ------------------------------------------------------------------------------------------------

@dataclass
class HeadStack:
    """K heads' parameters stacked on axis 0, their Adam moments, and per-head lr / weight decay.

    `members` are the grid indices of the heads still training, in stack order."""

    template: nn.Module                   # one head: the module functional_call runs
    params: dict[str, torch.Tensor]       # name -> (K, ...) leaf tensors that require grad
    buffers: dict[str, torch.Tensor]      # name -> (K, ...)
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    lr: torch.Tensor                      # (K,)
    wd: torch.Tensor                      # (K,)
    members: list[int]
    steps: torch.Tensor | None = None     # optimizer steps taken (float32 scalar, as torch.optim keeps it)

    def keep(self, positions: list[int]) -> None:
        """Drop every head not at `positions` (heads that stopped early): later steps skip them."""
        idx = torch.as_tensor(positions, device=self.lr.device)

        def pick(d: dict[str, torch.Tensor], leaf: bool) -> dict[str, torch.Tensor]:
            return {k: v.detach()[idx].clone().requires_grad_(leaf) for k, v in d.items()}

        self.params = pick(self.params, True)
        self.buffers = pick(self.buffers, False)
        self.exp_avg, self.exp_avg_sq = pick(self.exp_avg, False), pick(self.exp_avg_sq, False)
        self.lr, self.wd = self.lr[idx], self.wd[idx]
        self.members = [self.members[i] for i in positions]

    def state_of(self, position: int) -> dict[str, torch.Tensor]:
        """One head's state_dict (a CPU copy), as `build_head(spec).load_state_dict` expects."""
        return {k: v[position].detach().clone().cpu() for d in (self.params, self.buffers) for k, v in d.items()}


def build_stack(spec: HeadSpec, seed: int, grid: list[dict[str, Any]], members: list[int],
                device: torch.device) -> HeadStack:
    """Stack the heads of `members`, each built exactly as HeadTrainer builds it: manual_seed, then
    build_head. The global RNG is left where a head trained alone leaves it (dropout draws on)."""
    template = build_head(spec).to("meta")  # before the heads: its init must not move the RNG after them
    heads = []
    for _ in members:
        torch.manual_seed(seed)
        heads.append(build_head(spec).to(device))
    params, buffers = stack_module_state(heads)
    lr = torch.tensor([grid[i]["lr"] for i in members], device=device)
    wd = torch.tensor([grid[i]["weight_decay"] for i in members], device=device)
    return HeadStack(template, params, buffers, {k: torch.zeros_like(v) for k, v in params.items()},
                     {k: torch.zeros_like(v) for k, v in params.items()}, lr, wd, list(members))


def stacked_logits(stack: HeadStack, x: torch.Tensor, train: bool) -> torch.Tensor:
    """(B, ...) inputs through the K heads -> (K, B, C). One dropout mask serves all K heads
    (randomness="same"), which is the mask each head draws alone since they share the seed."""
    stack.template.train(train)

    def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(stack.template, (params, buffers), (inputs,))

    if len(stack.members) == 1:  # a stack of one (a large head): plain kernels, no batched ones
        first = {k: v[0] for k, v in stack.params.items()}, {k: v[0] for k, v in stack.buffers.items()}
        return one(*first, x).unsqueeze(0)
    return vmap(one, in_dims=(0, 0, None), randomness="same")(stack.params, stack.buffers, x)


def adam_step(stack: HeadStack, decoupled: bool) -> None:
    """torch.optim.AdamW (decoupled=True) or Adam (L2 weight decay) on every head, each with its own
    lr and weight decay: the kernel that `AdamW(fused=True)` runs for a head alone
    (torch._fused_adamw_ / _fused_adam_), called per head on its slices of the stacked tensors, so
    given the same gradients the update is the one-by-one update exactly, and reads each tensor once
    (the gradients themselves, computed under vmap, differ from a head alone's by float rounding,
    ~1e-7: tests compare weights within 1e-5)."""
    names = list(stack.params)
    params = [stack.params[n].detach() for n in names]
    grads = [stack.params[n].grad for n in names]
    if stack.steps is None:
        stack.steps = torch.zeros((), dtype=torch.float32, device=params[0].device)
    stack.steps += 1
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    for k, (lr, wd) in enumerate(zip(stack.lr.tolist(), stack.wd.tolist())):
        kernel([p[k] for p in params], [g[k] for g in grads], [stack.exp_avg[n][k] for n in names],
               [stack.exp_avg_sq[n][k] for n in names], [], [stack.steps] * len(names), amsgrad=False, lr=lr,
               beta1=BETAS[0], beta2=BETAS[1], weight_decay=wd, eps=EPS, maximize=False)
    for n in names:
        stack.params[n].grad = None


def train_step(stack: HeadStack, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, decoupled: bool) -> torch.Tensor:
    """One optimiser step of every head on the same batch; returns the K losses. The summed loss
    has each head's own loss as its only term in that head's parameters: its gradient per head is
    the gradient that head gets alone."""
    logits = stacked_logits(stack, x, train=True)
    losses = vmap(loss_fn, in_dims=(0, None))(logits, y)
    losses.sum().backward()
    adam_step(stack, decoupled)
    return losses.detach()


def stacked_proba(stacks: list[HeadStack], cached: CachedSplits, split: SplitData, cfg: TrainConfig
                  ) -> list[np.ndarray]:
    """Per stack (K, N, C) probabilities of a split for every head, in row order: `prediction.split_proba`'s
    batches and casts, each batch read once for all stacks."""
    out: list[list[torch.Tensor]] = [[] for _ in stacks]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x, _ in epoch_batches(cached, split, max(cfg.batch_size, PREDICT_BATCH), gen, 0, False, None):
            for i, stack in enumerate(stacks):
                logits = stacked_logits(stack, x, train=False)
                out[i].append((logits.sigmoid() if cached.multilabel else logits.softmax(dim=2)).float().cpu())
    return [torch.cat(o, dim=1).numpy() if o else np.zeros((len(s.members), 0, len(cached.classes)))
            for o, s in zip(out, stacks)]


# Activations a stack of heads may hold per step: a 12-head mixer over (256, 64, 256) activations
# needs ~200 MiB per tensor and ran 2x slower fused than one by one (cache and memory traffic);
# stacks of a few heads each keep the fused path faster. Each batch still serves every stack.
STACK_ACTIVATION_BYTES = 32 * 2**20


def heads_per_stack(spec: HeadSpec, batch_size: int) -> int:
    """How many heads one stack holds: the largest per-head activation of a step, times a few for
    the backward pass, within STACK_ACTIVATION_BYTES."""
    if spec.kind == "mixer":
        widest = spec.in_dim * spec.mix_dim
    elif spec.kind == "attn":
        widest = (spec.num_tokens or 1) * spec.in_dim
    elif spec.kind == "mlp":
        widest = spec.hidden
    else:
        widest = spec.num_classes
    per_head = 4 * 4 * batch_size * widest  # float32, forward + saved + gradients
    return max(1, STACK_ACTIVATION_BYTES // per_head)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ------------------------------------------------------------------------------------------------
# per-head early stopping
# ------------------------------------------------------------------------------------------------

@dataclass
class HeadRecord:
    """One configuration's early-stopping state and history, as HeadTrainer.fit keeps them."""

    best: float = -math.inf
    best_epoch: int = -1
    waited: int = 0
    state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_at: int | None = None        # the epoch whose train loss was inf / NaN (HeadTrainer refuses it)

    @property
    def score(self) -> float:
        """The best validation score, NaN for a head that diverged (never ranked above a real one)."""
        return self.best if self.diverged_at is None else math.nan

    def update(self, epoch: int, train_loss: float, score: float, metric: str, patience: int,
               state: Any) -> bool:
        """Record one epoch; keep the weights when strictly better. False once patience runs out or
        the train loss is not finite. `state` is a callable giving the head's weights (only copied
        when they are kept)."""
        if not math.isfinite(train_loss):
            self.history.append({"epoch": epoch, "train_loss": train_loss, f"val_{metric}": math.nan})
            self.diverged_at = epoch
            return False
        self.history.append({"epoch": epoch, "train_loss": train_loss, f"val_{metric}": score})
        if score > self.best or self.state is None:  # as HeadTrainer: strictly better (or the first)
            self.best, self.best_epoch, self.waited, self.state = score, epoch, 0, state()
            return True
        self.waited += 1
        return self.waited < patience


def _epoch(stacks: list[HeadStack], cached: CachedSplits, cfg: TrainConfig, loss_fn: nn.Module,
           gen: torch.Generator, epoch: int, weights: torch.Tensor | None) -> list[list[float]]:
    """One epoch of every head still training over the shared batches (each batch read once for all
    stacks); per stack, its heads' mean train losses. Every stack starts a batch from the same RNG
    state, so each draws the dropout mask a head alone draws."""
    device = cached.train.y.device
    totals = [torch.zeros(len(s.members), dtype=torch.float64) for s in stacks]
    seen = 0
    for x, y in epoch_batches(cached, cached.train, cfg.batch_size, gen, epoch, True, weights, cfg.seed):
        state = _rng_state(device) if len(stacks) > 1 else None
        w = float(row_weights(loss_fn, y).sum())
        for stack, total in zip(stacks, totals):
            if state is not None:
                _set_rng_state(state, device)
            total += train_step(stack, loss_fn, x, y, cfg.optimizer == "adamw").double().cpu() * w
        seen += w
    return [(t / max(seen, 1)).tolist() for t in totals]


def _validate(stacks: list[HeadStack], cached: CachedSplits, cfg: TrainConfig, records: dict[int, HeadRecord],
              epoch: int, losses: list[list[float]], positive: int | None) -> list[list[int]]:
    """Score every head on validation, update its record; per stack the positions still training."""
    probas = stacked_proba(stacks, cached, cached.val, cfg)
    yv = cached.val.y.cpu().numpy()
    keeps = []
    for stack, proba, loss in zip(stacks, probas, losses):
        keep = []
        for pos, k in enumerate(stack.members):
            score = selection_score(yv, proba[pos], cfg.metric, positive)
            if records[k].update(epoch, loss[pos], score, cfg.metric, cfg.patience,
                                 lambda stack=stack, pos=pos: stack.state_of(pos)):
                keep.append(pos)
        keeps.append(keep)
    return keeps


# ------------------------------------------------------------------------------------------------
# a sweep
# ------------------------------------------------------------------------------------------------

@dataclass
class GroupRun:
    """What one feature choice's fused run learned: per grid index its record, and the cached."""

    cached: CachedSplits
    spec: HeadSpec
    records: dict[int, HeadRecord]
    bytes_per_epoch: list[int]            # bytes streamed from disk per epoch (train + val), [] in memory
    seconds: float


def train_group(cached: CachedSplits, base: TrainConfig, grid: list[dict[str, Any]], members: list[int],
                progress: bool = False) -> GroupRun:
    """Train the configurations `members` (one feature choice) as one stacked model."""
    start = time.perf_counter()
    device = cached.train.y.device
    spec = HeadSpec(base.head, cached.in_dim, len(cached.classes), cached.num_tokens, base.hidden, dropout=base.dropout)
    loss_fn = loss_for(cached, base.balance).to(device)
    weights = sample_weights(cached, base.balance)
    per_stack = heads_per_stack(spec, base.batch_size)
    stacks = [build_stack(spec, base.seed, grid, members[i:i + per_stack], device)
              for i in range(0, len(members), per_stack)]
    gen = torch.Generator().manual_seed(base.seed)
    records = {k: HeadRecord() for k in members}
    positive = task_positive(cached, base.positive_class)
    per_epoch: list[int] = []
    bar = tqdm(range(base.epochs), desc=f"sweep {len(members)} {base.head} heads", disable=not progress, unit="epoch")
    for epoch in bar:
        before = loader.bytes_read()
        losses = _epoch(stacks, cached, base, loss_fn, gen, epoch, weights)
        keeps = _validate(stacks, cached, base, records, epoch, losses, positive)
        if cached.streamed:
            per_epoch.append(loader.bytes_read() - before)
        bar.set_postfix(active=sum(map(len, keeps)), best=f"{max(r.best for r in records.values()):.4f}")
        for stack, keep in zip(stacks, keeps):
            if 0 < len(keep) < len(stack.members):
                stack.keep(keep)
        stacks = [s for s, keep in zip(stacks, keeps) if keep]
        if not stacks:
            break
    return GroupRun(cached, spec, records, per_epoch, time.perf_counter() - start)


@dataclass
class FusedSweep:
    """Every configuration of a fused sweep: leaderboard rows (grid order) and fitted trainers on demand."""

    rows: list[dict[str, Any]]
    groups: dict[str, GroupRun]
    group_of: dict[int, str]              # grid index -> group key
    bytes_read: int | None                # bytes streamed from disk by the whole sweep (None: in memory)
    bytes_per_epoch: list[int]            # per epoch, summed over groups

    def trainer(self, index: int, cfg: TrainConfig) -> HeadTrainer:
        """A fitted HeadTrainer around configuration `index`'s best weights (metrics, save, predict)."""
        run = self.groups[self.group_of[index]]
        record = run.records[index]
        model = build_head(run.spec)
        model.load_state_dict(record.state)
        model.to(run.cached.train.y.device)
        return HeadTrainer(cfg)._finish(model, run.spec, run.cached, record.history, record.best_epoch, record.best,
                                        run.seconds)


def group_key(head: str, features: str) -> str:
    """Configurations with the same key read the same inputs: the feature choice, or tokens."""
    return "tokens" if uses_tokens(head) else features


def fused_sweep(features_file: str | Path | FeatureStore, base: TrainConfig, grid: list[dict[str, Any]],
                progress: bool = False) -> FusedSweep:
    """Train every configuration of `grid` (lr, weight_decay, features) on `base`, one stacked model
    per input kind; each row reports its best epoch and validation score."""
    device = resolve_device(base.device)
    if not isinstance(features_file, FeatureStore):
        with FeatureStore(features_file) as store:
            return fused_sweep(store, base, grid, progress)
    store = features_file
    group_of = {i: group_key(base.head, g["features"]) for i, g in enumerate(grid)}
    start_bytes = loader.bytes_read()
    groups: dict[str, GroupRun] = {}
    for key in dict.fromkeys(group_of.values()):
        members = [i for i, k in group_of.items() if k == key]
        cfg = replace(base, features=grid[members[0]]["features"])
        groups[key] = train_group(load_for(store, cfg, device), cfg, grid, members, progress)
    metric = f"val_{base.metric}"
    rows = []
    for i, g in enumerate(grid):
        record = groups[group_of[i]].records[i]
        rows.append({**g, "config": i, "best_epoch": record.best_epoch, "diverged_at": record.diverged_at,
                     metric: record.score})
    epochs = max(len(r.bytes_per_epoch) for r in groups.values())
    per_epoch = [sum(r.bytes_per_epoch[e] for r in groups.values() if e < len(r.bytes_per_epoch))
                 for e in range(epochs)]
    streamed = any(r.cached.streamed for r in groups.values())
    return FusedSweep(rows, groups, group_of, loader.bytes_read() - start_bytes if streamed else None, per_epoch)
