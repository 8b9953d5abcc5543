"""Logistic-regression probe: the standard linear read-out of frozen features, C chosen honestly.

Features are standardised (a StandardScaler fitted on the training rows, so large-norm backbones
and small-norm ones share one C grid), then an L2 logistic regression (scikit-learn's objective,
multinomial for several classes, one-vs-rest per label for multi-label) is fitted for every C of a
log grid. C is chosen on the validation split, or by cross-validation when there is none
(StratifiedGroupKFold when groups — patients — are known, so one patient never sits on both sides;
StratifiedKFold otherwise). The model is then refitted on train + val at the chosen C and
evaluated once on the test split.

The fits are featcache.logistic's preconditioned L-BFGS, walked along ascending C with each fit
started from the previous one (its coefficients and logits), and each stopped only when it is
converged at its own C (logistic.fit_logistic says when that is); the fitted coefficients are
stored in scikit-learn LogisticRegression objects, whose predict_proba serves prediction.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from featcache.logistic import (CONVERGED_STOPS, DEFAULT_RTOL, DEFAULT_STEP_TOL, GramPreconditioner,
                                LogisticFit, check_fits_in_memory, fit_logistic)
from featcache.metrics import SELECTION_METRICS, classification_metrics, selection_score
from featcache.splitting import stratify_key

DEFAULT_CS = np.logspace(-6, 5, 12)
# DINOv2's logistic-regression evaluation grid (dinov2/eval/log_regression.py): 45 values, 1e-6 ... 1e5
DINOV2_CS = np.logspace(-6, 5, 45)
NAMED_CS = {"default": DEFAULT_CS, "dinov2": DINOV2_CS}


def resolve_cs(Cs: Any) -> np.ndarray:
    """A C grid from None (default), a grid name ("default", "dinov2") or numbers (a comma list)."""
    if isinstance(Cs, str) and Cs.strip().lower() not in NAMED_CS:
        try:
            return np.array([float(c) for c in Cs.split(",") if c.strip()])
        except ValueError:
            raise ValueError(f"--Cs must be comma-separated numbers or one of {', '.join(NAMED_CS)}; "
                             f"got {Cs!r}.") from None
    return _check_cs(Cs)


def _check_xy(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (features, labels) pair and return float32 X and labels as arrays."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be a 2-d (samples, features) array; got shape {x.shape}. "
                         f"Pass cls or pooled features, not tokens.")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise ValueError(f"{name}_y must have one label (or one 0/1 row for multi-label) per row of "
                         f"{name}_x: {name}_x has {len(x)} rows, {name}_y has shape {y.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or inf values; drop those rows (check the file's "
                         f"`done` flags) before probing.")
    if y.ndim == 1 and (y < 0).any():
        raise ValueError(f"{name}_y has {int((y < 0).sum())} unlabelled rows (label -1); "
                         f"select labelled rows first (SplitView.arrays does).")
    # float64 stays float64 until standardised (_standardized): a large common offset would
    # otherwise be rounded away in float32 before centring
    return x if x.dtype == np.float64 else x.astype(np.float32, copy=False), y


def _standardized(scaler: Any, x: np.ndarray) -> np.ndarray:
    """scaler.transform in the input's precision, then float32 (the solver's passes over X)."""
    return scaler.transform(x).astype(np.float32, copy=False)


def _check_cs(Cs: Any) -> np.ndarray:
    """The C grid as a sorted, unique, positive float array (ascending is what warm start needs).

    Cs may also name a grid: "default" (12 values, 1e-6 ... 1e5) or "dinov2" (DINOv2's 45 values)."""
    if isinstance(Cs, str):
        if Cs.lower() not in NAMED_CS:
            raise ValueError(f"Cs must be numbers or one of {', '.join(map(repr, NAMED_CS))}; got {Cs!r}.")
        Cs = NAMED_CS[Cs.lower()]
    cs = np.asarray(DEFAULT_CS if Cs is None else Cs, dtype=np.float64).ravel()
    if cs.size == 0 or not np.all(np.isfinite(cs)) or np.any(cs <= 0):
        shown = ", ".join(f"{c:g}" for c in cs) if cs.size else "none"
        raise ValueError(f"Cs must be positive finite numbers (e.g. 0.01, 0.1, 1, 10, or a named grid: "
                         f"{', '.join(NAMED_CS)}); got {shown}.")
    return np.unique(cs)


def _blas_threads(x: np.ndarray) -> Any:
    """Limit BLAS to one thread on small problems: there, thread start-up and spinning cost far
    more than the matmuls (a 1000 x 64 fit measured 40x slower with 2 threads on a busy 2-core
    machine); large problems keep every thread."""
    import contextlib

    if x.size >= 2_000_000:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class _PathModel:
    """One classifier per label (multi-label) or one multinomial classifier, fitted C after C.

    Holds scikit-learn LogisticRegression objects (so prediction is scikit-learn's own code)
    whose coefficients featcache.logistic fits; each C starts from the previous C's fit."""

    def __init__(self, multilabel: bool, max_iter: int, tol: float, class_weight: Any,
                 random_state: int, rtol: float | None, step_tol: float | None):
        self.multilabel = multilabel
        self.max_iter = max_iter
        self.tol = tol
        self.rtol = rtol              # convergence rule of every fit (logistic.fit_logistic)
        self.step_tol = step_tol
        self.class_weight = class_weight
        self.params = dict(solver="lbfgs", max_iter=max_iter, tol=tol, class_weight=class_weight,
                           random_state=random_state)
        self.models: list[Any] = []
        self.constants: list[float | None] = []   # multi-label: a label constant in train
        self.fits: list[LogisticFit | None] = []  # the last fit per model (its logits seed the next C)
        self.n_iter = 0                           # lbfgs steps at the last C (max over labels)
        self.stops: list[str] = []                # why each fit of the last C stopped (LogisticFit.stop)
        self._x: np.ndarray | None = None         # the design matrix the fits and preconditioner belong to
        self._gram: GramPreconditioner | None = None

    def fit(self, x: np.ndarray, y: np.ndarray, C: float) -> "_PathModel":
        """Fit at this C, from the previous C's fit when there is one."""
        from sklearn.linear_model import LogisticRegression

        columns = [y[:, j] for j in range(y.shape[1])] if self.multilabel else [y]
        if not self.models:
            self.models = [LogisticRegression(C=C, **self.params) for _ in columns]
            self.constants = [None] * len(columns)
        if self._x is not x:   # one preconditioner per design matrix, shared by every C and label
            self._x, self._gram = x, GramPreconditioner(x)
            self.fits = [None] * len(columns)   # their logits are of other rows
        self.n_iter, self.stops = 0, []
        with _blas_threads(x):
            for j, (model, target) in enumerate(zip(self.models, columns)):
                if self.multilabel and np.unique(target).size < 2:
                    self.constants[j] = float(target[0] > 0)
                    continue
                classes, index = np.unique(target, return_inverse=True)
                same = hasattr(model, "coef_") and np.array_equal(model.classes_, classes)
                init = self.fits[j] if same and self.fits[j] is not None else (
                    (model.coef_, model.intercept_) if same else None)
                fit = fit_logistic(x, index, classes.size, C, tol=self.tol, max_iter=self.max_iter,
                                   sample_weight=_sample_weight(target, self.class_weight), init=init,
                                   preconditioner=self._gram, rtol=self.rtol, step_tol=self.step_tol)
                # the fitted attributes of a scikit-learn model: prediction is scikit-learn's code
                model.set_params(C=C)
                model.classes_, model.coef_, model.intercept_ = classes, fit.coef, fit.intercept
                model.n_features_in_, model.n_iter_ = x.shape[1], np.array([fit.n_iter])
                self.fits[j] = fit
                self.n_iter = max(self.n_iter, fit.n_iter)
                self.stops.append(fit.stop)
        return self

    def release(self) -> "_PathModel":
        """Drop what only the next C needs (the design matrix, its preconditioner, the fits' n x K
        logits), so a fitted probe holds its coefficients and nothing of the size of the data."""
        self._x, self._gram, self.fits = None, None, []
        return self

    @property
    def converged(self) -> bool:
        """Every fit of the last C met the convergence rule (LogisticFit.converged)."""
        return all(stop in CONVERGED_STOPS for stop in self.stops)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities, or (N, L) per-label positive probabilities."""
        if not self.multilabel:
            # float32 features give float32 probabilities whose rows miss 1 by ~1e-7, which
            # sklearn's log_loss warns about: return float64 rows that sum to 1
            proba = self.models[0].predict_proba(x).astype(np.float64)
            return proba / proba.sum(axis=1, keepdims=True)
        cols = [np.full(len(x), const) if const is not None else model.predict_proba(x)[:, 1].astype(np.float64)
                for model, const in zip(self.models, self.constants)]
        return np.stack(cols, axis=1)

    @property
    def classes(self) -> np.ndarray | None:
        return None if self.multilabel else self.models[0].classes_

    def snapshot(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """Copies of (classes, coef, intercept) per model, to restart a later fit from here."""
        return [(m.classes_.copy(), m.coef_.copy(), m.intercept_.copy()) if hasattr(m, "coef_") else None
                for m in self.models]

    def warm_from(self, snap: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None], C: float,
                  y: np.ndarray) -> "_PathModel":
        """Seed models with snapshot coefficients (when the label set is unchanged) before fit."""
        from sklearn.linear_model import LogisticRegression

        columns = [y[:, j] for j in range(y.shape[1])] if self.multilabel else [y]
        self.models = [LogisticRegression(C=C, **self.params) for _ in columns]
        self.constants = [None] * len(columns)
        for model, target, saved in zip(self.models, columns, snap):
            if saved is not None and np.array_equal(saved[0], np.unique(target)):
                model.classes_, model.coef_, model.intercept_ = saved[0].copy(), saved[1].copy(), saved[2].copy()
        return self


def _sample_weight(target: np.ndarray, class_weight: Any) -> np.ndarray | None:
    """Per-row weights sklearn derives from class_weight (None when unweighted)."""
    if class_weight is None:
        return None
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight(class_weight, target)


def _score(y: np.ndarray, proba: np.ndarray, classes: np.ndarray | None, metric: str) -> float:
    """Selection score (higher is better) of probabilities against labels."""
    if y.ndim == 2:  # multi-label: mean per-label accuracy at 0.5 unless another metric is asked
        if metric == "accuracy":
            return float(((proba >= 0.5) == (y > 0)).mean())
        return float(selection_score(y, proba, metric))
    if metric == "accuracy":
        return float(np.mean(classes[proba.argmax(axis=1)] == y))
    # selection_score expects label i <-> column i; map labels onto the fitted columns
    index = {c: i for i, c in enumerate(classes)}
    if not all(v in index for v in np.unique(y)):
        full = np.zeros((len(y), int(max(classes.max(), y.max())) + 1))
        full[:, classes] = proba
        return float(selection_score(y, full, metric))
    return float(selection_score(np.array([index[v] for v in y]), proba, metric))


class LogisticProbe:
    """Standardised L2 logistic regression with C chosen on validation (or grouped CV).

    probe = LogisticProbe(Cs=np.logspace(-6, 5, 12)).fit(train_x, train_y, val_x, val_y)
    LogisticProbe(Cs="dinov2")   # DINOv2's grid: 45 values, 1e-6 ... 1e5 ("default": 12 values)
    probe.best_C_, probe.scores_, probe.predict_proba(test_x), probe.score(test_x, test_y)
    """

    def __init__(self, Cs: Sequence[float] | np.ndarray | None = None, *, metric: str = "accuracy",
                 cv: int = 5, refit: bool = True, max_iter: int = 1000, tol: float = 1e-4,
                 rtol: float | None = DEFAULT_RTOL, step_tol: float | None = DEFAULT_STEP_TOL,
                 class_weight: str | dict | None = None,
                 patience: int | None = None, progress: bool = False, random_state: int = 0):
        self.Cs = DEFAULT_CS if Cs is None else Cs  # grid of inverse regularisation strengths
        self.metric = metric                # selection metric: accuracy | balanced_accuracy | auroc | loss
        self.cv = cv                        # folds when there is no validation split
        self.refit = refit                  # refit on train + val at the best C (val given)
        self.max_iter = max_iter            # lbfgs iterations per fit (a warm start needs few)
        self.tol = tol                      # max |gradient| every fit must reach (scikit-learn's tol) ...
        self.rtol = rtol                    # ... and this fraction of the penalty gradient W / (C n),
        self.step_tol = step_tol            # or a last step that moved no logit more than this: every
                                            # C's model is converged at that C (logistic.fit_logistic)
        self.class_weight = class_weight    # None or "balanced" (imbalanced medical data)
        self.patience = patience            # stop the sweep after this many C's worse than the best; None = full grid
        self.progress = progress            # tqdm bar over the C grid (stderr)
        self.random_state = random_state    # seed of the CV shuffle

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, train_x: Any, train_y: Any, val_x: Any = None, val_y: Any = None,
            groups: Sequence[Any] | None = None) -> "LogisticProbe":
        """Sweep C (on val, or by CV on train when val is None), then fit the final model."""
        from sklearn.preprocessing import StandardScaler

        if self.metric not in SELECTION_METRICS:
            raise ValueError(f"metric must be one of {', '.join(SELECTION_METRICS)}; got {self.metric!r}.")
        cs = _check_cs(self.Cs)
        x, y = _check_xy(train_x, train_y, "train")
        self.multilabel_ = y.ndim == 2
        if not self.multilabel_ and np.unique(y).size < 2:
            raise ValueError(f"train_y has a single class ({np.unique(y).tolist()}); a probe needs at "
                             f"least two classes in the training split.")
        if (val_x is None) != (val_y is None):
            raise ValueError("pass both val_x and val_y, or neither (then C is chosen by cross-validation).")
        # the largest fit: train (+ val when refitting); one output for binary and per label
        rows = len(x) + (len(val_x) if val_x is not None and self.refit else 0)
        n_classes = 2 if self.multilabel_ else np.unique(y).size
        check_fits_in_memory(rows, 1 if n_classes == 2 else n_classes, x.shape[1])
        self.Cs_ = cs
        if val_x is not None:
            vx, vy = _check_xy(val_x, val_y, "val")
            if vx.shape[1] != x.shape[1] or vy.ndim != y.ndim:
                raise ValueError(f"val features/labels do not match train: train_x has {x.shape[1]} "
                                 f"features and labels of ndim {y.ndim}, val_x {vx.shape[1]} and {vy.ndim}.")
            scaler = StandardScaler().fit(x)
            scores, n_iter, converged = self._path(_standardized(scaler, x), y, _standardized(scaler, vx), vy, cs)
            self.selection_ = "val"
            self.cv_folds_ = 0
        else:
            scores, n_iter, converged = self._cv_path(x, y, groups, cs)
            self.selection_ = "cv"
            vx = vy = None
        self.scores_ = {float(c): float(s) for c, s in zip(cs, scores) if not np.isnan(s)}
        scored = [n >= 0 and not np.isnan(sc) for sc, n in zip(scores, n_iter)]
        self.n_iter_ = {float(c): int(n) for c, n, ok in zip(cs, n_iter, scored) if ok}
        self.converged_ = {float(c): bool(v) for c, v, ok in zip(cs, converged, scored) if ok}
        if np.all(np.isnan(scores)):  # e.g. AUROC of a validation split (or every fold) with one class
            where = "the validation split" if self.selection_ == "val" else "every cross-validation fold"
            raise ValueError(f"--metric {self.metric} is undefined on {where} at every C (it holds a single class), so "
                             f"no C can be chosen by it; use --metric accuracy or loss, or a validation split with "
                             f"both classes.")
        best = int(np.nanargmax(scores))  # first maximum: the strongest regularisation among ties
        self.best_C_ = float(cs[best])
        self.best_score_ = float(scores[best])

        final = self._path_model()
        if vx is not None:
            self.scaler_ = scaler   # the train scaler: val rows are standardised as at selection
            if self.refit:
                # train + val is other data: the sweep's model at best C is not near its optimum in
                # the flat directions of a large C, where a warm start from it stopped "settled"
                # 2 % above the minimum (digits, C = 1e5); a cold fit climbs there along
                # logistic.cold_ladder instead, as every cold fit does
                fit_x, fit_y = np.concatenate([x, vx]), np.concatenate([y, vy])
            else:
                fit_x, fit_y = x, y
                final.warm_from(self._snapshots[self.best_C_], self.best_C_, fit_y)
        else:
            self.scaler_ = StandardScaler().fit(x)
            fit_x, fit_y = x, y
        self.model_ = final.fit(_standardized(self.scaler_, fit_x), fit_y, self.best_C_).release()
        self.n_iter_refit_ = final.n_iter
        self.converged_refit_ = final.converged
        if not (final.converged and self.converged_.get(self.best_C_, True)):
            warnings.warn(f"the probe's fit at the chosen C = {self.best_C_:g} did not converge "
                          f"(lbfgs stopped: {', '.join(final.stops)}); raise max_iter "
                          f"(now {self.max_iter}) or check the features for near-duplicate columns.",
                          RuntimeWarning, stacklevel=2)
        self._snapshots = {}
        self.classes_ = self.model_.classes
        self.n_features_in_ = x.shape[1]
        return self

    def _path(self, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray,
              cs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Warm-started sweep over ascending C: validation score, lbfgs steps and convergence per C."""
        model = self._path_model()
        scores = np.full(cs.size, np.nan)
        n_iter = np.full(cs.size, -1)
        converged = np.ones(cs.size, dtype=bool)
        best, since_best = -np.inf, 0
        self._snapshots: dict[float, Any] = {}
        from tqdm.auto import tqdm

        for i, c in enumerate(tqdm(cs, desc="probe C sweep", unit="C", disable=not self.progress,
                                   leave=False)):
            model.fit(x, y, float(c))
            self._snapshots[float(c)] = model.snapshot()
            scores[i] = _score(vy, model.predict_proba(vx), model.classes, self.metric)
            n_iter[i] = model.n_iter
            converged[i] = model.converged
            if scores[i] > best:
                best, since_best = scores[i], 0
            elif scores[i] < best:   # a tie is not worse: it neither resets nor spends patience
                since_best += 1
                if self.patience is not None and since_best >= self.patience:
                    break  # past the peak: larger C only overfits more, and costs the most
        model.release()
        return scores, n_iter, converged

    def _path_model(self) -> _PathModel:
        return _PathModel(self.multilabel_, self.max_iter, self.tol, self.class_weight,
                          self.random_state, self.rtol, self.step_tol)

    def _cv_path(self, x: np.ndarray, y: np.ndarray, groups: Sequence[Any] | None,
                 cs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean fold score per C (StratifiedGroupKFold with groups, StratifiedKFold without;
        multi-label rows stratified by their rarest finding)."""
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
        from sklearn.preprocessing import StandardScaler

        if groups is not None:
            groups = np.asarray(groups)
            if len(groups) != len(x):
                raise ValueError(f"groups must have one entry per training row: {len(groups)} groups "
                                 f"for {len(x)} rows.")
            n_groups = np.unique(groups).size
        folds = int(self.cv)
        if not self.multilabel_:
            folds = min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
        if groups is not None:
            folds = min(folds, n_groups)
        if 2 <= folds < int(self.cv):
            warnings.warn(f"cv={self.cv} folds are more than the training labels allow (smallest class or number "
                          f"of groups): C is chosen by {folds}-fold cross-validation.")
        if folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, but the training labels allow "
                             f"only {folds} (smallest class or number of groups); pass a validation "
                             f"split instead.")
        if groups is not None:
            splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=self.random_state)
        else:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
        fold_scores, fold_iters, fold_ok = [], [], []
        # multi-label: folds stratified by each row's rarest finding (as train's held-out rows and
        # `featcache split`), so a rare finding is not missing from some folds' macro averages
        split_y = y if not self.multilabel_ else stratify_key(y)
        if self.multilabel_ and np.unique(split_y, return_counts=True)[1].max() < folds:
            split_y = np.zeros(len(y))  # too few rows per finding to stratify by: plain (group) folds
        for tr, va in splitter.split(x, split_y, groups):
            scaler = StandardScaler().fit(x[tr])
            s, n, ok = self._path(_standardized(scaler, x[tr]), y[tr], _standardized(scaler, x[va]), y[va], cs)
            fold_scores.append(s)
            fold_iters.append(n)
            fold_ok.append(ok)
        self.cv_folds_ = folds
        # a CV score is the mean over *every* fold: a C that patience skipped in some fold is not
        # scored at all (a mean over the folds that reached it would compare unlike numbers)
        scores = np.array(fold_scores)
        return (np.where(np.isnan(scores).any(axis=0), np.nan, scores.mean(axis=0)),
                np.max(np.array(fold_iters), axis=0), np.all(np.array(fold_ok), axis=0))

    # -- prediction -------------------------------------------------------------------------
    def _check_fitted(self, x: Any) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise ValueError("this LogisticProbe is not fitted yet; call fit(train_x, train_y, val_x, val_y) first.")
        x = np.asarray(x)
        x = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected features of shape (N, {self.n_features_in_}) like the training "
                             f"data; got {x.shape}.")
        return x

    def predict_proba(self, x: Any) -> np.ndarray:
        """(N, n_classes) probabilities in the order of classes_ (multi-label: (N, L) per label)."""
        x = self._check_fitted(x)
        return self.model_.predict_proba(_standardized(self.scaler_, x))

    def linear_weights(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(weight (C, D), bias (C)) float32 of one linear layer whose softmax (single-label) or
        sigmoid (multi-label) on standardised features gives predict_proba: the probe as a head.

        Binary: sklearn scores one logit z for its second class; logits (0, z) give the same
        softmax. Classes the probe never saw get bias -1e4 (probability 0, as expand_proba)."""
        if not hasattr(self, "model_"):
            raise ValueError("this LogisticProbe is not fitted yet; call fit first.")
        d = self.n_features_in_
        if self.multilabel_:
            weight = np.zeros((n_classes, d))
            bias = np.zeros(n_classes)
            for j, (model, const) in enumerate(zip(self.model_.models, self.model_.constants)):
                if const is not None:  # a label constant in training: its probability is that constant
                    bias[j] = 1e4 if const > 0 else -1e4
                else:
                    weight[j], bias[j] = model.coef_[0], model.intercept_[0]
            return weight.astype(np.float32), bias.astype(np.float32)
        model = self.model_.models[0]
        fitted = np.asarray(model.classes_, dtype=np.int64)
        weight = np.zeros((n_classes, d))
        bias = np.full(n_classes, -1e4)
        if fitted.size == 2:
            weight[fitted[1]], bias[fitted[1]] = model.coef_[0], model.intercept_[0]
            bias[fitted[0]] = 0.0
        else:
            weight[fitted], bias[fitted] = model.coef_, model.intercept_
        return weight.astype(np.float32), bias.astype(np.float32)

    def decision_scores(self, x: Any) -> np.ndarray:
        """Alias of predict_proba, for callers that treat probabilities as ranking scores."""
        return self.predict_proba(x)

    def predict(self, x: Any) -> np.ndarray:
        """Predicted labels (multi-label: (N, L) 0/1 at probability 0.5)."""
        proba = self.predict_proba(x)
        if self.multilabel_:
            return (proba >= 0.5).astype(np.uint8)
        return self.classes_[proba.argmax(axis=1)]

    def score(self, x: Any, y: Any) -> float:
        """Accuracy (multi-label: mean per-label accuracy), as sklearn classifiers define score."""
        y = np.asarray(y)
        pred = self.predict(x)
        return float((pred == (y > 0)).mean()) if self.multilabel_ else float(np.mean(pred == y))


def expand_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Place columns of proba (for the fitted classes) into (N, n_classes) so that column i is
    label i even when a class was absent from training (its probability is 0)."""
    classes = np.asarray(classes, dtype=np.int64)
    if classes.size == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return proba
    out = np.zeros((len(proba), n_classes), dtype=proba.dtype)
    out[:, classes] = proba
    return out


def logistic_probe(train_x: Any, train_y: Any, val_x: Any = None, val_y: Any = None,
                   test_x: Any = None, test_y: Any = None, Cs: Sequence[float] | None = None,
                   *, groups: Sequence[Any] | None = None, metric: str = "accuracy",
                   refit: bool = True, classes: Sequence[str] | None = None,
                   return_probe: bool = False, **probe_params: Any) -> dict[str, Any]:
    """Fit a LogisticProbe and summarise it (the pinned ``featcache.logistic_probe``).

    Returns {"best_C", "val_accuracy" (selection score at best C: val split, or CV mean),
    "test_accuracy" (None without a test split), "scores" {C: score}, "n_iter" {C: iterations},
    "selection" ("val" | "cv"), "Cs", "test" (full classification metrics, when test given)};
    with return_probe=True also "probe" (the fitted LogisticProbe) and "test_proba".
    """
    probe = LogisticProbe(Cs=Cs, metric=metric, refit=refit, **probe_params)
    probe.fit(train_x, train_y, val_x, val_y, groups=groups)
    out: dict[str, Any] = {
        "best_C": probe.best_C_,
        "val_accuracy": probe.best_score_ if metric == "accuracy" else None,
        "val_score": probe.best_score_,
        "metric": metric,
        "selection": probe.selection_,
        "cv_folds": probe.cv_folds_,
        "refit": "train+val" if (refit and probe.selection_ == "val") else "train",
        "Cs": [float(c) for c in probe.Cs_],
        "scores": probe.scores_,
        "n_iter": probe.n_iter_,
        "test_accuracy": None,
        "test": None,
    }
    if test_x is not None:
        tx, ty = _check_xy(test_x, test_y, "test")
        proba = probe.predict_proba(tx)
        out["test_accuracy"] = probe.score(tx, ty)
        if not probe.multilabel_:
            n_cls = len(classes) if classes is not None else int(max(probe.classes_.max(), ty.max())) + 1
            proba = expand_proba(proba, probe.classes_, n_cls)
        out["test"] = classification_metrics(ty, proba, classes=list(classes) if classes is not None else None)
        if return_probe:
            out["test_proba"] = proba
    if return_probe:
        out["probe"] = probe
    return out
