"""Backbones side by side on the same images: `featcache compare A.h5 B.h5 [C.h5 ...]`.

Each feature file is one backbone (or token setting, or dtype) applied to the same images in the
same splits. For every file the same protocols run on the same rows with the same seed: k-NN
(evaluation.run_knn), the logistic probe (evaluation.run_probe) and, optionally, the best linear
head of a sweep (sweeping.sweep). Each file's splits are read once and shared by the protocols;
the linear sweep is the exception: it reads the file itself, through cached_splits.

The differences are a *paired* bootstrap: one set of resampled test rows (whole groups when the
test split has groups) is applied to every file's test probabilities at once, and every difference
between two files gets the percentile interval of the per-resample differences. Because both files
are scored on the very same resample, the variation that comes from which images happen to be in
the test set cancels out of the difference: a difference interval that excludes 0 says the ranking
of those two backbones is not an accident of the test sample. Each file's own interval is made as
train and probe make it: Wilson score for proportions (top-1, sensitivity, specificity; patients by
design effect), the same resamples' percentile interval for the rest.

Ranking rule: files are ranked by the probe's primary metric on the test split (top-1 accuracy;
AUROC of the positive class for binary tasks), best first; ties are broken by k-NN's primary
metric, then by the order given.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featcache.evaluation import (FewShotResult, SplitArrays, cached_split_arrays, few_shot, run_knn,
                                  run_probe)
from featcache.metrics import (CLASS_AVERAGED, PROPORTION_METRICS, class_checker, decide, f1_class_checker,
                               few_units_warning, flat_warning, group_keys, proportion_hits, proportion_interval,
                               resample_indices, resolve_positive, scalar_metrics, scarce_classes, scarce_warning)
from featcache.names import VAL_SPLIT
from featcache.plots import compare_plot, few_shot_plot
from featcache.runs import write_run
from featcache.store import OWN_GROUP, FeatureStore, check_distinct_splits, resolve_val_split

MIN_FILES, MAX_FILES = 2, 20
COMPARE_HEADS = ("linear",)
MULTICLASS_METRICS = ("top1", "balanced_accuracy")
BINARY_METRICS = ("auroc", "top1", "balanced_accuracy", "sensitivity", "specificity")
ALPHA = 0.05
# the linear head sweep of --heads linear: a small grid ranked on validation
LINEAR_LRS = (1e-3, 1e-2)
LINEAR_WDS = (0.0, 1e-4)


@dataclass
class CompareResult:
    """Every file's metrics with their CIs, every pairwise difference with its paired-bootstrap CI,
    and the ranking."""

    files: list[str]                        # display names, in the order given
    paths: list[Path]
    models: list[str | None]                # config["model"] of each file
    ranking: list[str]                      # display names, best first
    rows: list[dict[str, Any]]              # file, model, method, metric, value, ci ([lo, hi] or None), interval
    pairs: list[dict[str, Any]]             # a, b, method, metric, diff, ci (a ranked above b)
    config: dict[str, Any]
    primary: str                            # the metric the ranking uses
    positive_class: str | None
    test_y: np.ndarray                      # the shared test labels
    proba: dict[tuple[str, str], np.ndarray]  # (file, method) -> test probabilities
    n_valid: dict[str, int]                 # "file/method/metric" -> resamples where it was defined
    few_shot: dict[str, dict[str, FewShotResult]] = field(default_factory=dict)  # file -> method -> result
    notes: list[str] = field(default_factory=list)
    intervals: str = ""                     # how the intervals were made, one line (describe_intervals)

    def _positive_text(self) -> str:
        """', positive class NAME' for binary comparisons (sensitivity and AUROC are about it)."""
        return f", positive class {self.positive_class}" if self.positive_class is not None else ""

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def few_shot_metric(self) -> str:
        """The metric of the few-shot curves: the ranking's (AUROC for binary tasks), else top-1."""
        rows = [row for per in self.few_shot.values() for res in per.values() for row in res.summary]
        defined = rows and all(row.get(f"{self.primary}_mean") is not None for row in rows)
        return self.primary if defined else "top1"

    def shots_rows(self) -> list[dict[str, Any]]:
        """The few-shot summaries as one table: file, method, shots, tries, n_train, means and stds."""
        return [{"file": f, "method": m, **row} for f, per in self.few_shot.items() for m, res in per.items()
                for row in res.summary]

    def to_json(self) -> dict[str, Any]:
        """The --json layout: ranking, rows, pairs (+ config, positive_class, shots when asked for)."""
        out: dict[str, Any] = {"ranking": self.ranking, "rows": self.rows, "pairs": self.pairs,
                               "primary_metric": self.primary, "positive_class": self.positive_class,
                               "intervals": self.intervals, "config": self.config, "notes": self.notes}
        if self.few_shot:
            out["shots"] = self.shots_rows()
        return out

    def save(self, out: str | Path) -> Path:
        """A run directory of kind "compare": metrics.json holds the --json layout; figures/ the metric
        per backbone with CI bars (compare_<metric>) and, with shots, one curve per backbone per method."""
        metrics = {k: v for k, v in self.to_json().items() if k != "config"}
        metrics["n_valid"] = self.n_valid

        def figures(fig_dir: Path) -> None:
            if any(r["metric"] == self.primary and r.get("value") is not None for r in self.rows):
                # (undefined for every file, the ranking note says so: no figure)
                compare_plot(self.rows, fig_dir / f"compare_{self.primary}", metric=self.primary, order=self.ranking,
                             title=f"{self.primary} on {self.config['test_split']} (95% CI){self._positive_text()}")
            # the curves show the metric the files are ranked by (a binary task's AUROC), when defined
            metric = self.few_shot_metric
            for method in ("knn", "probe"):
                curves = {f: per[method].summary for f, per in self.few_shot.items() if method in per}
                if curves:
                    few_shot_plot(curves, fig_dir / f"few_shot_{method}", metric=metric,
                                  title=f"few-shot {method}: {metric} on {self.config['test_split']}"
                                        f"{self._positive_text()}")

        return write_run(out, {"kind": "compare", **self.config}, metrics, figures=figures)


MIN_RELIABLE_BOOTSTRAP = 200  # fewer resamples: 2.5 / 97.5 % percentiles rest on a handful of extremes


def display_names(paths: Sequence[Path]) -> list[str]:
    """File names when they are unique, else the paths as given (a/feats.h5, b/feats.h5)."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def check_same_rows(first: tuple[str, FeatureStore, dict[str, SplitArrays]],
                    other: tuple[str, FeatureStore, dict[str, SplitArrays]], splits: Sequence[str]) -> None:
    """Refuse two files whose classes, or usable rows (paths and labels) of any used split, differ,
    with one line naming the file, the split and the first differing row."""
    name0, store0, arrays0 = first
    name, store, arrays = other
    fix = "compare needs the same images in the same splits: extract every backbone from the same data."
    if list(store.classes) != list(store0.classes):
        raise ValueError(f"{name} has classes {', '.join(store.classes)} but {name0} has "
                         f"{', '.join(store0.classes)}; {fix}")
    for split in splits:
        a, b = arrays0[split], arrays[split]
        paths_a = store0[split].paths
        paths_b = store[split].paths
        pa, pb = [paths_a[i] for i in a.rows], [paths_b[i] for i in b.rows]
        # positions among the usable (done, labelled) rows; messages name each file's own row
        mismatch = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), None)
        if mismatch is not None or len(pa) != len(pb):
            i = min(len(pa), len(pb)) if mismatch is None else mismatch
            # a row one file lists but cannot use is named as such, not as another image
            for img, holder, lacking, usable, listed in ((pa[i] if i < len(pa) else None, name0, name, pb, paths_b),
                                                         (pb[i] if i < len(pb) else None, name, name0, pa, paths_a)):
                if img is not None and img not in set(usable) and img in set(listed):
                    raise ValueError(f"{img!r} (split {split!r}) is usable in {holder} but not in {lacking}, which "
                                     f"lists it without features or without a label (not extracted yet, unreadable, "
                                     f"or unlabelled; `featcache info {lacking}`): finish or fix that file's "
                                     f"extraction, so that both hold the same usable rows.")
        if mismatch is not None:
            i, x, y = mismatch, pa[mismatch], pb[mismatch]
            raise ValueError(f"{name} split {split!r} row {int(b.rows[i])} is {y!r} where {name0} has {x!r} "
                             f"(its row {int(a.rows[i])}; usable row {i} of both); {fix}")
        if len(pa) != len(pb):
            i = min(len(pa), len(pb))
            extra = (f"{name0} row {int(a.rows[i])} is {pa[i]!r}" if len(pa) > i
                     else f"{name} row {int(b.rows[i])} is {pb[i]!r}")
            raise ValueError(f"{name} split {split!r} has {len(pb)} usable rows but {name0} has {len(pa)} (first "
                             f"difference at usable row {i}: {extra}); {fix}")
        diff = np.flatnonzero(np.asarray(a.y) != np.asarray(b.y)) if a.y.shape == b.y.shape else [0]
        if len(diff):
            i = int(diff[0])
            raise ValueError(f"{name} split {split!r} row {int(b.rows[i])} ({pa[i]!r}) has label {b.y[i].tolist()} "
                             f"but {name0} has {a.y[i].tolist()}; {fix}")
        ca, cb = store0[split].contents(a.rows), store[split].contents(b.rows)
        if ca is not None and cb is not None:  # the bytes each row was computed from, where both recorded them
            known = (ca != b"") & (cb != b"") & (ca != b"-") & (cb != b"-")
            other = np.flatnonzero(known & (ca != cb))
            if other.size:
                i = int(other[0])
                raise ValueError(f"{name} split {split!r} row {int(b.rows[i])} ({pa[i]!r}) was computed from other "
                                 f"image bytes than {name0}'s row of that name ({other.size} such rows; content "
                                 f"{cb[i].decode()[:12]} vs {ca[i].decode()[:12]}): the same file names hold other "
                                 f"images (another copy of the data?); {fix}")



def _role(split: str, train_split: str, test_split: str) -> str:
    """The option that named a split, for an error message."""
    return "train-split" if split == train_split else "test-split" if split == test_split else "val-split"


def share_groups(names: Sequence[str], cached: Sequence[dict[str, SplitArrays]], splits: Sequence[str]) -> list[str]:
    """One grouping (patients) of every used split for all files, since the bootstrap resamples
    and the few-shot draws take whole groups: files whose groups differ are refused, and files
    extracted without groups take those of the first file that has them (returned as notes)."""
    notes: list[str] = []
    for split in splits:
        have = [(n, c[split]) for n, c in zip(names, cached) if c[split].groups is not None]
        if not have:
            continue
        ref_name, ref = have[0]
        for name, arr in have[1:]:
            # a row without an id is a group of its own in every file (its key names the file's own row)
            i = next((i for i, (g0, g) in enumerate(zip(ref.groups, arr.groups)) if _group_id(g0) != _group_id(g)),
                     None)
            if i is not None:
                raise ValueError(f"{name} split {split!r} row {int(arr.rows[i])} is in {_group_text(arr.groups[i])} but "
                                 f"{ref_name} puts the same image in {_group_text(ref.groups[i])}; compare resamples "
                                 f"and draws whole groups, so every file needs the same ones: extract every backbone "
                                 f"with the same --group-column.")
        lacking = [n for n, c in zip(names, cached) if c[split].groups is None]
        for c in cached:  # every file, also one with groups of its own: its id-less rows' keys name its own
            c[split].groups = list(ref.groups)  # row numbers, and draws and folds order groups by key
        if lacking:
            notes.append(f"split {split!r}: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no groups; "
                         f"the groups of {ref_name} are used for every file, so all are resampled and drawn by "
                         f"the same groups.")
    return notes


def _of_file(name: str, method: str, note: str) -> str:
    """A file's note, named; a leakage note is the same for every file (the rows and groups are
    checked to be shared), so it is said once, of the method's splits."""
    return f"{method}: {note}" if note.startswith("leakage:") else f"{name} {method}: {note}"


def _group_id(key: str) -> str | None:
    """A row's patient id as the file recorded it; None for a row without one (SplitView.row_groups
    gives such a row a key of its own, made from the file's row number)."""
    return None if key.startswith(OWN_GROUP) else key


def _group_text(key: str) -> str:
    return "no group (no patient id)" if _group_id(key) is None else f"group {key!r}"


def compare(paths: Sequence[str | Path], *, features: str = "cls", ks: Sequence[int] = (20,),
            temperature: float = 0.07, heads: Sequence[str] = (), shots: Sequence[int] | None = None,
            tries: int = 5, bootstrap: int = 1000, positive_class: str | None = None, seed: int = 0,
            train_split: str = "train", val_split: str = "val", test_split: str = "test",
            backend: str = "auto") -> CompareResult:
    """Evaluate every file with the same protocols on the same rows, then a paired bootstrap.

    Raises ValueError (one line) for fewer than 2 or more than 20 files, unknown heads, or files
    whose images, splits or labels differ."""
    paths = [Path(p) for p in paths]
    if not MIN_FILES <= len(paths) <= MAX_FILES:
        raise ValueError(f"compare takes {MIN_FILES} to {MAX_FILES} feature files; got {len(paths)}.")
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("the same feature file is given twice; pass each backbone's file once.")
    bad = [h for h in heads if h not in COMPARE_HEADS]
    if bad:
        raise ValueError(f"--heads {', '.join(bad)} is not supported by compare; choose from {', '.join(COMPARE_HEADS)}.")
    if bootstrap < 1:
        raise ValueError(f"--bootstrap must be a positive number of resamples; got {bootstrap}.")
    ks = [int(k) for k in ks]
    names = display_names(paths)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stores = [stack.enter_context(FeatureStore(p)) for p in paths]
        val_split = resolve_val_split(stores[0].splits, val_split)
        with_val = [n for n, store in zip(names, stores) if val_split in store.splits]
        if not with_val and val_split not in (None, "none", VAL_SPLIT):   # a typo must not mean cross-validation
            raise ValueError(f"--val-split {val_split!r}: no file has such a split ({names[0]} has "
                             f"{', '.join(stores[0].splits)}); give one of those, or none (C by cross-validation "
                             f"on {train_split!r}).")
        if with_val and len(with_val) < len(names):
            without = [n for n in names if n not in with_val]
            own = {n: resolve_val_split(store.splits) for n, store in zip(names, stores) if n in without}
            named = {n: v for n, v in own.items() if v in stores[names.index(n)].splits}
            if named:  # each file has a validation split, under another name
                raise ValueError(f"{', '.join(with_val)} name{'s' if len(with_val) == 1 else ''} the validation split "
                                 f"{val_split!r} but {', '.join(f'{n} names it {v!r}' for n, v in named.items())}; "
                                 f"compare reads one split name in every file: give the splits one name (e.g. "
                                 f"re-extract, or rename the HDF5 group), or --val-split none to choose the probe's "
                                 f"C by cross-validation on {train_split!r} for all.")
            raise ValueError(f"{', '.join(with_val)} {'has' if len(with_val) == 1 else 'have'} a {val_split!r} split "
                             f"but {', '.join(without)} {'has' if len(without) == 1 else 'have'} none; compare "
                             f"evaluates every file the same way: extract every backbone from the same data, or "
                             f"--val-split none to choose the probe's C by cross-validation on {train_split!r} "
                             f"for all.")
        use_val = bool(with_val)
        check_distinct_splits(train_split, val_split if use_val else None, test_split)
        splits = [train_split] + ([val_split] if use_val else []) + [test_split]
        cached: list[dict[str, SplitArrays]] = []
        for name, store in zip(names, stores):
            arrays: dict[str, SplitArrays] = {}
            for split in splits:
                if split not in store.splits:
                    having = [n for n, s in zip(names, stores) if split in s.splits]
                    if not having:
                        raise ValueError(f"no file has a split {split!r} (option --{_role(split, train_split, test_split)}"
                                         f"); they have {', '.join(store.splits)}.")
                    raise ValueError(f"{name} has no split {split!r} (it has {', '.join(store.splits)}), but "
                                     f"{having[0]} has; compare needs the same images in the same splits.")
                cached_split_arrays(store, split, features, "compare", arrays)
            if arrays[train_split].y.ndim == 2:
                raise ValueError(f"{name} is multi-label; compare ranks single-label tasks (top-1, or AUROC of "
                                 f"a binary task's positive class).")
            cached.append(arrays)
        for i in range(1, len(stores)):
            check_same_rows((names[0], stores[0], cached[0]), (names[i], stores[i], cached[i]), splits)
        without = [n for n, store in zip(names, stores) if all(store[s].groups is None for s in splits)]
        notes += share_groups(names, cached, splits)
        lender = next((store for n, store in zip(names, stores) if n not in without), None)
        leak = lender.leakage_note(splits) if lender is not None and without else None
        if leak:  # the same images in the same splits: the files without groups share the leak
            notes.append(f"{', '.join(without)} (no groups of their own, the same images): {leak}")
        classes = list(stores[0].classes)
        positive = resolve_positive(classes, cached[0][train_split].y, positive_class)
        test = cached[0][test_split]
        absent = [c for i, c in enumerate(classes) if i not in set(np.asarray(test.y).tolist())]
        if absent and np.asarray(test.y).ndim == 1:  # the labels are shared: one note for every file
            notes.append(f"classes absent from {test_split!r}: {', '.join(absent)} (left out of balanced accuracy "
                         f"and AUROC for every file; macro F1 counts them only where predicted).")
        proba: dict[tuple[str, str], np.ndarray] = {}
        fs: dict[str, dict[str, FewShotResult]] = {}
        probe_c: dict[str, float] = {}        # each file's chosen C (on val, or by cross-validation)
        for name, store, arrays in zip(names, stores, cached):
            for k in ks:
                knn = run_knn(store, train_split=train_split, eval_split=test_split, ks=(k,),
                              temperatures=(temperature,), features=features, backend=backend,
                              positive_class=positive_class, seed=seed, arrays=arrays)
                proba[(name, "knn" if len(ks) == 1 else f"knn k={k}")] = knn.proba
                notes += [_of_file(name, "k-NN", w) for w in knn.warnings]
            probe = run_probe(store, train_split=train_split, val_split=val_split if use_val else None,
                              test_split=test_split, features=features, positive_class=positive_class, seed=seed,
                              arrays=arrays)
            proba[(name, "probe")] = probe.test_proba
            probe_c[name] = float(probe.probe.best_C_)
            notes += [_of_file(name, "probe", w) for w in probe.warnings]
            if shots:
                fs[name] = {m: few_shot(store, method=m, shots=shots, tries=tries, seed=seed, train_split=train_split,
                                        val_split=val_split, eval_split=test_split, features=features, k=ks[0],
                                        temperature=temperature, backend=backend, positive_class=positive_class,
                                        arrays=arrays)
                            for m in (("knn", "probe") if use_val else ("knn",))}
                if not use_val:
                    why = "--val-split none" if val_split in (None, "none") else f"no {val_split!r} split"
                    notes.append(f"{name}: {why}, so the few-shot curve is k-NN only (the few-shot probe chooses C "
                                 f"on validation).")
        if not use_val:
            notes.append(f"the probe chose C by cross-validation on {train_split!r} (no validation split used), in "
                         f"every file alike.")
        models = [s.config.get("model") for s in stores]
        fingerprints = [s.fingerprint for s in stores]
    if "linear" in heads:
        for name, path in zip(names, paths):
            proba[(name, "linear")] = _linear_head_proba(path, test.y, features=features, seed=seed,
                                                         positive_class=positive_class, train_split=train_split,
                                                         val_split=val_split if use_val else None,
                                                         test_split=test_split)
    for per in fs.values():
        for res in per.values():
            notes += [n for n in res.notes if n not in notes]
    metric_names = BINARY_METRICS if positive is not None else MULTICLASS_METRICS
    primary = metric_names[0]
    idx = resample_indices(len(test.y), bootstrap, test.groups, seed)
    keys = None if test.groups is None else group_keys(test.groups)
    units = len(test.y) if keys is None else len(set(keys))
    grouped = units < len(test.y)
    # as metrics.Bootstrap.warnings says them for one file: too few units, and too few of a class
    notes += few_units_warning(units, grouped)
    scarce = scarce_classes(test.y, keys if grouped else None, classes)
    if scarce:
        notes.append(scarce_warning(scarce, grouped))
    point, boot = paired_bootstrap(test.y, proba, metric_names, idx, positive)
    wilson = proportion_cis(test.y, proba, metric_names, positive, keys)
    ranking = rank(names, point, primary)
    if all(point.get((n, "probe", primary)) is None for n in names):
        knn_defined = any(v is not None for (f, m, metric), v in point.items() if m.startswith("knn")
                          and metric == primary)
        notes.append(f"ranking: the probe's {primary} is undefined on {test_split!r} for every file (e.g. no row "
                     f"of one class there), so the files are ranked "
                     + (f"by k-NN {primary}." if knn_defined else "in the order given, not by any measurement."))
    rows, pairs, n_valid = _tables(ranking, dict(zip(names, models)), point, boot, metric_names, list(proba), wilson)
    notes += [flat_warning(f"{r['file']} {r['method']} {r['metric']}", *r["ci"]) for r in rows
              if r["interval"] == "bootstrap" and r["ci"] and r["ci"][0] == r["ci"][1]]
    never = [k for k, n in n_valid.items() if n == 0]
    dropped = [k for k, n in n_valid.items() if 0 < n < (1 - 0.05) * bootstrap]
    if never:
        notes.append(f"bootstrap: some metrics were undefined in every one of the {bootstrap} resamples "
                     f"({', '.join(never[:3])}{' ...' if len(never) > 3 else ''}): they have no bootstrap interval "
                     f"(a Wilson one's differences have none).")
    if dropped:
        notes.append(f"bootstrap: some metrics were undefined in more than 5% of the {bootstrap} resamples "
                     f"({', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}); the bootstrap intervals of "
                     f"those metrics (of a Wilson one's differences only) use the valid ones.")
    if bootstrap < MIN_RELIABLE_BOOTSTRAP:
        notes.append(f"bootstrap: {bootstrap} resamples are too few for 95% percentile intervals (their ends are the "
                     f"extreme resamples, which need not even contain the point estimate) or for 'excludes 0'; use "
                     f"--bootstrap 1000.")
    config = {"model": ", ".join(str(m) for m in models), "files": [str(p.resolve()) for p in paths], "names": names,
              "models": models, "fingerprints": fingerprints, "features": features, "ks": ks,
              "temperature": float(temperature), "heads": list(heads), "bootstrap": int(bootstrap),
              "grouped": grouped, "n_units": units, "seed": int(seed),
              "train_split": train_split,
              "val_split": val_split if use_val else None, "test_split": test_split, "n_test": int(len(test.y)),
              "threshold": 0.5 if positive is not None else None, "primary_metric": primary,
              "positive_class": None if positive is None else classes[positive], "probe_C": probe_c,
              "ranking_rule": f"probe {primary} on {test_split}, best first; ties: k-NN {primary}, then the order given",
              **({"shots": sorted({int(n) for n in shots}), "tries": int(tries)} if shots else {})}
    return CompareResult(names, paths, models, ranking, rows, pairs, config, primary,
                         None if positive is None else classes[positive], test.y, proba, n_valid, fs,
                         list(dict.fromkeys(notes)),
                         intervals=describe_intervals(metric_names, bootstrap, grouped))


def paired_bootstrap(y: np.ndarray, proba: dict[tuple[str, str], np.ndarray], metric_names: Sequence[str],
                     indices: Sequence[np.ndarray], positive: int | None
                     ) -> tuple[dict[tuple[str, str, str], float | None], dict[tuple[str, str, str], np.ndarray]]:
    """Point estimates and per-resample values of every (file, method, metric): the same resampled
    rows (`indices`, one array per resample) for every entry, so differences are paired. Undefined
    values (e.g. AUROC with one class drawn, or any class-averaged metric in a resample that lacks
    a class of the full split) are NaN."""
    y = np.asarray(y)
    complete = class_checker(y)
    same_f1 = {key: f1_class_checker(y, decide(p, positive=positive)) for key, p in proba.items()}
    point: dict[tuple[str, str, str], float | None] = {}
    boot: dict[tuple[str, str, str], np.ndarray] = {}
    for (name, method), p in proba.items():
        for m, v in scalar_metrics(metric_names, y, p, positive=positive).items():
            point[(name, method, m)] = v
            boot[(name, method, m)] = np.full(len(indices), np.nan)
    for b, ix in enumerate(indices):
        yb = y[ix]
        every_class = complete(yb)
        for (name, method), p in proba.items():
            f1_ok = same_f1[(name, method)](ix)
            for m, v in scalar_metrics(metric_names, yb, p[ix], positive=positive).items():
                if v is not None and (every_class or m not in CLASS_AVERAGED) and (f1_ok or m != "macro_f1"):
                    boot[(name, method, m)][b] = v
    return point, boot


def proportion_cis(y: np.ndarray, proba: dict[tuple[str, str], np.ndarray], metric_names: Sequence[str],
                   positive: int | None, keys: Sequence[str] | None, alpha: float = ALPHA
                   ) -> dict[tuple[str, str, str], list[float]]:
    """Each file's Wilson score interval of its proportions (top-1, sensitivity, specificity at the
    decision rule of its point estimate; patients by design effect), as train and probe give them:
    a percentile interval of the resamples is [1, 1] whenever all of few positives are found."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for (name, method), p in proba.items():
        pred = decide(p, positive=positive)
        for m in metric_names:
            rows = proportion_hits(m, y, pred, positive) if m in PROPORTION_METRICS else None
            interval = None if rows is None else proportion_interval(rows[1], keys, alpha, rows=rows[0])
            if interval is not None:
                out[(name, method, m)] = [float(interval[0]), float(interval[1])]
    return out


def describe_intervals(metric_names: Sequence[str], n_boot: int, grouped: bool) -> str:
    """How compare's intervals were made, in one line for its tables and the report."""
    wilson = [m for m in metric_names if m in PROPORTION_METRICS]
    boot = [m for m in metric_names if m not in PROPORTION_METRICS]
    parts = ([f"Wilson score for each file's {', '.join(wilson)}" + (" (patients by design effect)" if grouped else "")]
             if wilson else [])
    parts.append(f"{n_boot} paired bootstrap resamples{' of whole groups' if grouped else ''} for "
                 + (f"each file's {', '.join(boot)} and " if boot else "") + "every difference a - b")
    return "95 % intervals: " + "; ".join(parts)


def rank(names: Sequence[str], point: dict[tuple[str, str, str], float | None], primary: str) -> list[str]:
    """Files best first by the probe's primary metric; ties by k-NN's, then by the order given."""
    def key(i: int) -> tuple[float, float, int]:
        probe = point.get((names[i], "probe", primary))
        knn = next((v for (f, m, metric), v in point.items() if f == names[i] and m.startswith("knn")
                    and metric == primary), None)
        return (-(probe if probe is not None else -np.inf), -(knn if knn is not None else -np.inf), i)

    return [names[i] for i in sorted(range(len(names)), key=key)]


def percentile_ci(values: np.ndarray, alpha: float = ALPHA) -> list[float] | None:
    """[low, high] percentile interval of the finite values, or None when there are none."""
    v = values[np.isfinite(values)]
    if not v.size:
        return None
    return [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]


def _tables(ranking: list[str], models: dict[str, str | None], point: dict, boot: dict, metric_names: Sequence[str],
            entries: list[tuple[str, str]], wilson: dict[tuple[str, str, str], list[float]]
            ) -> tuple[list[dict], list[dict], dict[str, int]]:
    """rows (files in ranked order, then method, then metric; a proportion's interval is its Wilson
    one), pairs (a ranked above b, paired bootstrap) and valid counts."""
    methods = list(dict.fromkeys(m for _, m in entries))
    rows, pairs, n_valid = [], [], {}
    for f in ranking:
        for method in methods:
            for m in metric_names:
                if (f, method, m) not in point:
                    continue
                values = boot[(f, method, m)]
                n_valid[f"{f}/{method}/{m}"] = int(np.isfinite(values).sum())
                own = wilson.get((f, method, m))
                rows.append({"file": f, "model": models[f], "method": method, "metric": m,
                             "value": point[(f, method, m)], "ci": own or percentile_ci(values),
                             "interval": "wilson" if own else "bootstrap"})
    for method in sorted(methods, key=lambda m: m != "probe"):  # the ranking's own pairs first (tables cut)
        for m in metric_names:
            for i, a in enumerate(ranking):
                for b in ranking[i + 1:]:
                    if (a, method, m) not in point or (b, method, m) not in point:
                        continue
                    va, vb = point[(a, method, m)], point[(b, method, m)]
                    diff = None if va is None or vb is None else va - vb
                    pairs.append({"a": a, "b": b, "method": method, "metric": m, "diff": diff,
                                  "ci": percentile_ci(boot[(a, method, m)] - boot[(b, method, m)])})
    return rows, pairs, n_valid


def _linear_head_proba(path: Path, test_y: np.ndarray, *, features: str, seed: int, positive_class: str | None,
                       train_split: str, val_split: str | None, test_split: str) -> np.ndarray:
    """Test probabilities of the best linear head of a small sweep (ranked on validation). The sweep
    reads the file itself (cached_splits), so this is the one place a file is read twice."""
    from featcache.sweeping import sweep  # torch training: only with --heads linear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sweep(path, head="linear", lrs=LINEAR_LRS, weight_decays=LINEAR_WDS, features=(features,), seed=seed,
                    positive_class=positive_class, train_split=train_split, val_split=val_split,
                    test_split=test_split)
    t = res.trainer
    if t.test_proba_ is None or not np.array_equal(np.asarray(t.test_y_), np.asarray(test_y)):
        raise ValueError(f"the linear head of {path.name} was tested on other rows than k-NN and the probe; "
                         f"check that split {test_split!r} is the same for both.")
    return t.test_proba_
