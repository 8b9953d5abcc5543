"""Sweeps: train a grid of heads, rank them on validation, keep the best as a fitted HeadTrainer.

Every head kind trains its configurations as one batched model. Linear heads with AdamW take the
specialised path here: per feature kind one stacked (K, C, D) weight tensor, one gather of each
epoch's shuffled rows shared by all K heads, analytic gradients of the loss (no autograd graph
over K heads) and a stacked AdamW step with per-config lr and weight decay. Other heads (and
Adam) go through featcache.fused (stacked modules under vmap). Per configuration the result
equals training it alone (same init, batch order, updates and early stopping).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from featcache.cached_splits import CachedSplits, SplitData
from featcache.devices import resolve_device
from featcache.fused import fused_sweep
from featcache.heads import HeadSpec, build_head
from featcache.metrics import perfect_score, selection_score
from featcache.plots import sweep_heatmap_plot
from featcache.store import FeatureStore, open_features, parse_feature_kind
from featcache.train import (MIN_STEPS, HeadTrainer, TrainConfig, load_for, loss_for, row_weights, sample_weights,
                             task_positive)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which HeadTrainer uses
ADAM_EPS = 1e-8


@dataclass
class SweepResult:
    """A sweep's leaderboard (sorted by validation score) and its best head."""

    leaderboard: list[dict[str, Any]]     # one row per configuration, best first
    best: dict[str, Any]                  # the best row
    trainer: HeadTrainer                  # the best head, as if trained alone
    seconds: float
    fused: bool                           # trained as one batched model (every head kind)
    notes: list[str] = field(default_factory=list)  # e.g. the best lr sits at the edge of the grid
    bytes_read: int | None = None         # bytes streamed from disk by the sweep (None: inputs in memory)
    histories: list[list[dict[str, Any]]] = field(default_factory=list)  # per config (grid order): its epochs

    def history_rows(self) -> list[dict[str, Any]]:
        """Every configuration's settings and per-epoch history, in grid order (sweep_history.json)."""
        by_config = sorted(self.leaderboard, key=lambda r: r["config"])
        return [{k: row[k] for k in ("config", "lr", "weight_decay", "features", "rank")}
                | {"history": self.histories[row["config"]]} for row in by_config]

    def save(self, out: str | Path, heat: tuple[str, str] = ("lr", "weight_decay")) -> Path:
        """The best head's run directory, plus the leaderboard and one heat-map per feature kind."""
        metric = f"val_{self.trainer.config.metric}"
        extra = {"leaderboard": self.leaderboard, "best": self.best, "fused": self.fused,
                 "sweep_seconds": self.seconds, "bytes_read": self.bytes_read,
                 "notes": self.trainer.notes_ + self.notes}
        return self.trainer.save(out, kind="sweep", config={"grid_size": len(self.leaderboard)}, metrics=extra,
                                 extra_figures=lambda d: sweep_figures(d, self.leaderboard, heat, metric, self.best),
                                 extra_json={"sweep_history.json": self.history_rows()} if self.histories else None)


def sweep_figures(fig_dir: Path, leaderboard: list[dict[str, Any]], heat: tuple[str, str], metric: str,
                  best: dict[str, Any]) -> None:
    """One heat-map per feature kind, all on one colour range, the best cell marked."""
    values = [float(r[metric]) for r in leaderboard if r.get(metric) is not None and math.isfinite(r[metric])]
    if not values:
        return
    for feats in sorted({r["features"] for r in leaderboard}):
        rows = [r for r in leaderboard if r["features"] == feats]
        mark = (best[heat[0]], best[heat[1]]) if best["features"] == feats else None
        sweep_heatmap_plot(rows, heat[0], heat[1], metric, fig_dir / f"sweep_{feats.replace('+', '_')}",
                           value_range=(min(values), max(values)), best=mark, title=f"sweep on {feats}: {metric}")


def sweep(features_file: str | Path | FeatureStore | dict, head: str = "linear", lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3),
          weight_decays: Sequence[float] = (0.0, 1e-4, 1e-2), features: Sequence[str] = ("cls",),
          out: str | Path | None = None, progress: bool = False, threshold: str | None = None,
          **options: Any) -> SweepResult:
    """Train every (lr, weight decay, features) configuration and rank them on validation.

    Linear heads train as one batched model (each batch read once for all); other heads train one
    after another. The best configuration is chosen by validation only; test metrics are computed
    for it alone. `threshold` (binary / multi-label) is then chosen on validation for the best head.
    """
    for one, many in (("lr", "lrs"), ("weight_decay", "weight_decays")):
        if one in options:  # a TrainConfig field the grid sets: taking it silently would sweep the default grid
            raise ValueError(f"sweep() grids {one} over {many}=[...]; got {one}={options[one]!r}. Pass "
                             f"{many}=[{options[one]!r}] to train that value only.")
    lrs, weight_decays, features = _as_grid(lrs), _as_grid(weight_decays), _as_grid(features)
    grid = [dict(lr=float(lr), weight_decay=float(wd), features=f)
            for f, lr, wd in itertools.product(features, lrs, weight_decays)]
    if not grid:
        raise ValueError("the sweep grid is empty: give at least one lr, weight decay and features choice.")
    base = TrainConfig(head=head, **options)
    for g in grid:
        replace(base, **g).check()
    start = time.perf_counter()
    device = resolve_device(base.device)
    with open_features(features_file) as store:
        bytes_read = None
        if head == "linear" and base.optimizer == "adamw":
            # the specialised path: analytic gradients of K linear heads, measured faster than vmap
            rows, trainer_of, histories = _fused_linear_sweep(store, base, grid, device, progress)
        else:
            run = fused_sweep(store, base, grid, progress)
            rows, bytes_read = run.rows, run.bytes_read
            histories = [run.groups[run.group_of[i]].records[i].history for i in range(len(grid))]

            def trainer_of(row: dict[str, Any]) -> HeadTrainer:
                cfg = replace(base, **{k: row[k] for k in ("lr", "weight_decay", "features")})
                return run.trainer(row["config"], cfg)
        metric = f"val_{base.metric}"
        diverged = [r for r in rows if r["diverged_at"] is not None]
        if len(diverged) == len(rows):  # as train_head refuses a diverged head
            raise ValueError(f"the training loss became inf or NaN for every configuration (lr {_lr_list(rows)}): "
                             f"the heads diverged. Lower --lr, or keep --standardize on.")
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["diverged_at"] is not None, -_finite(rows[i][metric]), i))
        leaderboard = [dict(rows[i], rank=r + 1) for r, i in enumerate(order)]
        best = leaderboard[0]
        undefined = all(r.get(metric) is None or not math.isfinite(r[metric]) for r in leaderboard)
        trainer = trainer_of(best)
        if threshold is not None:
            trainer.apply_threshold(threshold)
    notes = ([f"validation {base.metric} is undefined for every configuration that trained (validation holds a "
              f"single class?): the ranking is the order of the grid, not a measurement; use --metric loss or "
              f"accuracy."] if undefined else grid_edge_notes(best, lrs, weight_decays))
    if diverged:
        notes.append(f"{len(diverged)} of {len(rows)} configurations diverged (training loss inf or NaN; lr "
                     f"{_lr_list(diverged)}): they are ranked last and never chosen, as train refuses such a head.")
    notes += few_steps_notes(rows, histories, -(-len(trainer.train_y_) // base.batch_size), base.batch_size,
                             base.epochs, base.metric)
    result = SweepResult(leaderboard, best, trainer, time.perf_counter() - start, True, notes, bytes_read, histories)
    if out is not None:
        result.save(out)
    return result


def _as_grid(values: Any) -> list[Any]:
    """A grid axis as a list: one value (a number, or a feature kind such as 'cls+pooled') is a grid
    of one, never iterated character by character."""
    return [values] if isinstance(values, (str, int, float)) else list(values)


def few_steps_notes(rows: Sequence[dict[str, Any]], histories: Sequence[list[dict[str, Any]]], steps_per_epoch: int,
                    batch_size: int, max_epochs: int, metric: str = "accuracy") -> list[str]:
    """A line for configurations early stopping ended after fewer than train.MIN_STEPS optimizer
    steps short of a perfect validation score: on a small train split (one step per epoch at the
    default batch size) a low lr looks as if it did not work when it merely never trained, and the
    ranking says more of --patience."""
    few = [r for r in rows if r["diverged_at"] is None and len(histories[r["config"]]) < max_epochs
           and len(histories[r["config"]]) * steps_per_epoch < MIN_STEPS
           and not perfect_score(r.get(f"val_{metric}"), metric)]
    if not few:
        return []
    return [f"{len(few)} of {len(rows)} configurations were stopped early after fewer than {MIN_STEPS} optimizer steps "
            f"({steps_per_epoch} per epoch at --batch-size {batch_size}; lr {_lr_list(few)}): their ranks say more of "
            f"--patience than of the lr; on a small train split lower --batch-size (e.g. 32) or raise --patience."]


def grid_edge_notes(best: dict[str, Any], lrs: Sequence[float], weight_decays: Sequence[float]) -> list[str]:
    """Say when the best lr or weight decay is the smallest or largest of its grid: the optimum may
    lie outside what was tried."""
    notes = []
    for name, option, values in (("lr", "--lr", lrs), ("weight_decay", "--wd", weight_decays)):
        values = sorted({float(v) for v in values})
        if len(values) < 2:
            continue
        if best[name] == values[0] and not (name == "weight_decay" and values[0] == 0):
            notes.append(f"the best {name} ({best[name]:g}) is the smallest in the grid: the optimum may be lower; "
                         f"extend {option} below {values[0]:g}.")
        elif best[name] == values[-1]:
            notes.append(f"the best {name} ({best[name]:g}) is the largest in the grid: the optimum may be higher; "
                         f"extend {option} above {values[-1]:g}.")
    return notes


def _lr_list(rows: list[dict[str, Any]]) -> str:
    """The distinct learning rates of some configurations, smallest first."""
    return ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in rows}))


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


# ------------------------------------------------------------------------------------------------
# the fused linear sweep
# ------------------------------------------------------------------------------------------------

@dataclass
class _StackedLinear:
    """K linear heads on one feature kind: parameters (K, C, D) and (K, C), per-config lr and wd,
    and AdamW moments."""

    kind: str
    members: list[int]                   # config indices of the grid
    params: list[torch.Tensor]           # [weight (K, C, D), bias (K, C)]
    lr: torch.Tensor                     # (K,)
    wd: torch.Tensor                     # (K,)
    m: list[torch.Tensor]
    v: list[torch.Tensor]


def _stack_linear(kind: str, members: list[int], grid: list[dict[str, Any]], d: int, c: int, seed: int,
                  device: torch.device) -> _StackedLinear:
    """Exactly HeadTrainer's init per member (seed, then nn.Linear(d, c)), stacked."""
    w = torch.empty(len(members), c, d)
    b = torch.empty(len(members), c)
    for j in range(len(members)):
        torch.manual_seed(seed)
        lin = nn.Linear(d, c)
        w[j], b[j] = lin.weight.detach(), lin.bias.detach()
    params = [w.to(device), b.to(device)]
    return _StackedLinear(kind, members, params,
                          torch.tensor([grid[i]["lr"] for i in members], device=device),
                          torch.tensor([grid[i]["weight_decay"] for i in members], device=device),
                          [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])


def _adamw_step(group: _StackedLinear, step: int) -> None:
    """torch.optim.AdamW's update for every member at once, with per-config lr and weight decay."""
    beta1, beta2 = ADAM_BETAS
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    with torch.no_grad():
        for p, m, v in zip(group.params, group.m, group.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = group.lr.view(shape), group.wd.view(shape)
            p.mul_(1 - lr * wd)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(ADAM_EPS)
            p.sub_(lr / bc1 * m / denom)


class _EarlyStopping:
    """Per-config best score, best epoch, patience counter and best weights, as HeadTrainer keeps them."""

    def __init__(self, k: int, patience: int):
        self.best = [-math.inf] * k
        self.best_epoch = [-1] * k
        self.waited = [0] * k
        self.active = [True] * k
        self.state: list[dict[str, torch.Tensor] | None] = [None] * k
        self.history: list[list[dict[str, Any]]] = [[] for _ in range(k)]
        self.diverged_at: list[int | None] = [None] * k  # the epoch whose train loss was inf / NaN
        self.patience = patience

    def diverge(self, k: int, epoch: int, train_loss: float, metric: str) -> None:
        """Stop a head whose train loss became non-finite, as HeadTrainer refuses it: recorded, never ranked."""
        self.history[k].append({"epoch": epoch, "train_loss": train_loss, f"val_{metric}": math.nan})
        self.diverged_at[k], self.active[k] = epoch, False

    def update(self, k: int, epoch: int, score: float, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if not self.active[k]:
            return
        if score > self.best[k] or self.state[k] is None:
            self.best[k], self.best_epoch[k], self.waited[k] = score, epoch, 0
            self.state[k] = {"weight": weight.detach().clone().cpu(), "bias": bias.detach().clone().cpu()}
        else:
            self.waited[k] += 1
            self.active[k] = self.waited[k] < self.patience


def _fused_linear_sweep(store: FeatureStore, base: TrainConfig, grid: list[dict[str, Any]], device: torch.device,
                        progress: bool) -> tuple[list[dict[str, Any]], Any, list[list[dict[str, Any]]]]:
    """K linear heads trained at once; returns the leaderboard rows, a row -> HeadTrainer function and
    each configuration's per-epoch history."""
    kinds = list(dict.fromkeys(g["features"] for g in grid))
    cached = _load_kinds(store, base, device, kinds)
    first = cached[kinds[0]]
    c = len(first.classes)
    loss_fn = loss_for(first, base.balance)
    weights = sample_weights(first, base.balance)
    groups = [_stack_linear(kind, [i for i, g in enumerate(grid) if g["features"] == kind], grid,
                            cached[kind].in_dim, c, base.seed, device) for kind in kinds]
    stop = _EarlyStopping(len(grid), base.patience)
    positive = task_positive(first, base.positive_class)
    gen = torch.Generator().manual_seed(base.seed)
    n = len(first.train.rows)
    step = 0
    start = time.perf_counter()
    bar = tqdm(range(base.epochs), desc=f"sweep {len(grid)} heads", disable=not progress, unit="epoch")
    for epoch in bar:
        order = (torch.multinomial(weights, n, replacement=True, generator=gen) if weights is not None
                 else torch.randperm(n, generator=gen)).to(device)
        xs = _epoch_views(cached, kinds, order)                      # one gather per epoch, shared by all K
        ys = first.train.y[order]
        totals = [torch.zeros(len(g.members), dtype=torch.float64, device=device) for g in groups]
        row_w = row_weights(loss_fn, ys)  # each batch weighs by its sum, kept on the device (no sync per batch)
        for i in range(0, n, base.batch_size):
            y = ys[i:i + base.batch_size]
            step += 1
            w = row_w[i:i + base.batch_size].sum()
            for g, total in zip(groups, totals):
                total += _stacked_backward(g, xs[g.kind][i:i + base.batch_size], y, loss_fn, first.multilabel) * w
                _adamw_step(g, step)
        seen = float(row_w.sum())
        losses = {k: loss / seen for g, total in zip(groups, totals) for k, loss in zip(g.members, total.tolist())}
        _validate(groups, cached, first, base.metric, epoch, stop, losses, positive)
        bar.set_postfix(active=sum(stop.active), best=f"{max(stop.best):.4f}")
        groups = [g for g in (_keep_active(g, stop) for g in groups) if g.members]  # stopped heads leave the stack
        if not groups:
            break
    rows = [{**g, "config": i, "best_epoch": stop.best_epoch[i], "diverged_at": stop.diverged_at[i],
             f"val_{base.metric}": stop.best[i] if stop.diverged_at[i] is None else math.nan}
            for i, g in enumerate(grid)]

    seconds = time.perf_counter() - start

    def trainer_of(row: dict[str, Any]) -> HeadTrainer:
        cfg = replace(base, **{k: row[k] for k in ("lr", "weight_decay", "features")})
        return _trainer_from_state(cached[cfg.features], cfg, stop.state[row["config"]], row, device,
                                   stop.history[row["config"]], seconds)

    return rows, trainer_of, stop.history


def _keep_active(g: _StackedLinear, stop: _EarlyStopping) -> _StackedLinear:
    """The stack without its heads that stopped (patience spent or diverged): they train no further."""
    keep = [j for j, k in enumerate(g.members) if stop.active[k]]
    if len(keep) == len(g.members):
        return g
    idx = torch.tensor(keep, dtype=torch.long, device=g.lr.device)
    return _StackedLinear(g.kind, [g.members[j] for j in keep], [p[idx] for p in g.params], g.lr[idx], g.wd[idx],
                          [m[idx] for m in g.m], [v[idx] for v in g.v])


def _load_kinds(store: FeatureStore, base: TrainConfig, device: torch.device,
                kinds: list[str]) -> dict[str, CachedSplits]:
    """Each feature kind's cached splits, reading the file once per composite kind: a kind that is a
    part of another kind in the grid (cls and pooled of cls+pooled) is a column slice of it, with the
    matching columns of its per-feature standardisation (z-scores are per column)."""
    out: dict[str, CachedSplits] = {}
    for kind in sorted(kinds, key=lambda k: -len(parse_feature_kind(k))):
        if kind in out:
            continue
        out[kind] = load_for(store, base, device, features=kind)
        parts = parse_feature_kind(kind)
        for p, cols in zip(parts, store.part_columns(kind)):
            if p.kind in kinds and p.kind not in out and len(parts) > 1:
                out[p.kind] = _column_slice(out[kind], cols, p.kind)
    return out


def _column_slice(cached: CachedSplits, cols: slice, kind: str) -> CachedSplits:
    """The same rows with only the columns `cols` of every input (and of mean / std)."""
    def cut(split: SplitData | None) -> SplitData | None:
        return None if split is None else dataclasses.replace(split, x=split.x[:, cols].contiguous())

    return dataclasses.replace(cached, train=cut(cached.train), val=cut(cached.val), test=cut(cached.test),
                               in_dim=cols.stop - cols.start, features=kind,
                               mean=None if cached.mean is None else cached.mean[cols].contiguous(),
                               std=None if cached.std is None else cached.std[cols].contiguous())


def _stacked_backward(g: _StackedLinear, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                      multilabel: bool) -> torch.Tensor:
    """Set .grad of the stacked parameters: the gradient each head's own loss would give it. Returns
    each head's loss on the batch (K,), as loss_fn would report it for that head alone."""
    w, b = g.params
    dlogits, loss = _stacked_loss_grad(_batch_major_logits(x, w, b), y, loss_fn, multilabel)  # (B, K, C), (K,)
    g_flat = dlogits.view(len(y), -1)                                                  # (B, K*C), no copy
    w.grad = (g_flat.T @ x).view_as(w)
    b.grad = g_flat.sum(0).view_as(b)
    return loss


def _validate(groups: list[_StackedLinear], cached: dict[str, CachedSplits], first: CachedSplits, metric: str,
              epoch: int, stop: _EarlyStopping, losses: dict[int, float], positive: int | None) -> None:
    """Score every head on validation and update its early-stopping state and history."""
    multilabel = first.multilabel
    yv = first.val.y.cpu().numpy()
    with torch.no_grad():
        for g in groups:
            w, b = g.params
            logits = _stacked_logits(cached[g.kind].val.x, w, b)
            if metric == "accuracy" and not multilabel and logits.shape[2] > 2:  # all K at once
                acc = (logits.argmax(dim=2) == first.val.y).double().mean(dim=1)
                # non-finite logits score NaN, as selection_score scores them (argmax of NaN is class 0)
                scores = torch.where(torch.isfinite(logits).all(dim=(1, 2)), acc, math.nan).tolist()
            else:
                proba = (logits.sigmoid() if multilabel else logits.softmax(dim=2)).cpu().numpy()
                scores = [selection_score(yv, proba[j], metric, positive) for j in range(len(g.members))]
            for j, k in enumerate(g.members):
                if not math.isfinite(losses[k]):
                    stop.diverge(k, epoch, losses[k], metric)
                    continue
                stop.history[k].append({"epoch": epoch, "train_loss": losses[k], f"val_{metric}": scores[j]})
                stop.update(k, epoch, scores[j], w[j], b[j])


def _epoch_views(cached: dict[str, CachedSplits], kinds: list[str], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """This epoch's shuffled inputs per feature kind. A kind whose parts are a prefix or suffix of
    another kind in the grid (cls and pooled of cls+pooled) is a column view of that kind's one
    gathered matrix (BLAS reads strided rows without a copy)."""
    views: dict[str, torch.Tensor] = {}
    for kind in sorted(kinds, key=lambda k: -len(parse_feature_kind(k))):
        if kind in views:
            continue
        x = cached[kind].train.x[order]
        views[kind] = x
        parts = parse_feature_kind(kind)
        widths = [cached[kind].store.feature_dim(p.kind) for p in parts]
        offsets = np.concatenate([[0], np.cumsum(widths)])
        for j, p in enumerate(parts):
            if p.kind in kinds and p.kind not in views:
                views[p.kind] = x[:, offsets[j]:offsets[j + 1]]
    return {kind: views[kind] for kind in kinds}


def _batch_major_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D) inputs through K linear heads (K, C, D) -> (B, K, C), as one matrix product; kept
    batch-major (contiguous) so the loss gradient and the weight gradient need no transposed copy."""
    k, c, d = w.shape
    return (x @ w.reshape(k * c, d).T + b.reshape(-1)).view(len(x), k, c)


def _stacked_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D) inputs through K linear heads (K, C, D) -> (K, B, C)."""
    return _batch_major_logits(x, w, b).transpose(0, 1)


def _stacked_loss_grad(logits: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                       multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d(loss_k)/d(logits_k) of batch-major logits (B, K, C) for K heads at once, each exactly the
    gradient loss_fn would give one head (weighted cross-entropy mean, or BCE-with-logits mean): no
    autograd graph over K heads. Also each head's loss (K,), as loss_fn reports it for that head
    alone (every configuration's train_loss history), from the same log-probabilities."""
    bsz, k, c = logits.shape
    with torch.no_grad():
        if multilabel:
            p = logits.sigmoid()
            yk = y[:, None, :]
            pw = loss_fn.pos_weight
            if pw is None:
                grad = p - yk
            else:  # d/dz of -(pw*y*log(s) + (1-y)*log(1-s)) = (pw*y + 1 - y) * s - pw*y
                grad = (pw * yk + 1 - yk) * p - pw * yk
            per = nn.functional.binary_cross_entropy_with_logits(logits, yk.to(logits.dtype).expand_as(logits),
                                                                  pos_weight=pw, reduction="none")
            return grad / (bsz * c), per.mean(dim=(0, 2))
        logp = logits.log_softmax(dim=2)
        rows = torch.arange(bsz, device=logits.device)
        nll = -logp[rows, :, y]                                                        # (B, K)
        grad = logp.exp_()                                                             # the softmax, in place
        grad[rows, :, y] -= 1
        if loss_fn.weight is None:
            return grad / bsz, nll.mean(dim=0)
        wy = loss_fn.weight[y]
        return grad * (wy / wy.sum())[:, None, None], (nll * wy[:, None]).sum(dim=0) / wy.sum()


def _trainer_from_state(cached: CachedSplits, cfg: TrainConfig, state: dict[str, torch.Tensor],
                        row: dict[str, Any], device: torch.device, history: list[dict[str, Any]],
                        seconds: float) -> HeadTrainer:
    """A fitted HeadTrainer around weights that the fused sweep learned (for metrics, save, predict)."""
    spec = HeadSpec("linear", cached.in_dim, len(cached.classes))
    model = build_head(spec)
    model.load_state_dict(state)
    model.to(device)
    return HeadTrainer(cfg)._finish(model, spec, cached, history, row["best_epoch"], row[f"val_{cfg.metric}"], seconds)
