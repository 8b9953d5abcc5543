"""How often a nominal 95 % interval of featcache holds the true value (coverage), by simulation.

Not a speed benchmark: the numbers behind README "Why Wilson, and what no interval can do".
Test sets are drawn from processes whose true values are known analytically:

  binormal   negatives N(0, 1), positives N(d, 1): true AUROC = Phi(d / sqrt 2); at the threshold
             d / 2 the true sensitivity = specificity = Phi(d / 2). Cells: n test rows x prevalence
             x true AUROC.
  clustered  patients with 1-4 images, label per patient, score = d * y + patient effect + image
             noise (ICC 0.5), a fixed threshold: true image-level sensitivity and specificity from
             the normal CDF; intervals with the patient ids (design effect) and without.

Each cell prints the coverage of featcache's intervals (metrics.bootstrap_metrics, called as
train / probe / knn call it) and its Monte Carlo standard error sqrt(p (1 - p) / R).

    python benchmarks/coverage.py                     # both studies, R = 300 test sets per cell
    python benchmarks/coverage.py --study clustered --replicates 400
"""
from __future__ import annotations

import argparse
import math
import time
from statistics import NormalDist

import numpy as np

PHI = NormalDist().cdf


def _cover(interval: tuple[float, float] | None, truth: float) -> bool:
    return interval is not None and interval[0] <= truth <= interval[1]


def binormal(replicates: int, n_boot: int, seed: int) -> None:
    from featcache.metrics import bootstrap_metrics

    rng = np.random.default_rng(seed)
    for n, prevalence in ((40, 0.1), (100, 0.1), (40, 0.5), (400, 0.1)):
        for auroc in (0.75, 0.95):
            d = math.sqrt(2) * NormalDist().inv_cdf(auroc)
            truth = {"auroc": auroc, "sensitivity": PHI(d / 2), "specificity": PHI(d / 2)}
            positives = round(n * prevalence)
            hits = {m: 0 for m in truth}
            start = time.perf_counter()
            for _ in range(replicates):
                y = np.array([1] * positives + [0] * (n - positives))
                score = rng.normal(size=n) + d * y
                p = 1 / (1 + np.exp(-(score - d / 2)))  # P >= 0.5 exactly where score >= d / 2
                boot = bootstrap_metrics(y, np.c_[1 - p, p], metrics=tuple(truth), n_boot=n_boot, positive=1,
                                         seed=int(rng.integers(2**31)))
                for m in truth:
                    hits[m] += _cover(boot.ci.get(m), truth[m])
            print(f"binormal n={n:4d} positives={positives:3d} AUROC={auroc}: " + ", ".join(
                f"{m} {hits[m] / replicates:.3f} (se {math.sqrt(hits[m] * (replicates - hits[m]) / replicates) / replicates:.3f})"
                for m in truth) + f"  [{time.perf_counter() - start:.0f} s]", flush=True)


def clustered(replicates: int, seed: int) -> None:
    from featcache.metrics import bootstrap_metrics

    rng = np.random.default_rng(seed)
    d, threshold = 1.2, 0.5
    truth = {"sensitivity": 1 - PHI(threshold - d), "specificity": PHI(threshold)}
    for patients, prevalence in ((20, 0.2), (40, 0.25), (100, 0.3)):
        hits = {(how, m): 0 for how in ("by patient", "rows") for m in truth}
        for _ in range(replicates):
            labels = [1] * max(1, round(patients * prevalence)) + [0] * (patients - max(1, round(patients * prevalence)))
            y, score, groups = [], [], []
            for patient, label in enumerate(labels):
                effect = rng.normal(0, math.sqrt(0.5))
                for _ in range(int(rng.integers(1, 5))):
                    y.append(label)
                    score.append(d * label + effect + rng.normal(0, math.sqrt(0.5)))
                    groups.append(f"p{patient}")
            pred = (np.array(score) >= threshold).astype(float)
            for how, g in (("by patient", groups), ("rows", None)):
                boot = bootstrap_metrics(np.array(y), np.c_[1 - pred, pred], metrics=tuple(truth), n_boot=1,
                                         groups=g, positive=1)
                for m in truth:
                    hits[(how, m)] += _cover(boot.ci.get(m), truth[m])
        print(f"clustered patients={patients:3d} (1-4 images each, ICC 0.5): " + ", ".join(
            f"{m} {how} {v / replicates:.3f}" for (how, m), v in hits.items()) + f"  (se <= "
            f"{0.5 / math.sqrt(replicates):.3f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=["binormal", "clustered", "both"], default="both")
    p.add_argument("--replicates", type=int, default=300, help="test sets per cell")
    p.add_argument("--bootstrap", type=int, default=500, help="resamples per bootstrapped interval")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.study in ("binormal", "both"):
        binormal(args.replicates, args.bootstrap, args.seed)
    if args.study in ("clustered", "both"):
        clustered(args.replicates, args.seed)


if __name__ == "__main__":
    main()
