"""Evaluation protocols on a feature file: k-NN and the logistic probe, end to end.

``knn.knn_eval`` and ``probe.LogisticProbe`` are the algorithms on arrays; this module is the
protocol around them that a command line or a notebook runs on a FeatureStore: which rows of
which splits, the positive class of a binary task, the headline metrics with bootstrap
intervals, and a run directory (runs.write_run). The CLI only parses options and prints.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, MutableMapping, Sequence

import numpy as np

from featcache.knn import knn_eval
from featcache.metrics import (DEFAULT_THRESHOLD_RULE, balanced_accuracy, bootstrap_metrics, check_threshold_task,
                               choose_threshold_rule, population_std, threshold_record, train_coverage_notes,
                               classification_metrics, decide, group_keys, perfect_score, proportion_interval,
                               resolve_positive, scalar_metrics)
from featcache.names import CI_METRICS
from featcache.plots import confusion_matrix_plot, evaluation_figures, few_shot_plot, knn_curve_plot, roc_pr_plot
from featcache.prediction import array_proba, probe_head_payload, saved_untuned
from featcache.probe import LogisticProbe, expand_proba, resolve_cs
from featcache.runs import write_run
from featcache.store import FeatureStore, check_distinct_splits, check_labels, resolve_val_split



@dataclass
class SplitArrays:
    """The done, labelled rows of one split as arrays."""

    name: str
    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    groups: list[str] | None


def load_split_arrays(store: FeatureStore, split: str, features: str, purpose: str) -> SplitArrays:
    """(X, y, rows, groups) of a split's done, labelled rows, or a ValueError saying what is there."""
    if split not in store.splits:
        raise ValueError(f"{store.path.name} has no split {split!r} for {purpose}; it has: {', '.join(store.splits)}.")
    view = store[split]
    x, y, rows = view.arrays(features)
    if len(y) == 0:
        raise ValueError(f"split {split!r} of {store.path.name} has no labelled, extracted rows to use for {purpose}.")
    check_labels(y, len(store.classes), f"{store.path.name} split {split!r}")
    return SplitArrays(split, x, y, rows, view.row_groups(rows))


def cached_split_arrays(store: FeatureStore, split: str, features: str, purpose: str,
                        arrays: MutableMapping[str, SplitArrays] | None) -> SplitArrays:
    """load_split_arrays through a cache keyed by split name, so a caller that runs several
    protocols on one file (featcache compare: k-NN, probe, few-shot) reads each split once."""
    if arrays is None:
        return load_split_arrays(store, split, features, purpose)
    if split not in arrays:
        arrays[split] = load_split_arrays(store, split, features, purpose)
    return arrays[split]


def _with_few_shot_notes(notes: list[str], few_shot: "FewShotResult | None") -> list[str]:
    """A run's notes and its few-shot curve's (k capped, classes smaller than the shot count, whole
    patients drawn): every note the command prints is in metrics.json too."""
    return list(dict.fromkeys(notes + (few_shot.notes if few_shot else [])))


def knn_inputs(store: FeatureStore, features: str, split: SplitArrays) -> SplitArrays:
    """A split's features as k-NN compares them: a composite kind (cls+pooled, cls@4+pooled) has
    each part L2-normalised on its own, so its cosine is the mean of the parts' cosines. Raw
    concatenation would weigh each part by its squared norm: a mean patch token 20 times the CLS
    token's norm made "cls+pooled" k-NN the pooled k-NN (0.19 where cls alone gave 1.00)."""
    parts = store.part_columns(features)
    if len(parts) < 2:
        return split
    x = np.asarray(split.x, dtype=np.float32).copy()  # the cached arrays are shared with other protocols
    for cols in parts:
        norm = np.linalg.norm(x[:, cols], axis=1, keepdims=True)
        x[:, cols] /= np.where(norm > 0, norm, 1.0)
    return dataclasses.replace(split, x=x)


def _base_config(store: FeatureStore, kind: str, features: str) -> dict[str, Any]:
    return {"kind": kind, "features_file": str(store.path.resolve()), "fingerprint": store.fingerprint,
            "model": store.config.get("model"), "features": features}


# ----------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------

@dataclass
class KnnResult:
    """Every (k, T) row of a k-NN evaluation and the headline (first k, first T) metrics."""

    config: dict[str, Any]
    rows: list[dict[str, Any]]              # one per (T, k): top1, top5, balanced_accuracy, auroc, ...
    curve: dict[float, dict[int, dict[str, Any]]]  # knn_eval results without probabilities, for plots
    headline: dict[str, Any]                # classification_metrics at the first k and T (+ "ci")
    proba: np.ndarray                       # headline class scores of the eval rows
    eval: SplitArrays
    classes: list[str]
    positive: int | None
    warnings: list[str] = field(default_factory=list)
    few_shot: FewShotResult | None = None   # set by `featcache knn --shots`

    def metrics(self) -> dict[str, Any]:
        """metrics.json: the headline under "test" (or "val" when the eval split is val)."""
        key = "val" if self.eval.name == "val" else "test"
        out = {"positive_class": None if self.positive is None else self.classes[self.positive],
               "eval_split": self.eval.name, key: self.headline, "results": self.rows,
               "headline": self.config["headline"], "notes": _with_few_shot_notes(self.warnings, self.few_shot)}
        return {**out, **(self.few_shot.metrics() if self.few_shot else {})}

    def save(self, out: str | Path) -> Path:
        curve = self.curve if len(self.curve) > 1 else next(iter(self.curve.values()))
        first = next(iter(next(iter(self.curve.values())).values()))
        shown = ("top1", "top5") if "top1" in first else ("auroc",)
        title = (f"k-NN on {self.eval.name} ({self.config['train_split']} as neighbours), "
                 f"T = {', '.join(f'{t:g}' for t in self.config['temperatures'])}")

        def figures(fig_dir: Path) -> None:
            knn_curve_plot(curve, fig_dir / "knn_curve", metrics=shown, title=title)
            k, t = self.config["headline"]["k"], self.config["headline"]["temperature"]
            where = f"{self.eval.name}, k = {k}, T = {t:g}"
            y = np.asarray(self.eval.y)
            if y.ndim == 1 and self.headline.get("confusion_matrix") is not None:
                confusion_matrix_plot(self.headline["confusion_matrix"], self.classes, fig_dir / "confusion_matrix",
                                      title=f"k-NN confusion matrix ({where})")
            if y.ndim == 2 or self.proba.shape[1] == 2:  # vote shares as scores; no calibration: votes are no probabilities
                roc_pr_plot(y, self.proba, fig_dir / "roc_pr", classes=self.classes, positive=self.positive,
                            title=f"k-NN, {where}")
            if self.few_shot:
                self.few_shot.figure(fig_dir / "few_shot")

        return write_run(out, self.config, self.metrics(), figures=figures)


def run_knn(store: FeatureStore, *, train_split: str = "train", eval_split: str = "test",
            ks: Sequence[int] = (10, 20, 100, 200), temperatures: Sequence[float] = (0.07,),
            weighting: str = "distance", features: str = "cls", backend: str = "auto", bootstrap: int = 0,
            positive_class: str | None = None, seed: int = 0,
            arrays: MutableMapping[str, SplitArrays] | None = None) -> KnnResult:
    """DINO's weighted k-NN of one split's rows against another's, every k and T from one search.
    `arrays` (split name -> SplitArrays of `features`) reuses splits already read."""
    train = knn_inputs(store, features, cached_split_arrays(store, train_split, features, "neighbours", arrays))
    ev = knn_inputs(store, features, cached_split_arrays(store, eval_split, features, "evaluation", arrays))
    classes = list(store.classes)
    notes = []
    if train_split == eval_split:
        notes.append(f"the neighbours and the evaluated rows are the same split ({train_split!r}): each row finds "
                     f"itself at similarity 1, so these numbers are optimistic. Pass --eval-split another split.")
    leak = store.leakage_note([train_split, eval_split])
    if leak:
        notes.append(leak)
    multilabel = train.y.ndim == 2
    positive = resolve_positive(classes, train.y, positive_class, multilabel)
    notes += train_coverage_notes(train.y, classes, train_split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = knn_eval(train.x, train.y, ev.x, ev.y, ks=ks, temperature=tuple(temperatures), weighting=weighting,
                       num_classes=len(classes), backend=backend, return_proba=True, positive=positive)
    notes += [str(w.message) for w in caught]
    if bootstrap and not multilabel:
        add_curve_cis(res, ev, positive)
    rows = [{"k": k, "temperature": t, **{m: v for m, v in r.items() if m not in ("proba", "temperature")}}
            for t, per_k in res.items() for k, r in per_k.items()]
    head_k, head_t = list(ks)[0], float(list(temperatures)[0])
    proba = res[head_t][head_k]["proba"]
    headline = classification_metrics(ev.y, proba, classes=classes, positive=positive)
    if bootstrap:
        names = [m for m in CI_METRICS if headline.get(m) is not None]
        boot = bootstrap_metrics(ev.y, proba, metrics=names, n_boot=bootstrap, groups=ev.groups, seed=seed,
                                 positive=positive, label_names=classes)
        boot.attach(headline)
        notes += boot.warnings
    config = {**_base_config(store, "knn", features), "train_split": train_split, "eval_split": eval_split,
              "weighting": weighting, "ks": [int(k) for k in ks], "temperatures": [float(t) for t in temperatures],
              "headline": {"k": head_k, "temperature": head_t}, "bootstrap": bootstrap, "seed": int(seed),
              "n_train": int(len(train.y)), "n_eval": int(len(ev.y))}
    curve = {t: {k: {m: v for m, v in r.items() if m != "proba"} for k, r in per_k.items()} for t, per_k in res.items()}
    return KnnResult(config, rows, curve, headline, proba, ev, classes, positive, notes)


def add_curve_cis(res: dict, ev: SplitArrays, positive: int | None) -> None:
    """top1_ci of every (T, k) for the CI band of the k-NN curve: the Wilson interval the
    headline's top-1 gets (metrics.proportion_interval; patients by design effect)."""
    keys = None if ev.groups is None else group_keys(ev.groups)
    for per_k in res.values():
        for row in per_k.values():
            hit = decide(row["proba"], positive=positive) == ev.y
            row["top1_ci"] = list(proportion_interval(hit, keys))


# ----------------------------------------------------------------------------------------------
# logistic probe
# ----------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """A fitted probe, its C sweep, and its test metrics (computed exactly as predict computes them)."""

    config: dict[str, Any]
    probe: LogisticProbe
    classes: list[str]
    positive: int | None
    threshold: float | list[float] | None
    threshold_rule: str | None
    test: dict[str, Any] | None
    test_split: SplitArrays | None
    test_proba: np.ndarray | None
    head: tuple[dict, dict]                 # the deployable linear head (prediction.save_head)
    warnings: list[str] = field(default_factory=list)
    few_shot: FewShotResult | None = None   # set by `featcache probe --shots`

    def metrics(self) -> dict[str, Any]:
        p = self.probe
        val = {p.metric: p.best_score_}
        if p.metric == "accuracy":
            val["top1"] = p.best_score_
        out = {"best_C": p.best_C_, "selection": p.selection_, "cv_folds": p.cv_folds_, "metric": p.metric,
               "features": self.config["features"], "scores": {f"{c:g}": s for c, s in p.scores_.items()},
               "n_iter": {f"{c:g}": n for c, n in p.n_iter_.items()},
               "converged": {f"{c:g}": ok for c, ok in p.converged_.items()},
               "n_iter_refit": p.n_iter_refit_, "converged_refit": p.converged_refit_,
               "val": val, "test": self.test,
               "positive_class": None if self.positive is None else self.classes[self.positive],
               "notes": _with_few_shot_notes(self.warnings, self.few_shot)}
        if self.threshold is not None:
            out["threshold"] = threshold_record(self.threshold_rule, self.threshold, saved_untuned(self.head[1]))
        elif self.positive is not None or p.multilabel_:  # decided at the default, as train records it
            out["threshold"] = threshold_record(DEFAULT_THRESHOLD_RULE, 0.5 if self.positive is not None
                                                else [0.5] * len(self.classes))
        return {**out, **(self.few_shot.metrics() if self.few_shot else {})}

    def save(self, out: str | Path) -> Path:
        def figures(fig_dir: Path) -> None:
            if self.test_proba is not None:
                evaluation_figures(fig_dir, self.test, self.test_split.y, self.test_proba, self.classes,
                                   split=self.test_split.name, threshold=self.threshold, positive=self.positive,
                                   groups=self.test_split.groups)
            if self.few_shot:
                self.few_shot.figure(fig_dir / "few_shot")

        return write_run(out, self.config, self.metrics(), head=self.head, figures=figures)


def run_probe(store: FeatureStore, *, train_split: str = "train", val_split: str | None = "val",
              test_split: str | None = "test", features: str = "cls", Cs: Any = None, metric: str = "accuracy",
              class_weight: str | None = None, cv: int = 5, refit: bool = True, bootstrap: int = 0,
              max_iter: int = 1000, positive_class: str | None = None, threshold: str | None = None,
              progress: bool = False, seed: int = 0,
              arrays: MutableMapping[str, SplitArrays] | None = None) -> ProbeResult:
    """Standardise, sweep C (val split, or grouped CV on train when there is none), refit on train +
    val at the best C, and evaluate the deployable head once on the test split. `arrays` (split
    name -> SplitArrays of `features`) reuses splits already read."""
    notes: list[str] = []
    val_split = resolve_val_split(store.splits, val_split)
    use_val = bool(val_split) and val_split in store.splits
    use_test = bool(test_split) and test_split in store.splits
    check_distinct_splits(train_split, val_split if use_val else None, test_split if use_test else None)
    train = cached_split_arrays(store, train_split, features, "training the probe", arrays)
    val = cached_split_arrays(store, val_split, features, "choosing C", arrays) if use_val else None
    test = cached_split_arrays(store, test_split, features, "testing", arrays) if use_test else None
    leak = store.leakage_note([train_split, val_split if use_val else None, test_split if use_test else None])
    if leak:
        notes.append(leak)
    classes = list(store.classes)
    multilabel = train.y.ndim == 2
    if not multilabel and np.unique(train.y).size < 2:
        raise ValueError(f"split {train_split!r} of {store.path.name} has a single class "
                         f"({classes[int(train.y[0])]}); a probe needs at least two classes to train on.")
    positive = resolve_positive(classes, train.y, positive_class, multilabel)
    if refit and val is not None:  # the final fit sees train + val: what it cannot learn is what both lack
        notes += train_coverage_notes(np.concatenate([train.y, val.y]), classes, f"{train_split} + {val_split}")
    else:
        notes += train_coverage_notes(train.y, classes, train_split)
    rule = None if threshold in (None, "0.5") else threshold
    check_threshold_task(rule, len(classes), multilabel)   # before the sweep, and before the rules below
    if rule is not None and val is None and not _is_number(rule):  # before the CV sweep, not after it
        raise ValueError(f"--threshold {rule} is chosen on a validation split; {store.path.name} has none (the probe "
                         f"chose C by cross-validation). Give a number, or add a validation split.")
    if rule is not None and refit and use_val and not _is_number(rule):
        raise ValueError(f"--threshold {rule} is chosen on the validation split, but the probe is refitted on train + "
                         f"val, so no unseen rows are left to choose it on. Add --no-refit, or give a number.")
    cs = resolve_cs(Cs)
    probe = LogisticProbe(Cs=cs, metric=metric, cv=cv, refit=refit, max_iter=max_iter,
                          class_weight=class_weight, progress=progress, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        probe.fit(train.x, train.y, val.x if val else None, val.y if val else None,
                  groups=None if use_val else train.groups)
    notes += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    unconverged = [f"{c:g}" for c, ok in probe.converged_.items() if not ok]
    if unconverged:
        notes.append(f"the probe did not converge at C = {', '.join(unconverged)} (lbfgs reached max_iter = {max_iter} "
                     f"or its line search found no decrease): "
                     f"those scores are of unconverged models; raise --max-iter to fit them.")
    notes += tied_c_notes(probe.scores_, probe.best_C_, metric)
    config = {**_base_config(store, "probe", features), "train_split": train_split,
              "val_split": val_split if use_val else None, "test_split": test_split if use_test else None,
              "Cs": [float(c) for c in cs], "metric": metric, "class_weight": class_weight, "cv": cv,
              "refit": refit, "bootstrap": bootstrap, "seed": int(seed), "max_iter": max_iter,
              "n_train": int(len(train.y)), "n_val": int(len(val.y)) if val else 0,
              "n_test": int(len(test.y)) if test else 0}
    untuned: dict[str, str] = {}

    def exported(threshold: float | list[float] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        return probe_head_payload(probe, classes=classes, fingerprint=store.fingerprint,
                                  model_name=store.config.get("model"), features=features, threshold=threshold,
                                  threshold_rule=rule, positive=positive, recipe=config, threshold_untuned=untuned)

    t_value = None
    if rule is not None:
        # on the probabilities predict will compute (the exported float32 head), not scikit-learn's
        # float64 ones: a row that defines the threshold must not fall 2e-8 below it when deployed.
        # Without a validation split only a number gets here (refused above otherwise): used as given.
        on = val if val is not None else train
        t_value = choose_threshold_rule(rule, on.y, array_proba(exported(None), on.x), positive, notes, classes,
                                        untuned, train_y=train.y, val_groups=on.groups)
    head = exported(t_value)
    metrics = proba = None
    if test is not None:
        proba = array_proba(head, test.x)   # exactly what predict computes from the saved head
        metrics = classification_metrics(test.y, proba, classes=classes, threshold=t_value, positive=positive)
        if not multilabel:
            predicted = np.unique(decide(proba, threshold=t_value, positive=positive))
            if predicted.size == 1 and np.unique(test.y).size > 1:
                notes.append(f"the probe predicts {classes[int(predicted[0])]!r} for every {test_split} row (C = "
                             f"{probe.best_C_:g}): at the C chosen its features separate nothing, so its accuracy is "
                             f"that class's share; its AUROC still ranks the rows.")
        if bootstrap:
            names = [m for m in CI_METRICS if metrics.get(m) is not None]
            boot = bootstrap_metrics(test.y, proba, metrics=names, n_boot=bootstrap, groups=test.groups, seed=seed,
                                     threshold=t_value, positive=positive, label_names=classes)
            boot.attach(metrics)
            notes += boot.warnings
    return ProbeResult(config, probe, classes, positive, t_value, rule, metrics, test, proba, head, notes)


def tied_c_notes(scores: dict[float, float], best_c: float, metric: str) -> list[str]:
    """A line when three or more C values share the best selection score: the metric does not tell
    them apart (plain accuracy on imbalanced data, where every strong penalty predicts the majority
    class), and the tie went to the strongest regularisation."""
    finite = {c: v for c, v in scores.items() if v is not None and math.isfinite(v)}
    if not finite:
        return []
    top = max(finite.values())
    tied = sorted(c for c, v in finite.items() if v >= top - 1e-12)
    if len(tied) < 3 or perfect_score(top, metric):  # nothing to separate
        return []
    others = [m for m in ("auroc", "balanced_accuracy", "loss") if m != metric][:2]
    return [f"{len(tied)} C values tie at the best validation {metric} ({top:.4f}; C = {tied[0]:g} ... {tied[-1]:g}): "
            f"C = {best_c:g}, the strongest regularisation among them, was taken, but the metric does not tell them "
            f"apart; choose by --metric {' or '.join(others)} (auroc: binary tasks)."]


def _expanded(probe: LogisticProbe, x: np.ndarray, n_classes: int) -> np.ndarray:
    proba = probe.predict_proba(x)
    return proba if probe.multilabel_ else expand_proba(proba, probe.classes_, n_classes)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# few-shot curves (DINOv2's n_per_class / n_tries)
# ----------------------------------------------------------------------------------------------

FEW_SHOT_METHODS = ("knn", "probe")
DEFAULT_SHOTS = (1, 2, 5, 10)


@dataclass
class FewShotResult:
    """Accuracy of one method trained on n rows per class, mean ± std over tries, per n.

    summary: one row per shot count (shots, tries, n_train, n_train_per_class, top1_mean, top1_std,
    balanced_accuracy_mean, balanced_accuracy_std, and auroc_mean / auroc_std for binary tasks);
    per_try: one row per (shots, try). The std is numpy's population std over the tries (ddof 0),
    as summarize_repeats computes it."""

    method: str
    config: dict[str, Any]
    summary: list[dict[str, Any]]
    per_try: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """What goes into metrics.json and --json: the summary as a table, every try, the recipe."""
        return {"few_shot": self.summary, "few_shot_per_try": self.per_try, "few_shot_config": self.config}

    def figure(self, path_stem: str | Path) -> list[Path]:
        """Accuracy against shots with a ±std band (figures/few_shot.png in a run directory); a
        binary task also gets AUROC against shots (figures/few_shot_auroc.png)."""
        title = f"few-shot {self.method} on {self.config['eval_split']} ({self.config['tries']} tries per shot count)"
        paths = few_shot_plot({self.method: self.summary}, path_stem, title=title)
        if any(r.get("auroc_mean") is not None for r in self.summary):
            stem = Path(path_stem)
            paths += few_shot_plot({self.method: self.summary}, stem.with_name(stem.name + "_auroc"), metric="auroc",
                                   title=title + f", positive class {self.config['positive_class']}")
        return paths


def few_shot_rows(y: np.ndarray, groups: Sequence[str] | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into y of one few-shot training set: n rows of every class, drawn without
    replacement (all of a class's rows when it has fewer than n).

    With groups (patients), whole groups are drawn instead, so no patient is split between the
    drawn and the undrawn rows: groups are visited in a random order and a group is taken when it
    holds a row of a class that still has fewer than n rows; the walk stops once every class has at
    least n (or all it has). A class can therefore get more than n rows."""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    need = {int(c): min(n, int(k)) for c, k in zip(classes, counts)}
    if groups is None:
        picks = [rng.choice(np.flatnonzero(y == c), size=need[int(c)], replace=False) for c in classes]
        return np.sort(np.concatenate(picks))
    _, gid = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(gid == g) for g in range(int(gid.max()) + 1)]
    have = dict.fromkeys(need, 0)
    taken = []
    for g in rng.permutation(len(members)):
        if all(have[c] >= need[c] for c in need):
            break
        labels = y[members[g]]
        if any(have[int(c)] < need[int(c)] for c in np.unique(labels)):
            taken.append(members[g])
            for c in labels:
                have[int(c)] += 1
    return np.sort(np.concatenate(taken))


def few_shot_rng(seed: int, shots: int, attempt: int) -> np.random.Generator:
    """The generator of one draw: seeded by (seed, shots, try), so a try's rows do not depend on
    which other shot counts or how many tries were asked for."""
    return np.random.default_rng([int(seed), int(shots), int(attempt)])


def few_shot(store: FeatureStore, *, method: str = "knn", shots: Sequence[int] = DEFAULT_SHOTS, tries: int = 5,
             seed: int = 0, train_split: str = "train", val_split: str | None = "val", eval_split: str = "test",
             features: str = "cls", k: int = 20, temperature: float = 0.07, weighting: str = "distance",
             backend: str = "auto", Cs: Any = None, metric: str = "accuracy", max_iter: int = 1000,
             positive_class: str | None = None, class_weight: str | dict | None = None,
             arrays: MutableMapping[str, SplitArrays] | None = None) -> FewShotResult:
    """Train k-NN or the probe on `shots` rows per class of the train split (few_shot_rows, drawn
    anew per try with few_shot_rng), evaluate each on the full eval split, and summarise top-1 and
    balanced accuracy (and for binary tasks the positive class's AUROC) as mean ± std over the
    tries; each try records its rows per class.

    The probe chooses C on the full validation split and is not refitted on train + val (that would
    no longer be few-shot), so a file without a validation split is refused for it; `class_weight`
    is the full probe's (a drawn set of groups can be imbalanced). Decisions are at 0.5 (binary)
    or the top class: a threshold rule is the full run's only."""
    if method not in FEW_SHOT_METHODS:
        raise ValueError(f"few-shot method must be one of {', '.join(FEW_SHOT_METHODS)}; got {method!r}.")
    shots = sorted({int(n) for n in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"--shots must be positive numbers of rows per class, e.g. 1,2,5,10; got {shots}.")
    if tries < 1:
        raise ValueError(f"--tries must be at least 1; got {tries}.")
    train = cached_split_arrays(store, train_split, features, "few-shot training rows", arrays)
    val_split = resolve_val_split(store.splits, val_split)
    ev = cached_split_arrays(store, eval_split, features, "few-shot evaluation", arrays)
    if method == "knn":
        train, ev = knn_inputs(store, features, train), knn_inputs(store, features, ev)
    if train.y.ndim == 2:
        raise ValueError("few-shot draws n rows per class, which needs single-label data; this file is multi-label.")
    val = None
    if method == "probe":
        if not val_split or val_split not in store.splits:
            raise ValueError(f"the few-shot probe chooses C on a validation split, and {store.path.name} has no "
                             f"split {val_split!r} (it has {', '.join(store.splits)}); pass --val-split NAME.")
        val = cached_split_arrays(store, val_split, features, "choosing C", arrays)
    classes = list(store.classes)
    positive = resolve_positive(classes, train.y, positive_class)
    notes = _few_shot_notes(classes, train, shots)
    per_try: list[dict[str, Any]] = []
    caught_all: list[str] = []
    for n in shots:
        for attempt in range(tries):
            idx = few_shot_rows(train.y, train.groups, n, few_shot_rng(seed, n, attempt))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                proba = _few_shot_proba(method, train.x[idx], train.y[idx], ev.x, val, len(classes), positive,
                                        k=k, temperature=temperature, weighting=weighting, backend=backend, Cs=Cs,
                                        metric=metric, max_iter=max_iter, seed=seed, class_weight=class_weight)
            caught_all += [str(w.message) for w in caught]
            pred = decide(proba, positive=positive)
            row = {"shots": n, "try": attempt, "n_train": int(len(idx)),
                   "n_train_per_class": dict(zip(classes, np.bincount(train.y[idx], minlength=len(classes)).tolist())),
                   "top1": float(np.mean(pred == ev.y)), "balanced_accuracy": balanced_accuracy(ev.y, pred)}
            if positive is not None:
                row["auroc"] = scalar_metrics(("auroc",), ev.y, proba, positive=positive)["auroc"]
            per_try.append(row)
    notes += list(dict.fromkeys(_short_warning(w) for w in caught_all))
    config = {"method": method, "shots": shots, "tries": int(tries), "seed": int(seed), "train_split": train_split,
              "val_split": val_split if method == "probe" else None, "eval_split": eval_split, "features": features,
              "n_eval": int(len(ev.y)), "grouped": train.groups is not None,
              "positive_class": None if positive is None else classes[positive],
              "threshold": 0.5 if positive is not None else None, "nested": False,
              **({"k": int(k), "temperature": float(temperature), "weighting": weighting} if method == "knn"
                 else {"Cs": [float(c) for c in resolve_cs(Cs)], "metric": metric, "refit": False,
                       "class_weight": class_weight})}
    return FewShotResult(method, config, summarize_few_shot(per_try), per_try, notes)


FEW_SHOT_METRICS = ("top1", "balanced_accuracy", "auroc")  # auroc: binary tasks only


def summarize_few_shot(per_try: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per shot count: tries, training rows (in all and per class; a mean when tries
    differ, as whole groups make them), and mean / std (ddof 0) over the tries of top-1, balanced
    accuracy and, for binary tasks, AUROC (over the tries where it is defined)."""
    out = []
    for n in sorted({r["shots"] for r in per_try}):
        rows = [r for r in per_try if r["shots"] == n]
        row: dict[str, Any] = {"shots": n, "tries": len(rows), "n_train": _count_or_mean([r["n_train"] for r in rows])}
        if all("n_train_per_class" in r for r in rows):  # class name -> rows drawn of it
            row["n_train_per_class"] = {c: _count_or_mean([r["n_train_per_class"][c] for r in rows])
                                        for c in rows[0]["n_train_per_class"]}
        for m in FEW_SHOT_METRICS:
            if m not in rows[0]:
                continue
            values = np.array([r[m] for r in rows if r.get(m) is not None], dtype=np.float64)
            # one try has no spread to speak of: n/a, not a measured 0
            row[f"{m}_mean"] = float(values.mean()) if len(values) else None
            row[f"{m}_std"] = population_std(values.tolist()) if len(values) > 1 else None
        out.append(row)
    return out


def _count_or_mean(counts: Sequence[int]) -> int | float:
    """A row count stays a count; when the tries differ (whole groups drawn) their mean."""
    return int(counts[0]) if len(set(counts)) == 1 else float(np.mean(counts))


def _few_shot_proba(method: str, tx: np.ndarray, ty: np.ndarray, ex: np.ndarray, val: SplitArrays | None,
                    n_classes: int, positive: int | None, *, k: int, temperature: float, weighting: str,
                    backend: str, Cs: Any, metric: str, max_iter: int, seed: int,
                    class_weight: str | dict | None = None) -> np.ndarray:
    """Class scores of the eval rows from one few-shot training set."""
    if method == "knn":
        dummy = np.zeros(len(ex), dtype=np.int64)  # knn_eval scores labels too; only the scores are used here
        res = knn_eval(tx, ty, ex, dummy, ks=(k,), temperature=temperature, weighting=weighting,
                       num_classes=n_classes, backend=backend, return_proba=True, positive=positive)
        return res[k]["proba"]
    probe = LogisticProbe(Cs=resolve_cs(Cs), metric=metric, refit=False, max_iter=max_iter, random_state=seed,
                          class_weight=class_weight)
    probe.fit(tx, ty, val.x, val.y)
    return _expanded(probe, ex, n_classes)


def _few_shot_notes(classes: list[str], train: SplitArrays, shots: Sequence[int]) -> list[str]:
    """Say which classes have fewer train rows than the largest shot count (all their rows are used)."""
    counts = np.bincount(train.y, minlength=len(classes))
    short = [f"{classes[c]} ({counts[c]})" for c in range(len(classes)) if 0 < counts[c] < max(shots)]
    missing = [classes[c] for c in range(len(classes)) if counts[c] == 0]
    notes = []
    if missing:
        notes.append(f"classes with no {train.name} rows: {', '.join(missing)}; they can never be predicted, at any "
                     f"shot count.")
    if short:
        notes.append(f"classes with fewer {train.name} rows than {max(shots)} shots: {', '.join(short)}; at those "
                     f"shot counts every row of theirs is used.")
    if train.groups is not None:
        notes.append(f"{train.name} has groups: whole groups are drawn until each class has the shot count of rows, "
                     f"so some classes get more rows (n_train_per_class says how many).")
    return notes


def _short_warning(text: str) -> str:
    """A k-NN cap warning without the per-draw row count, so repeats collapse to one note."""
    if "exceeds the" in text and "capped" in text:
        return "k exceeds the few-shot training rows at small shot counts; it is capped at the rows drawn."
    return text
