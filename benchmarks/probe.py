"""Benchmark: the warm-started logistic-probe C sweep vs one cold scikit-learn fit.

Synthetic 10-class data, 768-d like ViT-B CLS tokens, two kinds (--data):
  features  (default) anisotropic features with a power-law spectrum and uneven per-dimension
            scales, labels drawn from a dense multinomial-logistic model: the best C is interior
            (~0.1) and a cold fit needs ~100 lbfgs iterations, as on real backbone features
  gaussian  isotropic Gaussian classes in a 32-d subspace: heavy regularisation wins (best C
            ~1e-4) and a cold fit converges in ~7 iterations, the worst case for any sweep
Measures, side by side in one run:

  probe   = featcache.LogisticProbe over 12 C values (np.logspace(-6, 5, 12)), C chosen on val,
            refit on train + val at the best C (everything a user's `featcache probe` does)
  cold    = one sklearn LogisticRegression(lbfgs) fit from scratch at the probe's best C, on the
            same standardised training data with the same max_iter / tol
  ratio   = probe / cold            target <= 3

Also prints a cold 12-fit sweep (what a naive loop costs) for reference.

    python benchmarks/probe.py            # 50,000 x 768 train, 10,000 val (several minutes on 2 cores)
    python benchmarks/probe.py --small    # 5,000 x 128, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np


def make_features(n: int, d: int, n_classes: int = 10, scale: float = 10.0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature-like data: power-law spectrum, random rotation, labels ~ softmax(x @ W), dense W."""
    rng = np.random.default_rng(seed)
    spec = 1.0 / np.sqrt(np.arange(1, d + 1))
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * spec) @ basis.T
    w = rng.standard_normal((d, n_classes)) * scale / np.sqrt((spec ** 2).sum())
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    x = x * rng.uniform(0.2, 3.0, d) + rng.normal(0, 2, d)                   # uneven scales, like real features
    return x.astype(np.float32), y.astype(np.int64)


def make_gaussian(n: int, d: int, n_classes: int = 10, signal_dim: int = 32, sep: float = 0.35,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes: means in a random `signal_dim` subspace, unit noise in all d dims."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, signal_dim)))[0]           # (d, s) orthonormal
    means = rng.standard_normal((n_classes, signal_dim)) * sep @ basis.T    # (C, d)
    y = rng.integers(0, n_classes, n)
    x = means[y] + rng.standard_normal((n, d))
    x = x * rng.uniform(0.2, 3.0, d) + rng.normal(0, 2, d)                   # uneven scales, like real features
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="5,000 x 128 instead of 50,000 x 768")
    ap.add_argument("--data", choices=["features", "gaussian"], default="features",
                    help="synthetic data kind (see the module docstring)")
    ap.add_argument("--rtol", type=float, default=None,
                    help="probe's convergence rule: residual gradient <= this fraction of W / (C n) "
                         "(default: featcache.logistic.DEFAULT_RTOL)")
    ap.add_argument("--step-tol", type=float, default=None,
                    help="... or a last step that moved no logit more than this "
                         "(default: featcache.logistic.DEFAULT_STEP_TOL)")
    ap.add_argument("--no-naive", action="store_true", help="skip the cold 12-fit reference sweep")
    ap.add_argument("--patience", type=int, default=None, help="LogisticProbe(patience=...): stop the path this "
                    "many C values past the best (default: the probe's default)")
    ap.add_argument("--max-iter", type=int, default=1000, help="lbfgs max_iter for probe and cold fit")
    ap.add_argument("--tol", type=float, default=1e-4, help="lbfgs tol for probe and cold fit")
    args = ap.parse_args()
    n, d = (5_000, 128) if args.small else (50_000, 768)
    n_val = n // 5
    make = make_features if args.data == "features" else make_gaussian
    x, y = make(n + 2 * n_val, d)
    tx, ty = x[:n], y[:n]
    vx, vy = x[n:n + n_val], y[n:n + n_val]
    sx, sy = x[n + n_val:], y[n + n_val:]
    cs = np.logspace(-6, 5, 12)

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from featcache.probe import LogisticProbe

    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"data ({args.data}): train {n} x {d}, val {n_val}, test {n_val}, 10 classes, "
          f"{len(cs)} C values, max_iter {args.max_iter}, tol {args.tol}")

    t0 = time.perf_counter()
    from featcache.logistic import DEFAULT_RTOL, DEFAULT_STEP_TOL

    rtol = DEFAULT_RTOL if args.rtol is None else args.rtol
    step_tol = DEFAULT_STEP_TOL if args.step_tol is None else args.step_tol
    extra = {} if args.patience is None else {"patience": args.patience}
    probe = LogisticProbe(Cs=cs, max_iter=args.max_iter, tol=args.tol, rtol=rtol, step_tol=step_tol,
                          **extra).fit(tx, ty, vx, vy)
    t_probe = time.perf_counter() - t0
    print(f"probe (sweep + refit): {t_probe:8.2f} s  best C {probe.best_C_:g}  val acc "
          f"{probe.best_score_:.4f}  test acc {probe.score(sx, sy):.4f}")
    print("  lbfgs iterations per C:", {f"{c:g}": it for c, it in probe.n_iter_.items()},
          f"refit on train+val: {probe.n_iter_refit_}")

    scaler = StandardScaler().fit(tx)
    a, b = scaler.transform(tx), scaler.transform(vx)
    t0 = time.perf_counter()
    cold = LogisticRegression(C=probe.best_C_, max_iter=args.max_iter, tol=args.tol).fit(a, ty)
    t_cold = time.perf_counter() - t0
    print(f"cold sklearn fit at best C: {t_cold:8.2f} s  ({int(cold.n_iter_[0])} iterations, "
          f"val acc {cold.score(b, vy):.4f})")
    print(f"ratio probe / cold fit: {t_probe / t_cold:.2f}   (target <= 3)")

    # the same cold fit by featcache's own solver (featcache.logistic, preconditioned lbfgs) under
    # scikit-learn's rule alone (rtol=None, step_tol=None) and under the probe's rule: how much of
    # the ratio is the solver, and what the path itself costs over one fit of that solver
    from threadpoolctl import threadpool_limits

    from featcache.logistic import fit_logistic

    classes, index = np.unique(ty, return_inverse=True)
    for name, rule in [("scikit-learn's rule", dict(rtol=None, step_tol=None)),
                       ("the probe's rule", dict(rtol=rtol, step_tol=step_tol))]:
        t0 = time.perf_counter()
        with threadpool_limits(1, user_api="blas") if a.size < 2_000_000 else contextlib.nullcontext():
            own = fit_logistic(a, index, classes.size, probe.best_C_, tol=args.tol,
                               max_iter=args.max_iter, **rule)
        t_own = time.perf_counter() - t0
        print(f"featcache.logistic cold fit at best C, {name}: {t_own:8.2f} s  ({own.n_iter} steps, "
              f"{own.matmuls} passes over X, stop: {own.stop}); probe / this: {t_probe / t_own:.2f}")

    if not args.no_naive:
        t0 = time.perf_counter()
        naive = []
        for c in cs:
            m = LogisticRegression(C=c, max_iter=args.max_iter, tol=args.tol).fit(a, ty)
            naive.append(m.score(b, vy))
        t_naive = time.perf_counter() - t0
        best_naive = float(cs[int(np.argmax(naive))])
        print(f"naive cold 12-fit sweep: {t_naive:8.2f} s  best C {best_naive:g}  "
              f"(ratio {t_naive / t_cold:.2f}; probe is {t_naive / t_probe:.2f}x faster)")


if __name__ == "__main__":
    main()
