"""`featcache knn` and `featcache probe`: representation quality of cached features."""
from __future__ import annotations

from typing import Any

import click

from featcache.names import KNN_BACKENDS, SELECTION_METRICS, SHOWN_METRICS
from featcache_cli.app import (CGrid, CommaList, Console, FeatureKind, FiniteFloatRange, ThresholdRule, bootstrap_count,
                               checked_run_dir, cli, echo_notes, given, json_option, library_errors, per_label_rows,
                               positive_option, quiet_option, warnings_as_notes, write_json)

# the library (torch, scikit-learn) is imported inside each command, so `featcache --help` stays instant


def _ci_rows(block: dict) -> list[dict]:
    """metric, value and 95% CI rows of a metrics block (only the headline metrics)."""
    ci = block.get("ci") or {}
    rows = []
    for m in SHOWN_METRICS:
        if block.get(m) is None:
            continue
        row = {"metric": m, "value": block[m]}
        if ci:
            row["95% CI"] = f"[{ci[m][0]:.4f}, {ci[m][1]:.4f}]" if m in ci else ""
        rows.append(row)
    return rows


def seed_option(fn=None, *, cv: bool = False):
    """--seed of the bootstrap resamples and the few-shot draws (knn, probe; compare has its own)."""
    def add(f):
        return click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                            help="Seed of the bootstrap resamples and the few-shot draws"
                                 + (" (and of the CV folds)." if cv else "."))(f)
    return add(fn) if fn is not None else add


def tries_need_shots(shots: Any) -> None:
    """--tries without --shots does nothing: refuse it, so no one reads one draw as repeated ones."""
    if shots is None and given("tries"):
        raise click.UsageError("--tries applies to few-shot curves: add --shots (e.g. --shots 1,2,5,10) or drop "
                               "--tries.")


def shots_options(fn):
    """--shots and --tries: few-shot curves (DINOv2's n_per_class / n_tries)."""
    fn = click.option("--tries", type=click.IntRange(min=1), default=5, show_default=True,
                      help="With --shots: draws per shot count (each seeded by seed, shots and try).")(fn)
    return click.option("--shots", type=CommaList(int, minimum=1), default=None, metavar="N,N,...",
                        help="Few-shot curve: train on N rows per class (whole groups when the file has "
                             "them), evaluate on the full eval split, mean ± std over --tries; e.g. 1,2,5,10.")(fn)


def _few_shot_table(console: Console, fs) -> None:
    """Print a few-shot summary: shots, tries, training rows, mean and std of top-1 and balanced accuracy."""
    echo_notes(console, fs.notes)
    auroc = ["auroc_mean", "auroc_std"] if any("auroc_mean" in r for r in fs.summary) else []
    pos = fs.config.get("positive_class")
    per_class = ["n_train_per_class"] if fs.config.get("grouped") else []  # whole groups: classes get more rows
    console.table(fs.summary, ["shots", "tries", "n_train", *per_class, "top1_mean", "top1_std", "balanced_accuracy_mean",
                               "balanced_accuracy_std", *auroc],
                  title=f"\nfew-shot {fs.method}: {fs.config['tries']} tries per shot count, evaluated on all "
                        f"{fs.config['n_eval']} {fs.config['eval_split']} rows"
                        + (f" (positive class {pos}, threshold 0.5)" if pos else ""))


def _finish(console: Console, res: Any, json_path: str | None, out_dir: str | None) -> None:
    """What knn and probe do last: the few-shot table, --json, the run directory."""
    if res.few_shot:
        _few_shot_table(console, res.few_shot)
    write_json(json_path, {**res.config, **res.metrics()})
    if out_dir:
        res.save(out_dir)
        console.note(f"wrote run directory {out_dir}")


def _positive_title(block: dict, where: str | None = None) -> str:
    """', positive class X at threshold T (where it came from)' for binary blocks; '' otherwise."""
    pos = block.get("positive_class")
    if not pos:
        return ""
    at = f" at threshold {block['threshold']:.4g}" if block.get("threshold") is not None else ""
    return f", positive class {pos}{at}" + (f" ({where})" if at and where else "")


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default="train", show_default=True, help="Split whose rows are the neighbours.")
@click.option("--eval-split", default="test", show_default=True, help="Split to classify.")
@click.option("--k", "ks", type=CommaList(int, minimum=1), default="10,20,100,200", show_default=True,
              help="Neighbour counts, comma-separated; the first is the headline in run directories.")
@click.option("--temperature", type=CommaList(float), default="0.07", show_default=True,
              help="Vote temperature(s) T > 0, comma-separated: each neighbour votes exp(sim / T).")
@click.option("--weighting", type=click.Choice(["distance", "uniform"]), default="distance", show_default=True,
              help="distance: DINO's exp(sim / T) vote; uniform: plain majority.")
@click.option("--features", default="cls", show_default=True, type=FeatureKind(),
              help="Which cached features to compare: cls, pooled, cls+pooled, cls@N, cls@N+pooled.")
@click.option("--backend", type=click.Choice(KNN_BACKENDS), default="auto", show_default=True,
              help="Search backend; auto uses faiss on CPU when installed, torch (GPU when there is one) otherwise.")
@click.option("--bootstrap", type=bootstrap_count(0), default=0, show_default=True,
              help="95% CIs of the headline k (0: none): this many bootstrap resamples (whole patients when the "
                   "file has groups) for AUROC and balanced accuracy; top-1, sensitivity and specificity get "
                   "Wilson score intervals.")
@positive_option
@shots_options
@seed_option
@json_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=checked_run_dir,
              help="Run directory for `featcache report` (config.json, metrics.json, figures/).")
@quiet_option
@library_errors
def knn(features_file, train_split, eval_split, ks, temperature, weighting, features, backend, bootstrap,
        positive_class, shots, tries, seed, json_path, out_dir, quiet):
    """k-NN accuracy of cached features (DINO's weighted vote), every k and T from one search.

    Example: featcache knn feats.h5 --train-split train --eval-split test --k 10,20,100,200

    Few-shot (first k and T): featcache knn feats.h5 --shots 1,2,5,10 --tries 5
    """
    from featcache.evaluation import few_shot, run_knn
    from featcache.store import FeatureStore

    console = Console(quiet, json_path)
    tries_need_shots(shots)
    if min(temperature) <= 0:
        raise click.BadParameter(f"the temperature must be positive (DINO uses 0.07); got {min(temperature):g}",
                                 param_hint="--temperature")
    if weighting == "uniform" and given("temperature"):  # one identical row per temperature otherwise
        raise click.UsageError("--temperature weights the distance vote; --weighting uniform is a plain majority "
                               "and reads no temperature: drop one of them.")
    arrays: dict = {}  # each split read once, shared by the evaluation and the few-shot draws
    with FeatureStore(features_file) as store:
        res = run_knn(store, train_split=train_split, eval_split=eval_split, ks=ks, temperatures=temperature,
                      weighting=weighting, features=features, backend=backend, bootstrap=bootstrap,
                      positive_class=positive_class, seed=seed, arrays=arrays)
        if shots:
            res.few_shot = few_shot(store, method="knn", shots=shots, tries=tries, train_split=train_split,
                                    eval_split=eval_split, features=features, k=ks[0], temperature=temperature[0],
                                    weighting=weighting, backend=backend, positive_class=positive_class,
                                    seed=seed, arrays=arrays)
    echo_notes(console, res.warnings, {res.eval.name: res.headline})
    columns = ["k"] + (["temperature"] if weighting == "distance" or len(temperature) > 1 else []) + [c for c in ("top1", "top5", "balanced_accuracy", "auroc", "micro_auroc", "auprc")
                                       if any(c in r for r in res.rows)] + ["k_used"]
    console.table(res.rows, columns, title=f"k-NN ({weighting}, {features}): {res.config['n_train']} {train_split} rows "
                                           f"-> {res.config['n_eval']} {eval_split} rows{_positive_title(res.headline)}")
    if bootstrap:
        head = res.config["headline"]
        console.table(_ci_rows(res.headline), title=f"\nk = {head['k']}, T = {head['temperature']:g}: "
                                                    f"{(res.headline.get('bootstrap') or {}).get('describe', '')}")
    if per_label_rows(res.headline):
        head = res.config["headline"]
        console.table(per_label_rows(res.headline), title=f"\nper label (k = {head['k']}, T = {head['temperature']:g})")
    _finish(console, res, json_path, out_dir)


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default="train", show_default=True, help="Split the probe is fitted on.")
@click.option("--val-split", default="val", show_default=True,
              help="Split C is chosen on; when the file has no 'val' (or with --val-split none), C "
                   "is chosen by 5-fold cross-validation on train (grouped by patient when groups exist). "
                   "A split named here that the file lacks is an error.")
@click.option("--test-split", default="test", show_default=True,
              help="Split evaluated once at the chosen C (skipped when the file has no 'test', or with "
                   "'none'; a split named here that the file lacks is an error).")
@click.option("--features", "kind", type=FeatureKind(), default="cls",
              show_default=True, help="Which cached features to probe: cls, pooled, cls+pooled, cls@N, cls@N+pooled.")
@click.option("--Cs", "cs", type=CGrid(), default=None,
              help="C values (inverse L2 strength), comma-separated, or a named grid: default, dinov2 "
                   "(DINOv2's 45 values, 1e-6 ... 1e5) [default: 12 values, 1e-6 ... 1e5].")
@click.option("--metric", type=click.Choice(SELECTION_METRICS), default="accuracy", show_default=True,
              help="What C is chosen by on validation.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="'balanced' reweights classes inversely to their frequency (imbalanced data).")
@click.option("--cv", default=5, show_default=True, type=click.IntRange(2, None),
              help="Folds when there is no validation split.")
@click.option("--no-refit", is_flag=True, help="Keep the model fitted on train only (default: refit on "
                                                "train + val at the chosen C).")
@click.option("--bootstrap", default=0, show_default=True, type=bootstrap_count(0),
              help="95% CIs of the test metrics (0: none): this many bootstrap resamples (whole groups when "
                   "the split has them) for AUROC, balanced accuracy and macro F1; top-1, sensitivity and "
                   "specificity get Wilson score intervals.")
@click.option("--threshold", type=ThresholdRule(), default="0.5", show_default=True,
              help="Binary / multi-label decision threshold: a number, or youden / sensitivity:0.95 chosen on "
                   "validation (needs --no-refit, so validation rows stay unseen). Saved with the probe.")
@click.option("--max-iter", default=1000, show_default=True, type=click.IntRange(1, None),
              help="lbfgs iterations per C.")
@positive_option
@shots_options
@seed_option(cv=True)
@json_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=checked_run_dir,
              help="Run directory: config.json, metrics.json, figures/, and the fitted probe (head.safetensors + "
                   "head.json) that `featcache predict` applies.")
@quiet_option
@library_errors
def probe(features_file, train_split, val_split, test_split, kind, cs, metric, class_weight, cv, no_refit,
          bootstrap, threshold, max_iter, positive_class, shots, tries, seed, json_path, out_dir, quiet):
    """Logistic-regression probe of cached features: standardise, sweep C (warm-started), pick C on
    validation, refit on train + val, evaluate on test; --out saves a probe predict can apply.

    Example: featcache probe feats.h5 --features cls --bootstrap 1000 --out runs/probe-cls

    Few-shot (C chosen on the full val split, no refit): featcache probe feats.h5 --shots 1,2,5,10 --tries 5
    """
    from featcache.evaluation import few_shot, run_probe
    from featcache.metrics import threshold_provenance, untuned_reasons
    from featcache.store import FeatureStore

    console = Console(quiet, json_path)
    tries_need_shots(shots)
    val = None if val_split.lower() == "none" else val_split
    test = None if test_split.lower() == "none" else test_split
    if shots and not test:
        raise click.UsageError("--shots evaluates the few-shot probes on the test split; give --test-split NAME.")
    arrays: dict = {}  # each split read once, shared by the probe and the few-shot draws
    from featcache.store import resolve_val_split

    with FeatureStore(features_file) as store:
        val = resolve_val_split(store.splits, val)  # "val" also finds a file's one validation/valid/dev split
        for option, name in (("val_split", val), ("test_split", test)):
            # a split named on the command line must exist: a typo would silently change the protocol
            if given(option) and name and name not in store.splits:
                raise click.UsageError(f"--{option.replace('_', '-')} {name!r}: {store.path.name} has no such split "
                                       f"(it has {', '.join(store.splits)}); give one of those, or none.")
        if val and val not in store.splits:
            console.note(f"no validation split {val!r} in {store.path.name} (splits: {', '.join(store.splits)}): "
                         f"choosing C by {cv}-fold cross-validation on {train_split!r}.")
        if test and test not in store.splits:
            console.note(f"no test split {test!r} in {store.path.name}: reporting validation numbers only.")
        with warnings_as_notes(console):
            res = run_probe(store, train_split=train_split, val_split=val, test_split=test, features=kind, Cs=cs,
                            metric=metric, class_weight=None if class_weight == "none" else class_weight, cv=cv,
                            refit=not no_refit, bootstrap=bootstrap, max_iter=max_iter,
                            positive_class=positive_class, threshold=threshold, progress=not quiet, seed=seed,
                            arrays=arrays)
            if shots:
                res.few_shot = few_shot(store, method="probe", shots=shots, tries=tries, train_split=train_split,
                                        val_split=val, eval_split=test, features=kind, Cs=cs, metric=metric,
                                        max_iter=max_iter, positive_class=positive_class, seed=seed, arrays=arrays,
                                        class_weight=None if class_weight == "none" else class_weight)
    est = res.probe
    if given("cv") and est.selection_ == "val":  # every note printed is also in --json and metrics.json
        res.warnings.append(f"--cv {cv} was not used: C was chosen on split {res.config['val_split']!r} (--val-split "
                            f"none cross-validates on {train_split!r}).")
    echo_notes(console, res.warnings, {str(test): res.test})
    where = repr(res.config["val_split"]) if est.selection_ == "val" else f"{est.cv_folds_}-fold CV"
    score_name = f"{where} {metric}"
    console.table([{"C": f"{c:g}", score_name: s, "lbfgs_iter": est.n_iter_.get(c),
                    "converged": "yes" if est.converged_.get(c, True) else "NO"} for c, s in est.scores_.items()],
                  title=f"C sweep on {res.config['n_train']} {train_split} rows x {len(res.probe.scaler_.mean_)} "
                        f"features ({kind}), selection on {where}")
    console.echo(f"best C: {est.best_C_:g}  ({score_name} {est.best_score_:.4f})")
    if res.test is not None:
        intervals = (res.test.get("bootstrap") or {}).get("describe")
        meta = res.head[1]
        where = threshold_provenance(res.threshold_rule, res.threshold,
                                     untuned_reasons(meta.get("threshold_untuned"), meta.get("threshold_untuned_why")))
        console.table(_ci_rows(res.test), title=f"\ntest metrics ({res.test['n']} {test} rows, C = {est.best_C_:g}"
                                                f"{_positive_title(res.test, where)})"
                                                + (f"; {intervals}" if intervals else ""))
        if per_label_rows(res.test):
            console.table(per_label_rows(res.test), title=f"\nper label ({test})")
    _finish(console, res, json_path, out_dir)


@cli.command()
@click.argument("features_files", metavar="A.h5 B.h5 [C.h5 ...]", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--features", type=FeatureKind(), default="cls", show_default=True,
              help="Which cached features of every file to compare: cls, pooled, cls+pooled, cls@N, cls@N+pooled.")
@click.option("--k", "ks", type=CommaList(int, minimum=1), default="20", show_default=True,
              help="k-NN neighbour count (several, comma-separated, give one k-NN row per k).")
@click.option("--temperature", type=FiniteFloatRange(0, min_open=True), default=0.07, show_default=True, help="k-NN vote temperature T > 0.")
@click.option("--heads", type=CommaList(str, choices=("linear",)), default=None,
              help="Also compare trained heads; only 'linear' for now: the best linear head of a small sweep "
                   "(lr 1e-3,1e-2 x wd 0,1e-4, chosen on val).")
@click.option("--train-split", default="train", show_default=True, help="Split k-NN neighbours and the probe are fitted on.")
@click.option("--val-split", default="val", show_default=True,
              help="Split the probe's C is chosen on, in every file (none: cross-validation on the train split).")
@click.option("--test-split", default="test", show_default=True, help="Split every method is scored on.")
@shots_options
@click.option("--bootstrap", type=bootstrap_count(1), default=1000, show_default=True,
              help="Paired bootstrap resamples of the test rows (whole groups when the file has groups) for the "
                   "differences between files and each file's AUROC and balanced accuracy; at least 1.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the probe, the draws and the bootstrap.")
@positive_option
@json_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=checked_run_dir,
              help="Run directory (kind compare) for `featcache report`: metrics.json and figures/.")
@quiet_option
@library_errors
def compare(features_files, features, ks, temperature, heads, train_split, val_split, test_split, shots, tries,
            bootstrap, seed, positive_class, json_path, out_dir, quiet):
    """Rank backbones on the same images: k-NN and the logistic probe (optionally a linear head) on
    every file; each file's top-1, sensitivity and specificity get Wilson intervals, its AUROC and
    balanced accuracy a bootstrap of the test rows, and every difference between two files a
    paired bootstrap of the same rows (a difference CI that excludes 0 is a real gap).

    Example: featcache compare dino.h5 dinov2.h5 resnet.h5 --bootstrap 1000 --json cmp.json --out runs/cmp
    """
    from featcache.comparing import MAX_FILES, MIN_FILES
    from featcache.comparing import compare as run_compare

    tries_need_shots(shots)
    if not MIN_FILES <= len(features_files) <= MAX_FILES:
        raise click.UsageError(f"compare takes {MIN_FILES} to {MAX_FILES} feature files; got {len(features_files)}.")
    if temperature <= 0:
        raise click.BadParameter(f"the temperature must be positive (DINO uses 0.07); got {temperature:g}",
                                 param_hint="--temperature")
    console = Console(quiet, json_path)
    res = run_compare(features_files, features=features, ks=ks, temperature=temperature, heads=heads or (),
                      shots=shots, tries=tries, bootstrap=bootstrap, positive_class=positive_class, seed=seed,
                      train_split=train_split, val_split=val_split, test_split=test_split)
    echo_notes(console, res.notes)
    console.echo("probe C chosen: " + ", ".join(f"{f} {c:g}" for f, c in res.config["probe_C"].items()))
    rank = {f: i + 1 for i, f in enumerate(res.ranking)}
    pos = f", positive class {res.positive_class} at threshold 0.5" if res.positive_class else ""
    table = [{"rank": rank[r["file"]], "file": r["file"], "model": r["model"], "method": r["method"],
              "metric": r["metric"], "value": r["value"], "95% CI": _ci_text(r["ci"])} for r in res.rows]
    console.table(table, title=f"backbones ranked by probe {res.primary} on {res.config['n_test']} {test_split} rows"
                               f"{pos} ({res.intervals})")
    pairs = [{"a": p["a"], "b": p["b"], "method": p["method"], "metric": p["metric"], "a - b": p["diff"],
              "95% CI": _ci_text(p["ci"]),
              "excludes 0": "yes" if p["ci"] and (p["ci"][0] > 0 or p["ci"][1] < 0) else "no"}
             for p in res.pairs if p["metric"] == res.primary]
    console.table(pairs, title=f"\npaired differences of {res.primary} (same resampled test rows for both files; "
                               f"--json has every metric)")
    if res.few_shot:
        m = res.few_shot_metric
        console.table(res.shots_rows(), ["file", "method", "shots", "tries", "n_train", "top1_mean", "top1_std",
                                         *([f"{m}_mean", f"{m}_std"] if m != "top1" else [])],
                      title="\nfew-shot curves (mean ± std over tries)")
    write_json(json_path, res.to_json())
    if out_dir:
        res.save(out_dir)
        console.note(f"wrote run directory {out_dir}")


def _ci_text(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "n/a"
