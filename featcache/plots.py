"""Matplotlib figures for run directories: confusion matrix, ROC/PR, k-NN curve, calibration, sweep.

Every function writes ``PATH_STEM.png`` and ``PATH_STEM.svg`` and returns both paths, so a run
directory always has a raster for quick viewing and a vector file for papers. matplotlib is
imported inside the functions (with the non-interactive Agg backend) so ``import featcache``
stays light and plotting works on headless machines.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from featcache.metrics import ECE_BINS, calibration_bins, decide

PathLike = str | os.PathLike


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (headless, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path_stem: PathLike) -> list[Path]:
    """Write fig as PNG + SVG next to each other, close it, and return both paths."""
    stem = Path(path_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    fig.tight_layout()
    # "tight": a long title or colour-bar label over a narrow heat map is never cut off
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def _as_proba(proba: np.ndarray) -> np.ndarray:
    """(N,) positive-class scores become (N, 2) probabilities; (N, C) passes through."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim == 1:
        proba = np.stack([1.0 - proba, proba], axis=1)
    return proba


def confusion_matrix_plot(cm: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str] | None,
                          path_stem: PathLike, normalize: bool = True, title: str = "confusion matrix") -> list[Path]:
    """Confusion matrix (rows = true class, columns = predicted), cells show counts and, with
    `normalize`, colour by row fraction so rare classes are as readable as common ones."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C); got shape {cm.shape}.")
    n = cm.shape[0]
    classes = [str(c) for c in (classes if classes is not None else range(n))]
    if len(classes) != n:
        raise ValueError(f"{len(classes)} class names for a {n}x{n} confusion matrix; pass one name per class.")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = min(2.0 + 0.45 * n, 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(frac if normalize else cm, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row fraction" if normalize else "count")
    if n <= 30:  # beyond that the numbers are unreadable; the colours still show the structure
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7 if n > 12 else 9,
                        color="white" if frac[i, j] > 0.5 else "black")
    step = max(1, int(np.ceil(n / 40)))  # at most ~40 labels per axis, evenly spaced, at any class count
    ticks = np.arange(0, n, step)
    shown = [classes[i] for i in ticks]
    long_names = len(ticks) * max(len(c) for c in classes) > 30
    font = 9 if len(ticks) <= 15 else 7 if len(ticks) <= 30 else 6
    ax.set_xticks(ticks, shown, rotation=90 if long_names else 0, fontsize=font)
    ax.set_yticks(ticks, shown, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path_stem)


def _operating_point(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(fpr, tpr, precision) of the binary decision score >= threshold."""
    pred = score >= threshold
    pos, neg = y == 1, y == 0
    tpr = float(pred[pos].mean()) if pos.any() else float("nan")
    fpr = float(pred[neg].mean()) if neg.any() else float("nan")
    precision = float(y[pred].mean()) if pred.any() else float("nan")
    return fpr, tpr, precision


def roc_pr_plot(y_true: np.ndarray, proba: np.ndarray, path_stem: PathLike,
                classes: Sequence[str] | None = None, threshold: float | Sequence[float] | None = None,
                positive: int | None = None, title: str | None = None, n_boot: int = 0,
                groups: Sequence[Any] | None = None) -> list[Path]:
    """ROC (left) and precision-recall (right) curves with their AUCs.

    Binary: one curve for the positive class (`positive`, default column 1), and the chosen operating point
    (`threshold`, default 0.5) marked on both. Multi-class: one-vs-rest curve per class (up to 10
    drawn, so the legend stays readable). Multi-label y (N, C): one curve per label, each with its
    operating point (`threshold`: one per label, or one for all; default 0.5) in the curve's colour.
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    plt = _pyplot()
    y_true = np.asarray(y_true)
    proba = _as_proba(proba)
    n_cls = proba.shape[1]
    names = [str(c) for c in (classes if classes is not None else range(n_cls))]
    if y_true.ndim == 2:
        onehot = (y_true > 0).astype(int)
        curves = list(range(n_cls))
    elif n_cls == 2:
        onehot = np.stack([(y_true == 0), (y_true == 1)], axis=1).astype(int)
        pos = 1 if positive is None else int(positive)
        curves = [pos]
    else:
        onehot = (y_true[:, None] == np.arange(n_cls)[None, :]).astype(int)
        curves = list(range(n_cls))
    curves = [c for c in curves if 0 < onehot[:, c].sum() < len(onehot)][:10]

    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    marked = False
    for c in curves:
        fpr, tpr, _ = roc_curve(onehot[:, c], proba[:, c])
        prec, rec, _ = precision_recall_curve(onehot[:, c], proba[:, c])
        ap = average_precision_score(onehot[:, c], proba[:, c])
        label = names[c] if c < len(names) else str(c)
        line, = ax_roc.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        ax_pr.plot(rec, prec, lw=1.5, label=f"{label} (AP {ap:.3f})")
        if y_true.ndim == 2:  # each label decides at its own threshold
            t_c = float(threshold[c]) if isinstance(threshold, (list, tuple, np.ndarray)) else \
                0.5 if threshold is None else float(threshold)
            fpr_t, tpr_t, prec_t = _operating_point(onehot[:, c], proba[:, c], t_c)
            kw = {"color": line.get_color(), "markeredgecolor": "black", "markersize": 6}
            ax_roc.plot([fpr_t], [tpr_t], "o", label=None if marked else "operating points", **kw)
            ax_pr.plot([tpr_t], [prec_t], "o", label=None if marked else "operating points", **kw)
            marked = True
    if n_boot and len(curves) == 1 and y_true.ndim == 1 and n_cls == 2:
        grid = np.linspace(0, 1, 101)
        roc_band, pr_band = _roc_pr_bands(onehot[:, curves[0]], proba[:, curves[0]], n_boot, groups, grid)
        ax_roc.fill_between(grid, *roc_band, color="tab:blue", alpha=0.18, lw=0, label=f"95% CI ({n_boot} resamples)")
        ax_pr.fill_between(grid, *pr_band, color="tab:blue", alpha=0.18, lw=0, label=f"95% CI ({n_boot} resamples)")
    if len(curves) == 1 and y_true.ndim == 1 and n_cls == 2:
        t = 0.5 if threshold is None else float(threshold)
        pos = curves[0]
        fpr_t, tpr_t, prec_t = _operating_point(onehot[:, pos], proba[:, pos], t)
        ax_roc.plot([fpr_t], [tpr_t], "o", color="crimson", label=f"threshold {t:.3g}")
        ax_pr.plot([tpr_t], [prec_t], "o", color="crimson", label=f"threshold {t:.3g}")
        prevalence = onehot[:, pos].mean()
        ax_pr.axhline(prevalence, ls=":", color="grey", lw=1, label=f"prevalence {prevalence:.3f}")
    suffix = ""
    if y_true.ndim == 1 and n_cls == 2:
        suffix = f" (positive class: {names[curves[0]] if curves else names[1 if positive is None else positive]})"
    ax_roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax_roc.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
               title="ROC" + suffix, xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="precision-recall" + suffix,
              xlim=(0, 1), ylim=(0, 1.02))
    if title:
        fig.suptitle(title, fontsize=10)
    for ax in (ax_roc, ax_pr):
        if curves:
            ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    return _save(fig, path_stem)


def _knn_series(results: Mapping[Any, Any], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Flatten knn_eval results into {series label: (ks, values)}.

    Accepts {k: {"top1": ...}} and temperature-nested {T: {k: {...}}} or {k: {T: {...}}} forms,
    with int or str keys (JSON turns int keys into strings)."""
    series: dict[str, dict[int, float]] = {}

    def add(label: str, k: Any, row: Mapping[str, Any]) -> None:
        value = row.get(metric)
        if value is None:
            return
        try:
            series.setdefault(label, {})[int(float(k))] = (
                (float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) else float(value))
        except (TypeError, ValueError, IndexError):
            return

    for key, row in results.items():
        if not isinstance(row, Mapping):
            continue
        if metric in row or any(not isinstance(v, Mapping) for v in row.values()):
            add(metric, key, row)
            continue
        for inner, sub in row.items():  # nested: decide which level is k by what parses as int
            if not isinstance(sub, Mapping):
                continue
            if _is_int(key) and not _is_int(inner):
                add(f"T={inner}", key, sub)
            elif _is_int(inner):
                add(f"T={key}", inner, sub)
    return {label: (sorted(v), [v[k] for k in sorted(v)]) for label, v in series.items()}


def _is_int(value: Any) -> bool:
    try:
        return float(value) == int(float(value)) and "." not in str(value)
    except (TypeError, ValueError):
        return False


# the narrowest y range of a k-NN curve: without an interval band the axis zoomed to the data, and
# one test row of 594 (0.0017) was drawn as a cliff over the whole height
KNN_MIN_SPAN = 0.1


def _min_span(ax: Any, span: float) -> None:
    """Widen the y axis to at least `span`, centred on the data and kept within 0..1."""
    lo, hi = ax.get_ylim()
    if hi - lo >= span:
        return
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    if hi > 1.0:
        lo, hi = lo - (hi - 1.0), 1.0
    if lo < 0.0:
        lo, hi = 0.0, hi - lo
    ax.set_ylim(lo, hi)


def knn_curve_plot(results: Mapping[Any, Any], path_stem: PathLike,
                   metrics: Sequence[str] = ("top1", "top5"), title: str | None = None) -> list[Path]:
    """k-NN accuracy against k (log axis), one line per metric (and temperature when nested)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for metric in metrics:
        bands = _knn_series(results, f"{metric}_ci")
        for label, (ks, values) in _knn_series(results, metric).items():
            name = metric if label == metric else f"{metric} {label}"
            line, = ax.plot(ks, values, marker="o", lw=1.5, label=name)
            band = bands.get(label.replace(metric, f"{metric}_ci", 1) if label == metric else label)
            if band is not None and len(band[0]) == len(ks):
                lo, hi = zip(*band[1])
                ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.18, lw=0,
                                label=f"{name} 95% CI")
            drawn += 1
    if drawn == 0:
        raise ValueError("knn results have no top1/top5 values to plot; expected {k: {'top1': ...}} "
                         "as returned by featcache.knn_eval.")
    ax.set_xscale("log")
    ks = sorted({k for m in metrics for ks_, _ in _knn_series(results, m).values() for k in ks_})
    ax.set_xticks(ks, [str(k) for k in ks])  # ticks at the k values used, not powers of ten
    ax.minorticks_off()
    ax.set(xlabel="k (neighbours)", ylabel="accuracy" if "auroc" not in metrics else "score",
           title=title or "k-NN accuracy vs k")
    _min_span(ax, KNN_MIN_SPAN)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path_stem)


def learning_curve_plot(history: Sequence[Mapping[str, Any]], metric: str, path_stem: PathLike,
                        best_epoch: int | None = None, title: str | None = None) -> list[Path]:
    """Training loss (left axis) and the validation metric (right axis) per epoch, the kept epoch
    marked: whether the head under- or over-fitted shows at a glance."""
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", lw=1.5, label="train loss")
    ax.set(xlabel="epoch", ylabel="train loss", title=title or "learning curve")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax2 = ax.twinx()
    key = f"val_{metric}"
    ax2.plot(epochs, [h.get(key) for h in history], color="tab:orange", lw=1.5, marker=".", label=f"val {metric}")
    ax2.set_ylabel(f"validation {metric}")
    if best_epoch is not None and best_epoch >= 0:
        ax.axvline(best_epoch, ls="--", color="grey", lw=1, label=f"kept epoch {best_epoch}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
    ax.grid(True, alpha=0.3)
    return _save(fig, path_stem)


def _roc_pr_bands(y: np.ndarray, score: np.ndarray, n_boot: int, groups: Sequence[Any] | None,
                  grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95 % bootstrap bands (2, len(grid)) of TPR at fixed FPR and of precision at fixed recall,
    resampling rows (or whole groups) as the metrics' bootstrap does."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from featcache.metrics import resample_indices

    tprs, precs = [], []
    for idx in resample_indices(len(y), n_boot, groups, seed=0):
        yb, sb = y[idx], score[idx]
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, sb)
        tprs.append(np.interp(grid, fpr, tpr))
        prec, rec, _ = precision_recall_curve(yb, sb)
        precs.append(np.interp(grid, rec[::-1], prec[::-1]))
    if not tprs:
        return np.full((2, grid.size), np.nan), np.full((2, grid.size), np.nan)
    return np.percentile(tprs, [2.5, 97.5], axis=0), np.percentile(precs, [2.5, 97.5], axis=0)


def calibration_plot(y_true: np.ndarray, proba: np.ndarray, path_stem: PathLike,
                     title: str | None = None, positive: int | None = None) -> list[Path]:
    """Reliability diagram of the top-1 confidence, with the bin counts below: the same bins
    (metrics.ECE_BINS) and the same ECE as metrics.json. Multi-label: every (row, label)
    probability against the fraction positive; the ECE drawn is over those decisions (multi-label
    metrics.json has no ECE)."""
    plt = _pyplot()
    y_true = np.asarray(y_true)
    proba = _as_proba(proba)
    if y_true.ndim == 2:  # multi-label: each label decision is a binary prediction
        flat = proba.ravel()
        edges, counts, mean_conf, mean_hit = calibration_bins(
            (y_true > 0).ravel().astype(int), np.stack([1 - flat, flat], axis=1),
            pred=(flat >= 0.5).astype(int))  # the decision rule: exactly 0.5 is positive
        xlabel, ylabel = "confidence of each label decision", "accuracy"
    else:
        edges, counts, mean_conf, mean_hit = calibration_bins(
            y_true, proba, pred=decide(proba, positive=positive if proba.shape[1] == 2 else None))
        xlabel, ylabel = "confidence (top-1 probability)", "accuracy"
    ece = float(np.sum(counts * np.abs(mean_hit - mean_conf)) / max(counts.sum(), 1))
    filled = counts > 0

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(mean_conf[filled], mean_hit[filled], marker="o", lw=1.5, label=f"model (ECE {ece:.3f}, {ECE_BINS} bins)")
    ax.set(ylabel=ylabel, title=title or "reliability diagram", xlim=(0, 1), ylim=(0, 1.02))
    # the curve lives near the diagonal and top-1 confidence is >= 1/C: the lower right is free
    ax.legend(fontsize=8, loc="lower right")
    ax_n.bar(edges[:-1], counts, width=1.0 / ECE_BINS, align="edge", color="steelblue", edgecolor="white")
    ax_n.set(xlabel=xlabel, ylabel="count")
    return _save(fig, path_stem)


def evaluation_figures(fig_dir: Path, metrics: Mapping[str, Any], y: np.ndarray, proba: np.ndarray,
                       classes: Sequence[str], split: str | None = None, threshold: Any = None,
                       positive: int | None = None, groups: Sequence[Any] | None = None) -> None:
    """The figures of one evaluated split: confusion matrix (single-label), ROC/PR with the operating
    point (binary and multi-label; with 95 % bootstrap bands when the metrics were bootstrapped)
    and the reliability diagram."""
    where = f" ({split})" if split else ""
    y = np.asarray(y)
    if y.ndim == 1 and metrics.get("confusion_matrix") is not None:
        t = f", threshold {threshold:.3g}" if isinstance(threshold, float) else ""
        confusion_matrix_plot(metrics["confusion_matrix"], classes, fig_dir / "confusion_matrix",
                              title=f"confusion matrix{where}{t}")
    if y.ndim == 2 or proba.shape[1] == 2:
        t = threshold if isinstance(threshold, float) or (y.ndim == 2 and isinstance(threshold, (list, tuple))) \
            else (0.5 if y.ndim == 1 else None)
        n_boot = int((metrics.get("bootstrap") or {}).get("n_boot") or 0)
        roc_pr_plot(y, proba, fig_dir / "roc_pr", classes=classes, threshold=t, positive=positive,
                    title=f"{split} split" if split else None, n_boot=min(n_boot, 500), groups=groups)
    calibration_plot(y, proba, fig_dir / "calibration", title=f"reliability diagram{where}", positive=positive)


def sweep_heatmap_plot(rows: Sequence[Mapping[str, Any]], x: str, y: str, value: str,
                       path_stem: PathLike, value_range: tuple[float, float] | None = None,
                       best: tuple[Any, Any] | None = None, title: str | None = None) -> list[Path]:
    """Heat-map of `value` over two swept hyper-parameters (e.g. x="lr", y="weight_decay").

    Rows come from a sweep leaderboard; when several rows share an (x, y) cell (other
    parameters varied too) the cell shows the best (max) value, as a sweep would pick it.
    `value_range` shares one colour scale across several heat-maps (one per feature kind); `best`
    outlines the (x, y) cell the sweep chose."""
    plt = _pyplot()
    cells: dict[tuple[Any, Any], float] = {}
    for row in rows:
        if x not in row or y not in row or row.get(value) is None:
            continue
        key = (row[x], row[y])
        v = float(row[value])
        if not np.isnan(v):
            cells[key] = max(cells.get(key, -np.inf), v)
    if not cells:
        keys = sorted(set().union(*(r.keys() for r in rows))) if rows else []
        raise ValueError(f"no sweep rows have {x!r}, {y!r} and {value!r}; the rows have keys {keys}.")

    def order(values: set) -> list:
        try:
            return sorted(values, key=float)
        except (TypeError, ValueError):
            return sorted(values, key=str)

    xs, ys = order({k[0] for k in cells}), order({k[1] for k in cells})
    grid = np.full((len(ys), len(xs)), np.nan)
    for (a, b), v in cells.items():
        grid[ys.index(b), xs.index(a)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(xs), 1.2 + 0.6 * len(ys)))
    lo, hi = value_range if value_range else (np.nanmin(grid), np.nanmax(grid))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=ax, label=value)
    mid = (lo + hi) / 2
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < mid else "black")
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else str(v) for v in xs], rotation=45)
    ax.set_yticks(range(len(ys)), [f"{v:g}" if isinstance(v, float) else str(v) for v in ys])
    if best is not None and best[0] in xs and best[1] in ys:
        from matplotlib.patches import Rectangle

        j, i = xs.index(best[0]), ys.index(best[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="crimson", lw=2.5))
    ax.set(xlabel=x, ylabel=y, title=title or f"sweep: {value}")
    return _save(fig, path_stem)


def few_shot_plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path_stem: PathLike, metric: str = "top1",
                  title: str | None = None) -> list[Path]:
    """Accuracy against shots per class (log axis, ticks at the shot counts), one line per curve
    (a method, or a backbone in `featcache compare --shots`) with a ±std band over the tries.
    Each curve is the summary of evaluation.few_shot: rows with shots, METRIC_mean, METRIC_std."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    shots_all: set[int] = set()
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["shots"])
        x = np.array([r["shots"] for r in rows], dtype=float)
        mean = np.array([r[f"{metric}_mean"] for r in rows], dtype=float)
        std = np.array([r[f"{metric}_std"] for r in rows], dtype=float)
        line, = ax.plot(x, mean, marker="o", lw=1.5, label=label)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        shots_all.update(int(v) for v in x)
    if not shots_all:
        raise ValueError("no few-shot rows to plot; expected rows with shots, top1_mean, top1_std.")
    ax.set_xscale("log")
    ticks = sorted(shots_all)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="training rows per class (shots)", ylabel=f"{metric.replace('_', ' ')} (mean ± std)",
           title=title or "few-shot accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path_stem)


def compare_plot(rows: Sequence[Mapping[str, Any]], path_stem: PathLike, metric: str = "top1",
                 order: Sequence[str] | None = None, title: str | None = None) -> list[Path]:
    """One metric per backbone with its bootstrap CI as error bars, one marker series per method
    (k-NN, probe, linear head). rows are `featcache compare`'s: file, method, metric, value, ci."""
    plt = _pyplot()
    chosen = [r for r in rows if r["metric"] == metric and r.get("value") is not None]
    if not chosen:
        raise ValueError(f"no {metric} values to plot.")
    files = list(order) if order else list(dict.fromkeys(r["file"] for r in chosen))
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(files) + 2), 4))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, f in enumerate(files):
            r = next((r for r in chosen if r["file"] == f and r["method"] == method), None)
            if r is None:
                continue
            ci = r.get("ci") or [r["value"], r["value"]]
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r["value"])
            lo.append(ci[0])
            hi.append(ci[1])
        # each interval drawn as it is (a percentile interval need not contain its point estimate,
        # which matplotlib's errorbar cannot show), the point on it
        colour = f"C{j}"
        ax.vlines(xs, lo, hi, colors=colour)
        for edge in (lo, hi):
            ax.hlines(edge, [x - width / 6 for x in xs], [x + width / 6 for x in xs], colors=colour)
        ax.plot(xs, ys, "o", color=colour, label=method)
    ax.set_xticks(range(len(files)), files, rotation=20 if len(files) > 4 else 0, ha="right" if len(files) > 4 else "center")
    ax.set(ylabel=f"{metric.replace('_', ' ')} (95% CI)")
    ax.set_title(title or f"{metric} per backbone", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path_stem)
