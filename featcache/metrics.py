"""Classification metrics shared by every command: one dict per evaluation, bootstrap CIs,
validation-chosen thresholds, and median ± std over repeats.

Small, imbalanced medical data is the norm, so every metric that a split cannot support (AUROC
with one class present, top-5 with five classes or fewer) is None with a note saying why,
never a crash and never a misleading 100 %.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from featcache.names import SELECTION_METRICS

ECE_BINS = 15          # one bin count for metrics.json's ECE and the reliability diagram
DEFAULT_THRESHOLD = 0.5
TUNED_METHODS = ("youden", "sensitivity")  # threshold rules chosen on validation (the rest are numbers)
BOOTSTRAP_WARN_DROPPED = 0.05  # warn when more than this share of resamples leave a metric undefined
# metrics that average over classes (or labels): a bootstrap resample lacking a class of the full
# split would average over fewer classes -- another quantity -- so there they are undefined
CLASS_AVERAGED = frozenset({"balanced_accuracy", "macro_f1", "auroc", "auprc", "macro_auroc", "macro_auprc"})
# the metrics classification_metrics computes that a bootstrap interval can be drawn for
BOOTSTRAP_METRICS = frozenset({"top1", "top5", "balanced_accuracy", "macro_f1", "weighted_f1", "kappa", "mcc", "ece",
                               "auroc", "auprc", "sensitivity", "specificity", "macro_auroc", "macro_auprc",
                               "micro_auroc", "micro_auprc", "subset_accuracy"})


def check_scores(proba: np.ndarray, what: str = "probabilities") -> np.ndarray:
    """proba as float64, refusing NaN or inf: a metric of non-finite scores would be NaN beside
    plausible numbers (top-1 decides NaN rows somehow), and its bootstrap would hide the NaN."""
    proba = np.asarray(proba, dtype=np.float64)
    bad = ~np.isfinite(proba)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(proba), -1).any(axis=1)) if proba.ndim else np.array([0])
        raise ValueError(f"the {what} contain NaN or inf in {rows.size} row(s) (first: row {int(rows[0])}); metrics "
                         f"of such scores are meaningless. A head whose training diverged gives them: lower the "
                         f"learning rate, or check the features for NaN.")
    return proba


# ------------------------------------------------------------------------------------------------
# decisions: one rule everywhere (tables, metrics.json, bootstrap, predict CSV)
# ------------------------------------------------------------------------------------------------

def resolve_positive(classes: Sequence[str], train_labels: np.ndarray, name: str | None = None,
                     multilabel: bool = False) -> int | None:
    """Index of a binary task's positive class: `name` when given, else the training split's
    minority class (ties: the second class). None for tasks that are not binary; a name given
    for one of those is refused (it would be ignored)."""
    if multilabel:
        if name is not None:
            raise ValueError(f"--positive-class applies to binary tasks; this file is multi-label (each of "
                             f"{', '.join(classes)} is scored on its own, positive = 1). Drop --positive-class.")
        return None
    if len(classes) != 2:
        if name is not None:
            raise ValueError(f"--positive-class applies to binary tasks; this one has {len(classes)} classes.")
        return None
    if name is not None:
        if name not in classes:
            raise ValueError(f"--positive-class {name!r} is not a class of this file; its classes are "
                             f"{', '.join(classes)}.")
        return list(classes).index(name)
    y = np.asarray(train_labels)
    counts = np.bincount(y[y >= 0].astype(np.int64), minlength=2)
    return 0 if counts[0] < counts[1] else 1


def decide(proba: np.ndarray, threshold: float | Sequence[float] | None = None, positive: int | None = None,
           multilabel: bool = False) -> np.ndarray:
    """Predicted class per row, by featcache's one tie rule.

    Binary: the positive class when P(positive) >= threshold (default 0.5), so a probability of
    exactly 0.5 goes to the positive class. Multi-label: each label positive when its probability
    >= its threshold. Multiclass: argmax, the lowest class index among equal probabilities."""
    proba = np.asarray(proba, dtype=np.float64)
    if multilabel:
        t = DEFAULT_THRESHOLD if threshold is None else np.asarray(threshold, dtype=np.float64)
        return (proba >= t).astype(np.uint8)
    if proba.shape[1] == 2:
        pos = 1 if positive is None else int(positive)
        t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        return np.where(proba[:, pos] >= t, pos, 1 - pos).astype(np.int64)
    return proba.argmax(axis=1)


# ------------------------------------------------------------------------------------------------
# one number for model selection
# ------------------------------------------------------------------------------------------------

def perfect_score(score: float | None, metric: str) -> bool:
    """A selection score with nothing left to improve on: 1 (0 for loss, which is negated)."""
    return score is not None and math.isfinite(score) and score >= (0.0 if metric == "loss" else 1.0) - 1e-12


def selection_score(y_true: np.ndarray, proba: np.ndarray, metric: str = "accuracy",
                    positive: int | None = None) -> float:
    """One number to pick epochs and configs by; higher is better (loss is negated). `positive`: a
    binary task's positive class, so an exact 0.5 is decided as the run's metrics decide it."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if metric not in SELECTION_METRICS:
        raise ValueError(f"selection metric must be one of {', '.join(SELECTION_METRICS)}; got {metric!r}.")
    if not np.isfinite(proba).all():
        return float("nan")  # a diverged head: never better than any epoch or config (NaN > x is False)
    if y_true.ndim == 2:  # multi-label: per-label decisions at 0.5, macro AUROC, mean BCE
        if metric == "balanced_accuracy":
            return _multilabel_balanced_accuracy(y_true, decide(proba, multilabel=True))
        if metric == "loss":
            p = proba.clip(1e-7, 1 - 1e-7)
            return float(np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))
        if metric == "auroc":
            value = _multilabel_auc(y_true, proba, "macro")[0]
            return float("nan") if value is None else value
        return float(np.mean(decide(proba, multilabel=True) == (y_true > 0)))
    if metric == "loss":
        p = proba[np.arange(len(y_true)), y_true].clip(1e-12, 1)
        return float(np.mean(np.log(p)))
    if metric == "auroc":
        value = _auroc(y_true, proba)[0]
        return float("nan") if value is None else value
    pred = decide(proba, positive=positive)
    if metric == "accuracy":
        return float(np.mean(pred == y_true))
    return _balanced_accuracy(y_true, pred)


# ------------------------------------------------------------------------------------------------
# the full report of one evaluation
# ------------------------------------------------------------------------------------------------

def as_labels(y: Any) -> np.ndarray:
    """Labels as int64 class indices (N,) or 0/1 (N, C): whole-number floats (labels read through
    pandas) are cast; fractions, and multi-label cells other than 0/1, are refused."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(np.mod(y, 1) != 0):
            raise ValueError("labels must be whole class indices (or 0/1 per label); found non-integer values.")
        y = y.astype(np.int64)
    if y.ndim == 2 and y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"multi-label labels must be 0 or 1; found {y[~np.isin(y, (0, 1))][0].item()!r}.")
    return y


TOP5_NOTE = "top-5 not applicable with {} classes"   # why top5 is null: no warning


def check_threshold_task(rule: str | None, n_classes: int, multilabel: bool) -> None:
    """Refuse a --threshold on a task of three or more classes before any work (it decides by
    argmax): train ran all its epochs, and probe advised --no-refit, before saying so."""
    if rule not in (None, DEFAULT_THRESHOLD_RULE) and not multilabel and n_classes > 2:
        raise ValueError(f"--threshold {rule} applies to binary and multi-label tasks; this one has {n_classes} "
                         f"classes and decides by argmax: drop --threshold.")


def split_warnings(block: dict[str, Any] | None) -> list[str]:
    """The notes of a split's metrics that qualify its numbers (a class absent, AUROC over the
    classes present, undefined MCC...): all but the top-5 one, which only explains a null."""
    if not block:
        return []
    return [n for n in block.get("notes") or [] if n != TOP5_NOTE.format(block.get("num_classes"))]


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, *, classes: Sequence[str] | None = None,
                           threshold: float | Sequence[float] | None = None,
                           positive: int | None = None) -> dict[str, Any]:
    """Every metric of one evaluation as plain JSON-able values.

    proba is (N, C) class probabilities (rows sum to one) for single-label y (N,), or (N, C)
    per-label scores for multi-label y (N, C). For two classes, class `positive` (default 1) is
    the positive one: P(positive) >= `threshold` (default 0.5) decides, and sensitivity, AUROC and
    AUPRC are about it. For multi-label, one threshold per label.
    """
    y_true = as_labels(y_true)
    proba = check_scores(proba)
    if proba.ndim != 2 or len(proba) != len(y_true):
        raise ValueError(f"expected proba of shape (N, C) with N = {len(y_true)} rows; got {proba.shape}.")
    if y_true.ndim == 2:
        return _multilabel_metrics(y_true, proba, classes, threshold)
    n, c = proba.shape
    names = list(classes) if classes is not None else [str(i) for i in range(c)]
    notes: list[str] = []
    if n == 0:
        return {"n": 0, "num_classes": c, "notes": ["no rows to evaluate"]}
    pos = (1 if positive is None else int(positive)) if c == 2 else None
    if threshold is not None and c > 2:
        raise ValueError(f"a decision threshold applies to binary and multi-label tasks; this one has {c} "
                         f"classes and decides by argmax.")
    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    pred = decide(proba, threshold=t, positive=pos)
    if y_true.size and (y_true.min() < 0 or y_true.max() >= c):
        raise ValueError(f"labels must be class indices 0..{c - 1}; found {int(y_true.min())}..{int(y_true.max())}.")
    cm = _confusion(y_true, pred, c)
    per_class = []
    for i in range(c):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i]
        # precision of a class never predicted, recall of a class with no rows: 0/0, undefined (None,
        # not the 0 that reads as "never finds it"); F1 counts them as 0, as scikit-learn's macro F1
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        p0, r0 = precision or 0.0, recall or 0.0
        f1 = 2 * p0 * r0 / (p0 + r0) if p0 + r0 else 0.0
        per_class.append({"class": names[i], "precision": None if precision is None else float(precision),
                          "recall": None if recall is None else float(recall),
                          "f1": float(f1), "support": int(cm[i, :].sum())})
    support = np.array([p["support"] for p in per_class])
    f1s = np.array([p["f1"] for p in per_class])
    present = support > 0
    predicted = cm.sum(axis=0) > 0
    absent = [names[i] for i in np.flatnonzero(~present)]
    if absent:
        falsely = [names[i] for i in np.flatnonzero(~present & predicted)]
        notes.append(f"classes absent from this split: {', '.join(absent)} (left out of balanced accuracy and "
                     f"AUROC; counted in macro F1 only when predicted, with F1 0"
                     + (f": {', '.join(falsely)} predicted" if falsely else "") + ")")
    out: dict[str, Any] = {
        "n": int(n), "num_classes": int(c),
        "top1": float(np.mean(pred == y_true)),
        "top5": _topk_accuracy(y_true, proba, 5) if c > 5 else None,
        "balanced_accuracy": _balanced_accuracy(y_true, pred),
        "macro_f1": float(f1s[present | predicted].mean()),  # scikit-learn's labels: in y or predicted
        "weighted_f1": float((f1s * support).sum() / support.sum()),
    }
    if c <= 5:
        notes.append(TOP5_NOTE.format(c))
    out["auroc"], note = _auroc(y_true, proba, pos)
    if note:
        notes.append(note)
    out["auprc"] = _auprc(y_true, proba, pos) if out["auroc"] is not None else None
    out["mcc"] = _mcc(cm)
    out["kappa"] = _kappa(cm)
    if out["mcc"] is None:
        notes.append("MCC undefined: the truth or the predictions hold a single class")
    if out["kappa"] is None:
        notes.append("Cohen's kappa undefined: truth and predictions are one and the same class (chance "
                     "agreement 1)")
    # top-label ECE, the top label decided as every figure decides at 0.5 (a binary P = 0.5 is positive)
    out["ece"] = expected_calibration_error(y_true, proba, pred=decide(proba, positive=pos))
    if c == 2:
        neg = 1 - pos
        tp, fn = cm[pos, pos], cm[pos, neg]
        tn, fp = cm[neg, neg], cm[neg, pos]
        out["positive_class"] = names[pos]
        out["threshold"] = t
        out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else None
        out["specificity"] = float(tn / (tn + fp)) if tn + fp else None
        if tp + fn == 0 or tn + fp == 0:
            notes.append("sensitivity/specificity need both classes present")
    out["confusion_matrix"] = cm.tolist()
    out["per_class"] = per_class
    out["notes"] = notes
    return out


def _multilabel_metrics(y: np.ndarray, scores: np.ndarray, classes: Sequence[str] | None,
                        threshold: float | Sequence[float] | None) -> dict[str, Any]:
    n, c = y.shape
    names = list(classes) if classes is not None else [str(i) for i in range(c)]
    thresholds = np.full(c, 0.5) if threshold is None else np.broadcast_to(np.asarray(threshold, float), (c,))
    notes: list[str] = []
    per_label = []
    for j in range(c):
        yj, sj = y[:, j].astype(int), scores[:, j]
        pos, neg = int(yj.sum()), int(n - yj.sum())
        pred = sj >= thresholds[j]
        tp, tn = int((pred & (yj == 1)).sum()), int((~pred & (yj == 0)).sum())
        entry = {"label": names[j], "positives": pos, "threshold": float(thresholds[j]),
                 "sensitivity": tp / pos if pos else None, "specificity": tn / neg if neg else None,
                 "auroc": None, "auprc": None}
        if pos and neg:
            entry["auroc"] = _binary_auroc(yj, sj)
            entry["auprc"] = _average_precision(yj, sj)
        else:
            notes.append(f"label {names[j]}: AUROC undefined ({'no positives' if not pos else 'no negatives'})")
        per_label.append(entry)
    macro_auc, _ = _multilabel_auc(y, scores, "macro")
    micro_auc, _ = _multilabel_auc(y, scores, "micro")
    valid_pr = [p["auprc"] for p in per_label if p["auprc"] is not None]
    flat_y, flat_s = y.ravel().astype(int), scores.ravel()
    return {
        "n": int(n), "num_labels": int(c), "multilabel": True,
        "auroc": macro_auc, "macro_auroc": macro_auc, "micro_auroc": micro_auc,
        "auprc": float(np.mean(valid_pr)) if valid_pr else None,
        "macro_auprc": float(np.mean(valid_pr)) if valid_pr else None,
        "micro_auprc": _average_precision(flat_y, flat_s) if 0 < flat_y.sum() < flat_y.size else None,
        "subset_accuracy": float(np.mean(np.all((scores >= thresholds) == (y > 0), axis=1))),
        "per_label": per_label, "notes": notes,
    }


# ------------------------------------------------------------------------------------------------
# the metrics themselves (numpy, so bootstrap resamples stay cheap)
# ------------------------------------------------------------------------------------------------

def _confusion(y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    classes = np.unique(y)
    return float(np.mean([np.mean(pred[y == k] == k) for k in classes])) if classes.size else float("nan")


def _multilabel_balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over labels of (sensitivity + specificity) / 2, the labels with both classes present
    (scikit-learn's balanced_accuracy_score per label, averaged); NaN when no label has both."""
    y, pred = (np.asarray(y) > 0).astype(np.int64), (np.asarray(pred) > 0).astype(np.int64)
    values = [_balanced_accuracy(y[:, j], pred[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(values)) if values else float("nan")


def _topk_accuracy(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Share of rows whose class has a positive score and is among the k highest, with ties ordered
    as the top-1 decision orders them (decide: among equal scores the lower class index first), so
    the top-1 class is always among the top k and top-5 >= top-1. (scikit-learn's
    top_k_accuracy_score ranks the higher index first among ties, which let six tied classes push
    the top-1 class out of the top 5.)

    Why positive: a class scored exactly 0 (no k-NN neighbour voted for it, a class the probe never
    saw) is not a guess; with fewer than k classes scored, tie order would otherwise credit rows
    with no vote for their class (by class index). So at k-NN k = 1, top-5 is top-1. Softmax
    scores are positive, and there this is scikit-learn's figure."""
    scored = proba > 0
    top = np.argsort(-np.where(scored, proba, -1.0), axis=1, kind="stable")[:, :k]
    return float(np.mean(scored[np.arange(len(y)), y] & (top == y[:, None]).any(axis=1)))


def _binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U form of the ROC AUC (ties count one half)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn's average_precision_score."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _auroc(y: np.ndarray, proba: np.ndarray, positive: int | None = None) -> tuple[float | None, str | None]:
    """Binary AUROC of the positive class (default 1), or macro one-vs-rest over the classes present."""
    present = np.unique(y)
    if present.size < 2:
        return None, f"AUROC undefined: only class {present.tolist()} present"
    if proba.shape[1] == 2:
        pos = 1 if positive is None else int(positive)
        return _binary_auroc((y == pos).astype(int), proba[:, pos]), None
    return float(np.mean([_binary_auroc((y == k).astype(int), proba[:, k]) for k in present])), (
        None if present.size == proba.shape[1] else "AUROC averaged over the classes present")


def _auprc(y: np.ndarray, proba: np.ndarray, positive: int | None = None) -> float:
    if proba.shape[1] == 2:
        pos = 1 if positive is None else int(positive)
        return _average_precision((y == pos).astype(int), proba[:, pos])
    return float(np.mean([_average_precision((y == k).astype(int), proba[:, k]) for k in np.unique(y)]))


def _multilabel_auc(y: np.ndarray, scores: np.ndarray, average: str) -> tuple[float | None, str | None]:
    if average == "micro":
        flat = y.ravel().astype(int)
        if 0 < flat.sum() < flat.size:
            return _binary_auroc(flat, scores.ravel()), None
        return None, "micro AUROC undefined"
    aucs = [_binary_auroc(y[:, j].astype(int), scores[:, j]) for j in range(y.shape[1])
            if 0 < y[:, j].sum() < len(y)]
    return (float(np.mean(aucs)), None) if aucs else (None, "no label has both classes")


def _mcc(cm: np.ndarray) -> float | None:
    """Matthews correlation for any number of classes (Gorodkin's R_K); None (undefined: 0/0, which
    scikit-learn reports as 0) when truth or predictions hold a single class."""
    t, p = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
    c, s = float(np.trace(cm)), float(cm.sum())
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else None


def _kappa(cm: np.ndarray) -> float | None:
    """Cohen's kappa; None (undefined, scikit-learn's NaN) when chance agreement is 1, i.e. truth and
    predictions are one and the same class throughout."""
    s = cm.sum()
    po = np.trace(cm) / s
    pe = (cm.sum(axis=0) @ cm.sum(axis=1)) / (s * s)
    return float((po - pe) / (1 - pe)) if pe != 1 else None


def calibration_bins(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS, pred: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, count, mean confidence, accuracy) per equal-width bin of the top-1 confidence: what
    the ECE sums and the reliability diagram draws (one implementation for both). `pred` gives the
    decisions when they are not the argmax (multi-label label decisions: P >= 0.5 is positive)."""
    proba = np.asarray(proba, dtype=np.float64)
    decided = proba.argmax(axis=1) if pred is None else np.asarray(pred)
    conf = proba[np.arange(len(proba)), decided]  # the decided class's probability (the max, but for ties)
    correct = (decided == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, conf, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(which, correct, minlength=bins) / np.maximum(count, 1)
    return edges, count, mean_conf, accuracy


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS,
                               pred: np.ndarray | None = None) -> float:
    """Confidence-binned |accuracy - confidence|, weighted by bin size (Guo et al. 2017)."""
    _, count, mean_conf, accuracy = calibration_bins(y, proba, bins, pred)
    return float(np.sum(count * np.abs(accuracy - mean_conf)) / max(count.sum(), 1))


# ------------------------------------------------------------------------------------------------
# thresholds, confidence intervals, repeats
# ------------------------------------------------------------------------------------------------

def choose_threshold(y_true: np.ndarray, scores: np.ndarray, method: str = "youden",
                     target: float | None = None) -> float:
    """A decision threshold on P(positive), chosen on validation data and then applied to test.

    youden: maximise sensitivity + specificity - 1; among thresholds of equal J, the lowest (the
    most sensitive: on small validation sets J often ties, and scikit-learn's argmax over its
    descending roc_curve thresholds would take the highest). sensitivity: the highest threshold
    whose sensitivity reaches `target` (e.g. 0.95 for a screening test).
    """
    y = as_labels(y_true)
    if y.ndim != 1 or (y.size and not np.isin(y, (0, 1)).all()):
        raise ValueError("choose_threshold needs 0/1 labels (1 = the positive class), e.g. (val_y == positive); "
                         f"found {sorted(set(np.unique(y).tolist()))[:5]}.")
    s = check_scores(scores, "validation scores")
    if y.min() == y.max():
        raise ValueError("choosing a threshold needs both classes in the validation data; found only "
                         f"class {y[0]}.")
    candidates = np.unique(s)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    # share of positives >= t and of negatives < t at every candidate t, by binary search (O(n log n))
    sens = (len(pos) - np.searchsorted(pos, candidates, side="left")) / len(pos)
    spec = np.searchsorted(neg, candidates, side="left") / len(neg)
    if method == "youden":
        return float(candidates[np.argmax(sens + spec - 1)])
    if method == "sensitivity":
        if target is None or not 0 < target <= 1:
            raise ValueError(f"method 'sensitivity' needs a target in (0, 1]; got {target!r}.")
        ok = np.flatnonzero(sens >= target)
        return float(candidates[ok.max()])
    raise ValueError(f"threshold method must be 'youden' or 'sensitivity'; got {method!r}.")


def choose_threshold_rule(rule: str | None, val_y: np.ndarray, val_proba: np.ndarray,
                          positive: int | None, notes: list[str] | None = None,
                          names: Sequence[str] | None = None,
                          untuned_out: dict[str, str] | None = None,
                          train_y: np.ndarray | None = None,
                          val_groups: Sequence[Any] | None = None) -> float | list[float] | None:
    """The threshold a rule gives on validation: "youden", "sensitivity:0.95" or a number in (0, 1);
    None for the default rule on a multiclass task (argmax), which refuses any other rule.

    Where validation has one class only (the positive class, or a label, never or always present)
    there is nothing to tune on: the threshold stays at 0.5 and a line saying so is appended to
    `notes` (label names from `names`) and the class or label is added to `untuned_out` (name ->
    why: "no positives in validation"), so no
    one reads it as chosen on validation. The same holds where `train_y` has one class only for
    it: the output never learned it (a probe's is a constant, whose 'best' threshold is 0 = every
    row positive).

    A rule tuned on fewer than MIN_CLASS_UNITS positive (or negative) rows of a class or label,
    patients when `val_groups` are given, gets a note: such a threshold is itself uncertain."""
    val_y = np.asarray(val_y)
    multilabel = val_y.ndim == 2
    binary = not multilabel and val_proba.shape[1] == 2
    rule = DEFAULT_THRESHOLD_RULE if rule is None else str(rule).strip()
    method, _, target = rule.partition(":")
    if method not in TUNED_METHODS:
        try:
            value = float(rule)
        except ValueError:
            raise ValueError(f"--threshold must be youden, sensitivity:TARGET (e.g. sensitivity:0.95) or a "
                             f"number in (0, 1); got {rule!r}.") from None
        if not 0 < value < 1:
            raise ValueError(f"--threshold must lie in (0, 1); got {value}.")
    if not (binary or multilabel):
        check_threshold_task(rule, val_proba.shape[1], multilabel)
        return None
    goal = None
    if method == "sensitivity":
        try:
            goal = float(target)
        except ValueError:
            raise ValueError(f"--threshold sensitivity:TARGET needs a number, e.g. sensitivity:0.95; got {rule!r}.") from None
        if not 0 < goal <= 1:
            raise ValueError(f"--threshold sensitivity:TARGET needs a target sensitivity in (0, 1], e.g. "
                             f"sensitivity:0.95; got {rule!r}.")
    elif method == "youden" and target:
        raise ValueError(f"--threshold youden takes no target (it maximises sensitivity + specificity - 1); got "
                         f"{rule!r}. For a sensitivity goal use sensitivity:TARGET.")
    untuned: list[str] = []       # prose for the note
    few: list[str] = []           # tuned on so few rows (patients) of a side that the threshold is uncertain
    keys = None if val_groups is None else group_keys(val_groups)

    untrained: list[str] = []
    reasons: dict[str, str] = {}   # the bare class / label names -> why, for metrics.json and the head

    def pick(y: np.ndarray, scores: np.ndarray, what: str, name: str, seen: np.ndarray | None) -> float:
        if method not in TUNED_METHODS:
            return float(rule)
        if seen is not None and len(seen) and seen.min() == seen.max():  # one class in train: never learned
            reasons[name] = f"{'no positives' if seen.max() == 0 else 'no negatives'} in train"
            untrained.append(f"{what} {name} ({reasons[name]})")
            return DEFAULT_THRESHOLD
        if y.min() == y.max():  # one class only in validation: nothing to tune on
            untuned.append(f"{what} {name} ({'no positives' if y.max() == 0 else 'no negatives'})")
            reasons[name] = f"{'no positives' if y.max() == 0 else 'no negatives'} in validation"
            return DEFAULT_THRESHOLD
        for side, mask in (("positive", y == 1), ("negative", y == 0)):
            n = int(mask.sum()) if keys is None else len({k for k, m in zip(keys, mask) if m})
            if n < MIN_CLASS_UNITS:
                few.append(f"{what} {name}: {n} {side} {'patients' if keys is not None else 'rows'}")
        return choose_threshold(y, scores, method, goal)

    train_y = None if train_y is None else np.asarray(train_y)
    if binary:
        pos = 1 if positive is None else int(positive)
        seen = None if train_y is None else (train_y[train_y >= 0] == pos).astype(int)
        value: float | list[float] = pick((val_y == pos).astype(int), val_proba[:, pos], "positive class",
                                          str(names[pos]) if names else str(pos), seen)
    else:
        value = [pick(val_y[:, j], val_proba[:, j], "label", str(names[j]) if names else str(j),
                      None if train_y is None else train_y[:, j]) for j in range(val_y.shape[1])]
    if isinstance(untuned_out, dict):
        untuned_out.update(reasons)
    elif untuned_out is not None:  # a list of names, as before the reasons were kept
        untuned_out.extend(reasons)
    if untuned and notes is not None:
        notes.append(f"--threshold {rule}: validation has one class only for {', '.join(untuned)}; nothing to tune "
                     f"on, so the threshold there stays at {DEFAULT_THRESHOLD}.")
    if few and notes is not None:
        shown = "; ".join(few[:5]) + (f"; and {len(few) - 5} more" if len(few) > 5 else "")
        notes.append(f"--threshold {rule} was tuned on few validation cases ({shown}; fewer than "
                     f"{MIN_CLASS_UNITS}): a threshold from so few is itself uncertain, and its sensitivity and "
                     f"specificity on test may differ widely from validation's; report it as such, or tune on more.")
    if untrained and notes is not None:
        notes.append(f"--threshold {rule}: train has one class only for {', '.join(untrained)}; its output never "
                     f"learned it, so the threshold there stays at {DEFAULT_THRESHOLD}.")
    return value


def train_coverage_notes(train_y: np.ndarray, classes: Sequence[str], split: str = "train") -> list[str]:
    """What the training split cannot teach: single-label classes without a row (never predicted),
    multi-label labels never (or always) present (their output is untrained: its per-label numbers,
    and its share of the macro averages, measure nothing learned)."""
    y = np.asarray(train_y)
    if y.ndim == 2:
        one = [f"{classes[j]} (no {'positives' if y[:, j].max(initial=0) == 0 else 'negatives'})"
               for j in range(y.shape[1]) if len(y) and y[:, j].min() == y[:, j].max()]
        return [f"the {split} split has one class only for label(s) {', '.join(one)}: no head, probe or k-NN vote "
                f"learns them, so their per-label numbers (and their share of the macro averages) measure nothing learned; "
                f"leave them out (--label-columns) or add rows with both outcomes."] if one else []
    present = set(y[y >= 0].tolist())
    missing = [c for i, c in enumerate(classes) if i not in present]
    return [f"the {split} split lacks classes {', '.join(missing)}: they can never be predicted."] if missing else []


DEFAULT_THRESHOLD_RULE = "0.5"


def tuned_on_validation(rule: str | None) -> bool:
    """True for rules that pick the threshold from validation data (youden, sensitivity:T); a
    number (0.5, the default, or e.g. 0.3) is used as given."""
    return rule is not None and str(rule).strip().partition(":")[0] in TUNED_METHODS


def threshold_record(rule: str, value: float | list[float],
                     untuned: Mapping[str, str] | Sequence[str] = ()) -> dict[str, Any]:
    """metrics.json's account of a decision threshold: the rule, its value, and where it came from
    ("val"; "default" for the default 0.5, and where validation had one class and the rule fell
    back to 0.5 for every class or label; "given" for another number). `untuned` names the classes
    or labels left at 0.5 (a mapping to why for each: one class in train or validation, recorded as
    `untuned_why`)."""
    chosen = "default" if str(rule).strip() == DEFAULT_THRESHOLD_RULE else "given"
    if tuned_on_validation(rule):
        chosen = "default" if _untuned_everywhere(value, untuned) else "val"
    return {"rule": rule, "value": value, "chosen_on": chosen, "untuned": list(untuned),
            "untuned_why": dict(untuned) if isinstance(untuned, Mapping) else {}}


def _untuned_everywhere(value: float | list[float] | None, untuned: Sequence[str] | Mapping[str, str]) -> bool:
    """Whether a tuned rule fell back to the default for its one class or for every label."""
    return bool(untuned) and (not isinstance(value, list) or len(untuned) == len(value))


def untuned_reasons(names: Sequence[str] | None, why: Mapping[str, str] | None) -> dict[str, str]:
    """A saved record's untuned classes / labels -> why ("" for runs saved before reasons were kept),
    from its two keys (metrics.json untuned / untuned_why; head.json threshold_untuned / _why)."""
    return {str(n): str((why or {}).get(n, "")) for n in names or []}


def threshold_provenance(rule: str | None, value: float | list[float] | None,
                         untuned: Mapping[str, str] | Sequence[str] = ()) -> str:
    """Where a decision threshold came from, in the one wording train, predict and the report print:
    "the default", "given", "youden, chosen on validation", "youden, chosen on validation; the
    default 0.5 for hernia (no positives in train)" or, where nothing could be tuned anywhere,
    "youden: the default 0.5 for pos (no positives in validation)". Runs written before reasons
    were recorded say "nothing to tune on"."""
    rule = DEFAULT_THRESHOLD_RULE if rule is None else str(rule).strip()
    if not tuned_on_validation(rule):
        return "the default" if rule == DEFAULT_THRESHOLD_RULE else "given"
    why = untuned if isinstance(untuned, Mapping) else {}
    left = ", ".join(f"{n} ({why.get(n) or 'nothing to tune on'})" for n in untuned)
    if _untuned_everywhere(value, untuned):
        return f"{rule}: the default {DEFAULT_THRESHOLD:g} for {left}"
    return f"{rule}, chosen on validation" + (f"; the default {DEFAULT_THRESHOLD:g} for {left}" if untuned else "")


_SCALARS: dict[str, Callable[[np.ndarray, np.ndarray, int | None], float | None]] = {
    "top1": lambda y, p, pos: float(np.mean(decide(p, positive=pos) == y)),
    "top5": lambda y, p, pos: _topk_accuracy(y, p, 5) if p.shape[1] > 5 else None,
    "balanced_accuracy": lambda y, p, pos: _balanced_accuracy(y, decide(p, positive=pos)),
    "auroc": lambda y, p, pos: _auroc(y, p, pos)[0],
}


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in y (the balanced_accuracy of classification_metrics)."""
    return _balanced_accuracy(np.asarray(y), np.asarray(pred))


def scalar_metrics(names: Sequence[str], y: np.ndarray, proba: np.ndarray, *, positive: int | None = None,
                   threshold: float | None = None) -> dict[str, float | None]:
    """A few single-label metrics of (y, proba) from one decision (decide, same rule as
    classification_metrics), cheap enough to run per bootstrap resample: top1, balanced_accuracy,
    macro_f1, auroc, sensitivity, specificity (the last two binary only). None where undefined
    (e.g. AUROC with one class drawn)."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    c = proba.shape[1]
    pos = (1 if positive is None else int(positive)) if c == 2 else None
    pred = decide(proba, threshold=threshold, positive=pos)
    out: dict[str, float | None] = {}
    for name in names:
        if name == "top1":
            out[name] = float(np.mean(pred == y))
        elif name == "balanced_accuracy":
            out[name] = _balanced_accuracy(y, pred)
        elif name == "macro_f1":
            cm = _confusion(y, pred, c)
            support, tp = cm.sum(axis=1), np.diag(cm)
            denom = support + cm.sum(axis=0)
            f1 = np.divide(2 * tp, denom, out=np.zeros(c), where=denom > 0)
            out[name] = float(f1[denom > 0].mean()) if (denom > 0).any() else None  # in y or predicted
        elif name == "auroc":
            out[name] = _auroc(y, proba, pos)[0]
        elif name in ("sensitivity", "specificity") and pos is not None:
            want = pos if name == "sensitivity" else 1 - pos
            rows = y == want
            out[name] = float(np.mean(pred[rows] == want)) if rows.any() else None
        else:
            out[name] = None
    return out


MIN_BOOTSTRAP_UNITS = 10  # fewer patients (or rows) than this: G of them give only C(2G-1, G) distinct resamples
# fewer rows (patients) of a class than this: bootstrapped intervals of AUROC and class-averaged
# metrics undercover (4 positives of 40: a nominal 95 % interval held a true AUROC of 0.95 in
# 69-78 % of simulated test sets, 0.75 in ~86 %); no interval method is honest there
MIN_CLASS_UNITS = 10

def few_units_warning(units: int, grouped: bool) -> list[str]:
    """The warning for a bootstrap over fewer than MIN_BOOTSTRAP_UNITS patients (or rows), or none."""
    if units >= MIN_BOOTSTRAP_UNITS:
        return []
    return [f"bootstrap: only {units} {'patients (groups)' if grouped else 'rows'} to resample: an interval over "
            f"so few is unreliable (too narrow; one gives a zero-width interval), so read it as a rough range at best."]


# why a metric can be undefined in a resample (Bootstrap.warnings)
UNDEFINED_BECAUSE = {
    "sensitivity": "no row of the positive class drawn",
    "specificity": "no row of the negative class drawn",
    "mcc": "the drawn truth or predictions were of one class",
    "kappa": "chance agreement was 1: truth and predictions of one and the same class",
    "macro_f1": "a class of the split not drawn, or its classes in truth-or-predictions not those of the split",
    "*": "a class of the split not drawn, e.g. no positive row",
}


# proportions of rows (top-1 accuracy, sensitivity, specificity) get Wilson score intervals, not
# percentile-bootstrap ones: at a bound (4 of 4 positives found) every resample repeats the
# estimate, and the bootstrap's [1, 1] held a true sensitivity of 0.88 in 43 % of simulated test
# sets of 4 positives; Wilson's interval held it in 93 % (README "Confidence intervals").
PROPORTION_METRICS = ("top1", "sensitivity", "specificity")


def proportion_interval(hits: np.ndarray, keys: Sequence[str] | None = None, alpha: float = 0.05,
                        rows: np.ndarray | None = None) -> tuple[float, float] | None:
    """Wilson score interval (Wilson 1927) of the share of true `hits` (of the `rows` mask only, when
    given); with `keys` (one patient id per row) its sample size is divided by the clusters' design
    effect (Kish; the ratio estimator's linearised variance over patients, never taken below
    independent rows'). A share of 0 or 1, whose design effect cannot be estimated, counts each
    patient once. None without rows."""
    if rows is not None:
        hits = np.asarray(hits)[rows]
        keys = None if keys is None else [k for k, r in zip(keys, rows) if r]
    hits = np.asarray(hits, dtype=np.float64)
    n = len(hits)
    if n == 0:
        return None
    p = float(hits.mean())
    n_eff = float(n)
    if keys is not None:
        _, cid = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
        m = int(cid.max()) + 1
        if m < n:  # some patient has several rows
            if 0 < p < 1 and m > 1:
                hit_sums = np.bincount(cid, weights=hits, minlength=m)
                sizes = np.bincount(cid, minlength=m).astype(np.float64)
                variance = m / (m - 1) * float(np.sum((hit_sums - p * sizes) ** 2)) / n ** 2
                n_eff = n / max(variance / (p * (1 - p) / n), 1.0)
            else:
                n_eff = float(m)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    shrink = 1 + z * z / n_eff
    centre = (p + z * z / (2 * n_eff)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_hits(name: str, y: np.ndarray, pred: np.ndarray, positive: int | None
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows in the metric's denominator, whether each row is a hit) as two masks over all rows;
    None where the metric is not a proportion of this task (sensitivity of a multiclass one)."""
    if name == "top1":
        return np.ones(len(y), bool), pred == y
    if name in ("sensitivity", "specificity") and positive is not None:
        want = positive if name == "sensitivity" else 1 - positive
        return y == want, pred == want
    return None


@dataclass
class Bootstrap:
    """Confidence intervals of a split's metrics: Wilson score intervals for proportions
    (PROPORTION_METRICS), percentile-bootstrap ones for the rest, with how many resamples each
    bootstrapped metric could use."""

    ci: dict[str, tuple[float, float]]        # metric -> (low, high)
    n_valid: dict[str, int]                   # bootstrapped metric -> resamples where it was defined
    n_boot: int                               # resamples drawn
    grouped: bool                             # whole groups (patients) were resampled (some group has > 1 row)
    alpha: float = 0.05
    n_units: int | None = None                # what was resampled: distinct groups, or rows
    # multi-label: per label (column order) its PER_LABEL_CI_METRICS intervals and valid resamples
    per_label: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    per_label_n_valid: list[dict[str, int]] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)   # metric -> "wilson" | "bootstrap"
    flat: list[str] = field(default_factory=list)           # bootstrapped metrics whose interval has zero width
    scarce: list[tuple[str, int]] = field(default_factory=list)  # (class / label, rows or patients) < MIN_CLASS_UNITS

    def describe(self) -> str:
        """How the intervals were made, in one line for console titles and the report."""
        level = f"{100 * (1 - self.alpha):g} % intervals"
        wilson = [m for m, how in self.methods.items() if how == "wilson"]
        boot = [m for m, how in self.methods.items() if how == "bootstrap"]
        if any("sensitivity" in ci or "specificity" in ci for ci in self.per_label):
            wilson.append("each label's sensitivity and specificity")
        if any("auroc" in ci for ci in self.per_label):
            boot.append("each label's auroc")
        parts = []
        if wilson:
            parts.append(f"Wilson score for {', '.join(wilson)}" + (" (patients by design effect)" if self.grouped else ""))
        if boot:
            parts.append(f"{self.n_boot} bootstrap resamples{' of whole groups' if self.grouped else ''} for "
                         f"{', '.join(boot)}")
        return f"{level}: {'; '.join(parts)}" if parts else level

    @property
    def warnings(self) -> list[str]:
        """Lines for what makes these intervals less than they seem: too few patients (rows) to
        resample, classes with fewer than MIN_CLASS_UNITS of them, zero-width bootstrap intervals,
        and metrics undefined in more than 5 % of the resamples."""
        out = [] if self.n_units is None else few_units_warning(self.n_units, self.grouped)
        if self.scarce and (any(h == "bootstrap" for h in self.methods.values())
                            or any("auroc" in ci for ci in self.per_label)):
            out.append(scarce_warning(self.scarce, self.grouped))
        flat = [(m, self.ci[m]) for m in self.flat] + [
            (f"label {name} auroc", ci["auroc"]) for name, ci in zip(self.label_names, self.per_label)
            if "auroc" in ci and ci["auroc"][0] == ci["auroc"][1]]
        out += [flat_warning(m, lo, hi) for m, (lo, hi) in flat]
        for m, n in self.n_valid.items():
            dropped = self.n_boot - n
            if dropped > BOOTSTRAP_WARN_DROPPED * self.n_boot:
                out.append(f"bootstrap: {m} was undefined in {dropped} of {self.n_boot} resamples "
                           f"({UNDEFINED_BECAUSE.get(m, UNDEFINED_BECAUSE['*'])}); its interval uses the {n} valid "
                           f"ones and may be too narrow.")
        for name, counts in zip(self.label_names, self.per_label_n_valid):
            short = {m: n for m, n in counts.items() if self.n_boot - n > BOOTSTRAP_WARN_DROPPED * self.n_boot}
            if short:
                out.append(f"bootstrap: for label {name}, {', '.join(f'{m} was undefined in {self.n_boot - n}' for m, n in short.items())} "
                           f"of {self.n_boot} resamples (no positive or no negative of it drawn); those intervals use "
                           f"the valid ones and may be too narrow.")
        return out

    def attach(self, block: dict[str, Any]) -> dict[str, Any]:
        """Store the intervals in a split's metrics (the one layout report reads); multi-label
        per-label intervals go into each per_label entry's "ci"."""
        block["ci"] = {k: [lo, hi] for k, (lo, hi) in self.ci.items()}
        block["bootstrap"] = {"n_boot": self.n_boot, "n_valid": dict(self.n_valid), "grouped": self.grouped,
                              "n_units": self.n_units, "level": 1 - self.alpha, "methods": dict(self.methods),
                              "describe": self.describe(), "warnings": self.warnings}
        for entry, ci, counts in zip(block.get("per_label") or [], self.per_label, self.per_label_n_valid):
            entry["ci"] = {k: [lo, hi] for k, (lo, hi) in ci.items()}
            entry["n_valid"] = dict(counts)
        return block


def bootstrap_metrics(y_true: np.ndarray, proba: np.ndarray,
                      metrics: Sequence[str] = ("top1", "balanced_accuracy", "auroc"), n_boot: int = 1000,
                      groups: Sequence[Any] | None = None, seed: int = 0, alpha: float = 0.05,
                      threshold: float | Sequence[float] | None = None, positive: int | None = None,
                      label_names: Sequence[str] | None = None) -> Bootstrap:
    """(1 - alpha) intervals: Wilson score intervals for proportions (top-1, sensitivity,
    specificity: proportion_interval), percentile bootstrap for the rest; with groups, whole groups
    (patients) are resampled, and the proportions' sample size is divided by the patients' design
    effect, so correlated images of one patient never make an interval look tighter than it is.
    Decisions use the same rule (threshold, positive class) as the point estimate. Multi-label: also
    each label's AUROC, sensitivity and specificity (Bootstrap.per_label; `label_names` name them)."""
    if n_boot < 1:
        raise ValueError(f"--bootstrap must be a positive number of resamples; got {n_boot}.")
    y_true, proba = as_labels(y_true), check_scores(proba)
    unknown = sorted(set(metrics) - set(BOOTSTRAP_METRICS))
    if unknown:
        raise ValueError(f"no bootstrap interval for {', '.join(unknown)}: metrics are "
                         f"{', '.join(sorted(BOOTSTRAP_METRICS))}.")
    idx_all = resample_indices(len(y_true), n_boot, groups, seed)
    keys = None if groups is None else group_keys(groups)
    wilson: dict[str, tuple[float, float]] = {}
    if y_true.ndim == 1:
        pos = (1 if positive is None else int(positive)) if proba.shape[1] == 2 else None  # as classification_metrics
        pred = decide(proba, threshold=threshold, positive=pos)
        for m in metrics:
            rows = proportion_hits(m, y_true, pred, pos) if m in PROPORTION_METRICS else None
            if rows is not None:
                interval = proportion_interval(rows[1], keys, alpha, rows=rows[0])
                if interval is not None:
                    wilson[m] = interval
    metrics = [m for m in metrics if m not in wilson]
    values: dict[str, list[float]] = {m: [] for m in metrics}
    complete = class_checker(y_true)
    same_f1_classes = (f1_class_checker(y_true, decide(proba, threshold=threshold, positive=positive))
                       if y_true.ndim == 1 else lambda idx: True)
    for idx in idx_all:
        yb, pb = y_true[idx], proba[idx]
        full = None
        every_class = complete(yb)
        for m in metrics:
            if m in CLASS_AVERAGED and not every_class:
                continue  # a mean over fewer classes than the point estimate's: undefined here
            if m == "macro_f1" and not same_f1_classes(idx):
                continue
            if m in _SCALARS and y_true.ndim == 1 and threshold is None:
                v = _SCALARS[m](yb, pb, positive)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    full = full or classification_metrics(yb, pb, threshold=threshold, positive=positive)
                v = full.get(m)
            if v is not None and np.isfinite(v):
                values[m].append(float(v))
    ci = {m: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) for m, v in values.items() if v}
    flat = [m for m, (lo, hi) in ci.items() if lo == hi]
    units = len(y_true) if keys is None else len(set(keys))
    methods = {m: "wilson" if m in wilson else "bootstrap" for m in [*wilson, *ci]}
    grouped = groups is not None and units < len(y_true)
    boot = Bootstrap({**wilson, **ci}, {m: len(v) for m, v in values.items()}, n_boot, grouped, alpha, units,
                     methods=methods, flat=flat, scarce=scarce_classes(y_true, keys if grouped else None, label_names))
    if y_true.ndim == 2:
        boot.per_label, boot.per_label_n_valid = _per_label_intervals(y_true, proba, idx_all, threshold, alpha, keys)
        boot.label_names = list(label_names) if label_names is not None else [str(j) for j in range(y_true.shape[1])]
    return boot


def scarce_warning(scarce: Sequence[tuple[str, int]], grouped: bool) -> str:
    """The line for classes (findings) with fewer than MIN_CLASS_UNITS rows or patients in a split."""
    unit = "patients" if grouped else "rows"
    few = ", ".join(f"{name} ({count} {unit})" for name, count in scarce)
    return (f"bootstrap: fewer than {MIN_CLASS_UNITS} {unit} of {few} in this split: AUROC and balanced-accuracy "
            f"intervals from so few undercover (at 4 positives a nominal 95 % interval held the true AUROC in 69-86 % "
            f"of simulated test sets) and no interval is honest there; report the counts beside the numbers.")


def flat_warning(metric: str, lo: float, hi: float) -> str:
    """The line for a bootstrap interval of zero width."""
    return (f"bootstrap: the {metric} interval [{lo:.4g}, {hi:.4g}] has zero width: every resample gave the same "
            f"value (e.g. a perfect separation of few positives), which says nothing about how uncertain it is; "
            f"more test rows are needed for an interval.")


def scarce_classes(y: np.ndarray, keys: Sequence[str] | None, names: Sequence[str] | None) -> list[tuple[str, int]]:
    """Classes (single-label) or labels' positives (multi-label) present in the split with fewer than
    MIN_CLASS_UNITS rows, or patients when `keys` are given: (name, count)."""
    columns = [y == c for c in np.unique(y)] if y.ndim == 1 else [y[:, j] > 0 for j in range(y.shape[1])]
    ids = [int(c) for c in np.unique(y)] if y.ndim == 1 else list(range(y.shape[1]))
    out = []
    for i, rows in zip(ids, columns):
        count = int(rows.sum()) if keys is None else len({k for k, r in zip(keys, rows) if r})
        if 0 < count < MIN_CLASS_UNITS:
            out.append((str(names[i]) if names is not None and i < len(names) else str(i), count))
    return out


PER_LABEL_CI_METRICS = ("auroc", "sensitivity", "specificity")  # multi-label: intervals per finding


def _per_label_intervals(y: np.ndarray, proba: np.ndarray, idx_all: Iterable[np.ndarray],
                         threshold: float | Sequence[float] | None, alpha: float, keys: Sequence[str] | None = None
                         ) -> tuple[list[dict[str, tuple[float, float]]], list[dict[str, int]]]:
    """Per label, the percentile interval of its AUROC over the same resamples as the headline
    intervals (undefined in a resample that draws no positive or no negative of that label), and
    Wilson intervals of its sensitivity / specificity at its threshold (patients by design effect
    with `keys`); a metric is absent for a label that has one class in the whole split (it has no
    point estimate either). Counts of valid resamples are the AUROC's."""
    c = y.shape[1]
    thresholds = np.full(c, DEFAULT_THRESHOLD) if threshold is None else np.broadcast_to(np.asarray(threshold, float), (c,))
    both = [j for j in range(c) if 0 < int((y[:, j] > 0).sum()) < len(y)]  # labels with an AUROC
    aurocs: dict[int, list[float]] = {j: [] for j in both}
    for idx in idx_all:  # one pass over the resamples for every label
        for j in both:
            yb = y[idx, j] > 0
            if 0 < int(yb.sum()) < len(yb):
                aurocs[j].append(_binary_auroc(yb.astype(int), proba[idx, j]))
    cis, counts = [], []
    for j in range(c):
        yj = y[:, j] > 0
        pred = proba[:, j] >= thresholds[j]
        ci: dict[str, tuple[float, float]] = {}
        for m, rows, hits in (("sensitivity", yj, pred), ("specificity", ~yj, ~pred)):
            interval = proportion_interval(hits, keys, alpha, rows=rows)
            if interval is not None:
                ci[m] = interval
        values = aurocs.get(j, [])
        if values:
            ci["auroc"] = (float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2)))
        cis.append({m: ci[m] for m in PER_LABEL_CI_METRICS if m in ci})
        counts.append({"auroc": len(values)} if j in aurocs else {})
    return cis, counts


def f1_class_checker(y_full: np.ndarray, pred_full: np.ndarray) -> Callable[[np.ndarray], bool]:
    """A test of a resample's rows (indices): does macro F1 average over the same classes there as
    on the full split (those in y or predicted)? A class predicted but absent from y enters macro
    F1 only in resamples that draw one of its predictions, which would mix two definitions in one
    interval; such resamples leave macro F1 undefined."""
    y_full, pred_full = np.asarray(y_full), np.asarray(pred_full)
    classes = np.union1d(y_full, pred_full)
    return lambda idx: np.array_equal(np.union1d(y_full[idx], pred_full[idx]), classes)


def class_checker(y_full: np.ndarray) -> Callable[[np.ndarray], bool]:
    """A test of a resample's labels: does it hold every class of the full split (single-label),
    or both classes of every label that has both there (multi-label)? Where it does not, the
    class-averaged metrics (CLASS_AVERAGED) would average over fewer classes than the point
    estimate -- a resample with no row of a rare diagnosis would report the mean recall of the
    others -- so they are undefined in that resample."""
    y_full = np.asarray(y_full)
    if y_full.ndim == 2:
        counts = (y_full > 0).sum(axis=0)
        cols = np.flatnonzero((counts > 0) & (counts < len(y_full)))

        def ok(yb: np.ndarray) -> bool:
            drawn = (yb[:, cols] > 0).sum(axis=0)
            return bool(((drawn > 0) & (drawn < len(yb))).all())
        return ok
    n_classes = np.unique(y_full).size
    return lambda yb: np.unique(yb).size == n_classes


def group_keys(groups: Sequence[Any]) -> list[str]:
    """One key per row: its patient id spelt once (stripped, 7.0 as 7), and a missing id (None, NaN,
    "") a patient of its own, as the store's row_groups has it, never one giant patient."""
    from featcache.store import row_keys  # the one spelling of an id (h5py only when groups are given)

    return row_keys(groups)


@dataclass(frozen=True)
class Resamples:
    """The row indices of each bootstrap resample, drawn again from the seed on every pass (the
    same resamples each time) rather than held all at once: 10,000 resamples of 50,000 test rows
    were 4 GB of indices."""

    n: int                                 # rows of the split
    n_boot: int                            # resamples
    seed: int
    members: tuple[np.ndarray, ...] | None = None  # per group (patient), its rows; None: rows drawn alone

    def __len__(self) -> int:
        return self.n_boot

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n_boot):
            if self.members is None:
                yield rng.integers(0, self.n, self.n)
            else:
                yield np.concatenate([self.members[g] for g in rng.integers(0, len(self.members), len(self.members))])


def resample_indices(n: int, n_boot: int, groups: Sequence[Any] | None, seed: int) -> Resamples:
    """Row indices of each bootstrap resample (iterate it, as often as needed): rows drawn with
    replacement, or whole groups."""
    if groups is None:
        return Resamples(n, n_boot, seed)
    if len(groups) != n:
        raise ValueError(f"expected one group (patient id) per row: {len(groups)} groups for {n} rows.")
    _, gid = np.unique(np.asarray(group_keys(groups), dtype=str), return_inverse=True)
    members = tuple(np.flatnonzero(gid == g) for g in range(gid.max() + 1))
    return Resamples(n, n_boot, seed, members)


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, metrics: Sequence[str] = ("top1", "balanced_accuracy", "auroc"),
                 n_boot: int = 1000, groups: Sequence[Any] | None = None, seed: int = 0, alpha: float = 0.05,
                 threshold: float | None = None, positive: int | None = None) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)} of bootstrap_metrics (the intervals alone)."""
    return bootstrap_metrics(y_true, proba, metrics, n_boot, groups, seed, alpha, threshold, positive).ci


def summarize_repeats(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median ± std (population, ddof 0) of every scalar metric over repeated runs (seeds), as in
    Matsoukas et al. A metric undefined (None, NaN) in some runs is summarised over the others:
    "values" holds those, so len(values) says over how many."""
    names = sorted({k for r in results for k, v in r.items()
                    if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))})
    out = {}
    for name in names:
        vals = [float(r[name]) for r in results if isinstance(r.get(name), numbers.Real)
                and not isinstance(r.get(name), (bool, np.bool_)) and np.isfinite(r[name])]
        if vals:
            out[name] = {"median": float(np.median(vals)), "std": population_std(vals), "values": vals}
    return out


def population_std(values: Sequence[float]) -> float:
    """The std (ddof 0) of repeated runs or tries; values equal up to float rounding (the same balanced
    accuracy summed in another order) have std 0 exactly, not the 1e-17 of their rounding."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.ptp(values) <= 8 * np.finfo(np.float64).eps * max(1.0, float(np.abs(values).max())):
        return 0.0
    return float(np.std(values))
