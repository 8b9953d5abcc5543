"""L2 logistic regression by preconditioned L-BFGS: scikit-learn's objective, converged at each C.

The objective is exactly scikit-learn's ``LogisticRegression(penalty="l2", solver="lbfgs")``:

    (1/S) sum_i s_i loss_i(W x_i + b)  +  ||W||^2 / (2 C S),        S = sum_i s_i

(the softmax loss over all classes for three or more, one logistic loss on the second class's
logit for two). The probe keeps its fits in scikit-learn LogisticRegression objects, so
prediction is scikit-learn's own code. What differs from scikit-learn is how the minimum is
reached, and when a fit counts as converged (see `fit_logistic`):

- Conditioning. Standardised backbone features are strongly correlated (their covariance
  spectrum falls like a power law), so the Hessian is badly conditioned and plain lbfgs needs
  ~100 iterations per fit. The Hessian is close to  a (X^T X / n) + lambda I  (a = the mean
  curvature p (1 - p) of the loss at the start point, lambda = 1 / (C S)), whose inverse comes
  from one eigendecomposition of the d x d Gram matrix. It is lbfgs' initial inverse Hessian here
  (scaled by the usual s'y / y'My), and a unit step is tried first.
- Precision. The logits z = X W^T + b are kept in float64 and moved along each search direction
  as z + t X d, so line-search trials cost no pass over X and the objective's *changes* resolve
  to float64 precision on float32 features (float32 logits computed afresh carry ~1e-7 |z| of
  rounding, which hides decreases below ~1e-8: lbfgs then stalls near max |gradient| ~ 1e-6).
- A path. A fit started from the previous C's fit reuses its logits and data gradient, so moving
  to the next C costs no pass over X before the first step.

A step costs two passes over X (X d and the gradient) however many trials its backtracking
(Armijo) line search takes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# rows of X used for the Gram matrix of the preconditioner: an estimate is enough (it steers
# lbfgs, it does not enter the objective), and 8,192 rows of 768-d features take 0.05 s
GRAM_ROWS = 8192
MEMORY = 10               # curvature pairs kept (scikit-learn's lbfgs keeps 10)
MAX_LINE_SEARCH = 50      # trial steps per iteration before the search is declared failed
ARMIJO = 1e-4             # sufficient-decrease constant
FTOL = 64 * np.finfo(float).eps   # scikit-learn's relative-decrease stop
DEFAULT_RTOL = 1e-3       # residual gradient <= this fraction of the penalty gradient lambda W
DEFAULT_STEP_TOL = 1e-2   # ... or the last step moved no logit by more than this
CONVERGED_STOPS = ("gradient", "settled", "ftol")   # LogisticFit.stop values that mean converged

# A fit from W = 0 is only trusted up to this C; a cold fit at a larger C first fits COLD_START_C,
# 10 COLD_START_C, ... and starts from the last of them. Why: the "settled" test (a step that moved no
# logit by more than step_tol) is evidence of convergence only near the optimum, which a warm
# start from the previous C is; from zero at C = 1e4 on digits lbfgs takes such small steps in the
# flat directions while the objective is still 25 % above its minimum. Below 1e-2 (with
# standardised features and lambda = 1 / (C n) >= 1e-2 / n) the penalty keeps W small and a
# cold fit converges by the gradient test.
COLD_START_C = 1e-2


# (n, K) float64 arrays a multinomial fit holds at once, at least: the logits z, the step's X d,
# the trial logits z + t X d and their probabilities (value() makes them in place of the shifted
# logits; measured peak with tracemalloc: 5.6, the returned fit's logits and float32 copies included)
PEAK_LOGIT_ARRAYS = 4


def available_memory() -> int | None:
    """Bytes this process can still get (MemAvailable + SwapFree on Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.strip()}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def check_fits_in_memory(rows: int, outputs: int, features: int, available: int | None = None) -> None:
    """Refuse a fit whose logits cannot fit in memory before any work, instead of an OOM kill
    minutes in: a probe of ImageNet (1.28M rows, 1,000 classes) holds >= 41 GB of logits.

    The need counted is a lower bound (PEAK_LOGIT_ARRAYS float64 arrays of rows x outputs plus
    the float32 design matrix), so a refusal is certain to be right."""
    available = available_memory() if available is None else available
    need = PEAK_LOGIT_ARRAYS * rows * outputs * 8 + rows * features * 4
    if available is None or need <= available:
        return
    gib = 2.0 ** 30
    shape = f"{rows:,} rows x {outputs:,} classes" if outputs > 1 else f"{rows:,} rows (one logit each)"
    raise ValueError(
        f"a logistic probe of {shape} holds at least {need / gib:.1f} GiB "
        f"at once ({PEAK_LOGIT_ARRAYS} float64 arrays of its logits, for its L-BFGS "
        f"line search, and the features), but this machine has {available / gib:.1f} GiB of memory "
        f"and swap available. Fit on fewer training rows, or train a linear head by minibatches, "
        f"whose memory is one batch's: featcache train --head linear (or sweep --heads linear).")


def cold_ladder(C: float) -> list[float]:
    """The C's a cold fit at C passes through first: COLD_START_C times powers of 10 below C."""
    rungs = []
    c = COLD_START_C
    while c < C / 1.5:
        rungs.append(c)
        c *= 10.0
    return rungs


@dataclass
class LogisticFit:
    """One fitted L2 logistic regression, laid out as scikit-learn's coef_ / intercept_."""

    coef: np.ndarray        # (K, d) float64 for K >= 3 classes, (1, d) for two (the second class's logit)
    intercept: np.ndarray   # (K,) or (1,)
    n_iter: int             # accepted lbfgs steps (0: the start point already met the rule)
    matmuls: int            # passes over X
    stop: str               # "gradient" | "settled" | "ftol" | "line search" | "max_iter" (fit_logistic)
    max_gradient: float     # max |gradient| at the returned point
    logits: np.ndarray = field(repr=False)          # (n, K) float64 X coef^T + intercept
    data_gradient: np.ndarray = field(repr=False)   # flat gradient of the loss alone (no penalty)

    @property
    def converged(self) -> bool:
        """The rule was met (or lbfgs could decrease the objective no further at float64 precision)."""
        return self.stop in CONVERGED_STOPS


class GramPreconditioner:
    """Eigendecomposition of X^T X / m on (a sample of) the rows a fit will see.

    Built once per design matrix and shared by every C (and every label of a multi-label probe)."""

    def __init__(self, x: np.ndarray, rows: int = GRAM_ROWS, seed: int = 0):
        sample = x
        if len(x) > rows:
            sample = x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]
        gram = (sample.T @ sample).astype(np.float64) / max(len(sample), 1)
        eigvals, self.vectors = np.linalg.eigh(gram)
        self.eigvals = np.clip(eigvals, 0.0, None)

    def inverse(self, curvature: float, lam: float, outputs: int) -> Callable[[np.ndarray], np.ndarray]:
        """v -> (a G + lambda I)^-1 v on the coef part, v / a on the intercept part."""
        inv = 1.0 / np.maximum(curvature * self.eigvals + lam, 1e-300)
        vecs = self.vectors
        n_coef = outputs * vecs.shape[0]

        def apply(v: np.ndarray) -> np.ndarray:
            out = np.empty_like(v)
            out[:n_coef] = (((v[:n_coef].reshape(outputs, -1) @ vecs) * inv) @ vecs.T).ravel()
            out[n_coef:] = v[n_coef:] / curvature
            return out

        return apply


class _Objective:
    """scikit-learn's averaged L2 logistic objective, evaluated from the logits."""

    def __init__(self, x: np.ndarray, index: np.ndarray, n_classes: int,
                 sample_weight: np.ndarray | None, C: float):
        self.x = x
        self.index = index                   # class position per row (0 / 1 for binary)
        self.binary = n_classes == 2
        self.outputs = 1 if self.binary else n_classes
        self.n_coef = self.outputs * x.shape[1]
        self.rows = np.arange(len(x))
        total = float(len(x)) if sample_weight is None else float(sample_weight.sum())
        # per-row weight of the averaged loss: s_i / S
        self.w = (np.full(len(x), 1.0 / total) if sample_weight is None
                  else np.asarray(sample_weight, dtype=np.float64) / total)
        self.lam = 1.0 / (C * total)
        self.matmuls = 0

    def split(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return v[:self.n_coef].reshape(self.outputs, -1), v[self.n_coef:]

    def penalty_gradient(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros_like(v)
        out[:self.n_coef] = self.lam * v[:self.n_coef]
        return out

    def logits(self, v: np.ndarray) -> np.ndarray:
        """(n, outputs) float64 X coef^T + intercept of a flat vector [coef, intercept]."""
        self.matmuls += 1
        coef, intercept = self.split(v)
        z = (self.x @ coef.T.astype(self.x.dtype)).astype(np.float64)
        z += intercept   # in place: an (n, K) float64 array is 10 GB at ImageNet scale
        return z

    def value(self, v: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
        """(objective, per-row probabilities) at parameters v whose logits are z.

        The probabilities are the one new (n, K) array (see PEAK_LOGIT_ARRAYS)."""
        coef = v[:self.n_coef]
        if self.binary:
            t = self.index.astype(np.float64)
            zz = z[:, 0]
            loss = np.logaddexp(0.0, zz) - t * zz               # log(1 + e^z) - t z, stably
            proba = 0.5 * (1.0 + np.tanh(0.5 * zz))             # sigmoid without overflow
        else:
            proba = z - z.max(axis=1, keepdims=True)   # shifted logits, then in place their softmax
            true_shifted = proba[self.rows, self.index]
            np.exp(proba, out=proba)
            total = proba.sum(axis=1, keepdims=True)
            loss = np.log(total[:, 0]) - true_shifted
            proba /= total
        return float(self.w @ loss) + 0.5 * self.lam * float(coef @ coef), proba

    def data_gradient(self, proba: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """Flat gradient of the averaged loss (without the penalty) from value()'s probabilities;
        overwrite=True uses `proba` as the residual's buffer (it is garbage afterwards)."""
        self.matmuls += 1
        if self.binary:
            resid = ((proba - self.index) * self.w)[:, None]
        else:
            resid = proba if overwrite else proba.copy()
            resid[self.rows, self.index] -= 1.0
            resid *= self.w[:, None]
        grad_coef = (resid.T.astype(self.x.dtype) @ self.x).astype(np.float64)
        return np.concatenate([grad_coef.ravel(), resid.sum(axis=0)])

    def curvature(self, proba: np.ndarray) -> float:
        """Mean curvature p (1 - p) of the loss per logit at these probabilities (the a of M)."""
        p = proba if proba.ndim == 2 else proba[:, None]
        return float(self.w @ (p * (1.0 - p)).mean(axis=1))


def _direction(g: np.ndarray, pairs: deque, precondition: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """lbfgs two-loop recursion with initial inverse Hessian gamma M: returns -H g."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (s @ y)
        q -= alpha * y
        alphas.append(alpha)
    r = precondition(q)
    if pairs:
        s, y = pairs[-1]
        r *= (s @ y) / max(y @ precondition(y), 1e-300)
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += s * (alpha - (y @ r) / (s @ y))
    return -r


def _logits_belong_to(fit: LogisticFit, x: np.ndarray) -> bool:
    """Whether `fit`'s stored logits are those of these rows (checked on a few of them), so a
    LogisticFit of other data is used for its coefficients only."""
    if fit.logits.shape != (len(x), fit.intercept.size):
        return False
    rows = slice(0, min(len(x), 8))
    z = np.asarray(x[rows], dtype=np.float64) @ fit.coef.T + fit.intercept
    return bool(np.allclose(z, fit.logits[rows], rtol=1e-4, atol=1e-4 * (1.0 + np.abs(z).max())))


def fit_logistic(x: np.ndarray, index: np.ndarray, n_classes: int, C: float, *, tol: float = 1e-4,
                 max_iter: int = 1000, sample_weight: np.ndarray | None = None,
                 init: LogisticFit | tuple[np.ndarray, np.ndarray] | None = None,
                 preconditioner: GramPreconditioner | None = None,
                 rtol: float | None = DEFAULT_RTOL, step_tol: float | None = DEFAULT_STEP_TOL,
                 ftol: float = FTOL) -> LogisticFit:
    """Minimise scikit-learn's L2 logistic objective at C from `init` (zeros when None).

    x: (n, d) features (float32 keeps the passes over X in float32, as scikit-learn does);
    index: (n,) class position of each row in 0 .. n_classes - 1; init: coefficients
    (coef, intercept), or a LogisticFit of the same x (its logits and gradient are reused).

    When a fit is converged. scikit-learn stops at max |gradient| <= tol, which does not pin
    down the model at large C: there the penalty gradient lambda W that balances the loss gradient
    at the optimum is tiny (1 / (C S) ~ 1e-9), so a start point that meets tol may sit far from
    this C's optimum in the flat directions (nearly separable data: digits pixels at C >= 1e3 were
    1.4 points of validation accuracy off a converged fit). A fit here stops when

    - "gradient": max |gradient| <= min(tol, rtol * lambda * max |W|): the optimality condition
      of *this* C holds to relative precision rtol, whatever the scale of C, n or the features; or
    - "settled": max |gradient| <= tol and the last lbfgs step moved no logit by more than
      step_tol: the model's predictions no longer move (at large C on data that are not
      separable this ends a fit whose W is fixed by the data, not by the tiny penalty); or
    - "ftol": the objective's relative decrease fell below ftol (64 eps, as scikit-learn).

    rtol=None and step_tol=None leave scikit-learn's rule alone. A start point is accepted as
    it is (0 iterations) only under the "gradient" rule; a "settled" judgement needs a step, and
    is trusted only near the optimum: a cold fit (init None) at C > COLD_START_C first fits the
    rungs of cold_ladder(C), each from the last, and n_iter / matmuls count them all.
    "line search" (no decrease found) and "max_iter" are reported as not converged.
    """
    if n_classes < 2:
        raise ValueError(f"a logistic fit needs at least two classes; got {n_classes}.")
    if init is None and step_tol is not None and C > COLD_START_C * 1.5:
        # a cold fit at large C climbs there from COLD_START_C (see its comment); the steps and
        # passes of the rungs are counted in the returned fit
        steps = matmuls = 0
        preconditioner = GramPreconditioner(x) if preconditioner is None else preconditioner
        for rung in cold_ladder(C):
            init = fit_logistic(x, index, n_classes, rung, tol=tol, max_iter=max_iter,
                                sample_weight=sample_weight, init=init, preconditioner=preconditioner,
                                rtol=rtol, step_tol=step_tol, ftol=ftol)
            steps, matmuls = steps + init.n_iter, matmuls + init.matmuls
        fit = fit_logistic(x, index, n_classes, C, tol=tol, max_iter=max_iter, sample_weight=sample_weight,
                           init=init, preconditioner=preconditioner, rtol=rtol, step_tol=step_tol, ftol=ftol)
        fit.n_iter, fit.matmuls = fit.n_iter + steps, fit.matmuls + matmuls
        return fit
    objective = _Objective(x, index, n_classes, sample_weight, C)
    size = objective.n_coef + objective.outputs
    reuse = isinstance(init, LogisticFit) and _logits_belong_to(init, x)
    if init is None:
        v = np.zeros(size)
    else:
        coef, intercept = (init.coef, init.intercept) if isinstance(init, LogisticFit) else init
        v = np.concatenate([np.asarray(coef, dtype=np.float64).reshape(-1),
                            np.asarray(intercept, dtype=np.float64).reshape(-1)])
        if v.size != size:
            raise ValueError(f"init has {v.size} parameters; a fit of {n_classes} classes on "
                             f"{x.shape[1]} features has {size}.")
    z = init.logits if reuse else (objective.logits(v) if init is not None else np.zeros((len(x), objective.outputs)))
    init_logits = init.logits if reuse else None
    f, proba = objective.value(v, z)
    g_data = init.data_gradient if reuse else objective.data_gradient(proba)
    g = g_data + objective.penalty_gradient(v)

    def precise(g: np.ndarray, v: np.ndarray) -> bool:
        limit = tol if rtol is None else min(tol, rtol * objective.lam * np.abs(v[:objective.n_coef]).max())
        return np.abs(g).max() <= limit

    n_iter, stop = 0, ("gradient" if precise(g, v) else "max_iter")
    if stop == "max_iter":
        preconditioner = GramPreconditioner(x) if preconditioner is None else preconditioner
        precondition = preconditioner.inverse(max(objective.curvature(proba), 1e-6), objective.lam,
                                              objective.outputs)
    pairs: deque = deque(maxlen=MEMORY)
    proba = None         # only the curvature above needed the start point's probabilities
    trial = None         # buffer of the trial logits z + t dz (never init's logits: see below)
    while stop == "max_iter" and n_iter < max_iter:
        step = _direction(g, pairs, precondition)
        slope = g @ step
        if slope >= 0:   # not a descent direction (rounding in stale pairs): restart the memory
            pairs.clear()
            step = -precondition(g)
            slope = g @ step
        dz = None          # free the last step's before computing this one's
        dz = objective.logits(step)
        if trial is None:
            trial = np.empty_like(z)
        t, accepted = 1.0, False
        for _ in range(MAX_LINE_SEARCH):
            proba_new = None   # free the last trial's probabilities before value() makes new ones
            np.multiply(dz, t, out=trial)
            trial += z         # z + t dz, bit for bit, in the one buffer
            f_new, proba_new = objective.value(v + t * step, trial)
            if f_new <= f + ARMIJO * t * slope:
                accepted = True
                break
            # minimiser of the quadratic through f, slope and f_new, kept within [0.1 t, 0.5 t]
            t_quad = -slope * t * t / (2.0 * (f_new - f - slope * t))
            t = float(np.clip(t_quad, 0.1 * t, 0.5 * t)) if np.isfinite(t_quad) else 0.5 * t
        if not accepted:
            stop = "line search"
            break
        s = t * step
        v_new = v + s
        g_data = objective.data_gradient(proba_new, overwrite=True)
        proba_new = None
        g_new = g_data + objective.penalty_gradient(v_new)
        y = g_new - g
        if s @ y > 1e-12 * np.sqrt((s @ s) * (y @ y)):
            pairs.append((s, y))
        n_iter += 1
        decrease = (f - f_new) / max(abs(f), abs(f_new), 1.0)
        # the accepted trial logits become z; the old z is the next trial buffer unless it is
        # init's (a LogisticFit passed as init keeps its logits intact)
        z, trial = trial, (z if z is not init_logits else None)
        v, f, g = v_new, f_new, g_new
        if precise(g, v):
            stop = "gradient"
        elif step_tol is not None and np.abs(g).max() <= tol and t * np.abs(dz).max() <= step_tol:
            stop = "settled"
        elif decrease <= ftol:
            stop = "ftol"
    coef, intercept = objective.split(v)
    return LogisticFit(coef.copy(), intercept.copy(), n_iter, objective.matmuls, stop,
                       float(np.abs(g).max()), z, g_data)
