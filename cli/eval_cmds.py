"""`featcache knn` and `featcache probe`: representation quality of cached features."""
from __future__ import annotations

import click

from featcache.names import KNN_BACKENDS, SELECTION_METRICS, SHOWN_METRICS
from featcache_cli.app import (CommaList, Console, FeatureKind, ThresholdRule, cli, echo_notes, json_option, library_errors,
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


def _positive_title(block: dict) -> str:
    pos = block.get("positive_class")
    return f", positive class {pos}" + (f" at threshold {block['threshold']:.4g}" if block.get("threshold") is not None else "") \
        if pos else ""


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
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Bootstrap resamples for 95% CIs of the headline k (grouped by patient when the file has groups).")
@positive_option
@json_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory for `featcache report` (config.json, metrics.json, figures/).")
@quiet_option
@library_errors
def knn(features_file, train_split, eval_split, ks, temperature, weighting, features, backend, bootstrap,
        positive_class, json_path, out_dir, quiet):
    """k-NN accuracy of cached features (DINO's weighted vote), every k and T from one search.

    Example: featcache knn feats.h5 --train-split train --eval-split test --k 10,20,100,200
    """
    from featcache.evaluation import run_knn
    from featcache.store import FeatureStore

    console = Console(quiet, json_path)
    if min(temperature) <= 0:
        raise click.BadParameter(f"the temperature must be positive (DINO uses 0.07); got {min(temperature):g}",
                                 param_hint="--temperature")
    with FeatureStore(features_file) as store:
        res = run_knn(store, train_split=train_split, eval_split=eval_split, ks=ks, temperatures=temperature,
                      weighting=weighting, features=features, backend=backend, bootstrap=bootstrap,
                      positive_class=positive_class)
    echo_notes(console, res.warnings)
    columns = ["k", "temperature"] + [c for c in ("top1", "top5", "balanced_accuracy", "auroc", "micro_auroc", "auprc")
                                       if any(c in r for r in res.rows)] + ["k_used"]
    console.table(res.rows, columns, title=f"k-NN ({weighting}, {features}): {res.config['n_train']} {train_split} rows "
                                           f"-> {res.config['n_eval']} {eval_split} rows{_positive_title(res.headline)}")
    if bootstrap:
        head = res.config["headline"]
        console.table(_ci_rows(res.headline), title=f"\nk = {head['k']}, T = {head['temperature']:g}: {bootstrap} "
                                                    f"bootstrap resamples" + (" by group" if res.eval.groups else ""))
    write_json(json_path, {**res.config, **res.metrics()})
    if out_dir:
        res.save(out_dir)
        console.note(f"wrote run directory {out_dir}")


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default="train", show_default=True, help="Split the probe is fitted on.")
@click.option("--val-split", default="val", show_default=True,
              help="Split C is chosen on; when the file has no such split (or with --val-split none), C "
                   "is chosen by 5-fold cross-validation on train (grouped by patient when groups exist).")
@click.option("--test-split", default="test", show_default=True,
              help="Split evaluated once at the chosen C (skipped when the file has none, or 'none').")
@click.option("--features", "kind", type=FeatureKind(), default="cls",
              show_default=True, help="Which cached features to probe: cls, pooled, cls+pooled, cls@N, cls@N+pooled.")
@click.option("--Cs", "cs", default=None,
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
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0, None),
              help="Bootstrap resamples of the test split for 95% confidence intervals (0: none; "
                   "resamples whole groups when the split has them).")
@click.option("--threshold", type=ThresholdRule(), default="0.5", show_default=True,
              help="Binary / multi-label decision threshold: a number, or youden / sensitivity:0.95 chosen on "
                   "validation (needs --no-refit, so validation rows stay unseen). Saved with the probe.")
@click.option("--max-iter", default=1000, show_default=True, type=click.IntRange(1, None),
              help="lbfgs iterations per C.")
@positive_option
@json_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory: config.json, metrics.json, figures/, and the fitted probe (head.safetensors + "
                   "head.json) that `featcache predict` applies.")
@quiet_option
@library_errors
def probe(features_file, train_split, val_split, test_split, kind, cs, metric, class_weight, cv, no_refit,
          bootstrap, threshold, max_iter, positive_class, json_path, out_dir, quiet):
    """Logistic-regression probe of cached features: standardise, sweep C (warm-started), pick C on
    validation, refit on train + val, evaluate on test; --out saves a probe predict can apply.

    Example: featcache probe feats.h5 --features cls --bootstrap 1000 --out runs/probe-cls
    """
    from featcache.evaluation import run_probe
    from featcache.store import FeatureStore

    console = Console(quiet, json_path)
    val = None if val_split.lower() == "none" else val_split
    test = None if test_split.lower() == "none" else test_split
    with FeatureStore(features_file) as store:
        if val and val not in store.splits:
            console.note(f"no validation split {val!r} in {store.path.name} (splits: {', '.join(store.splits)}): "
                         f"choosing C by {cv}-fold cross-validation on {train_split!r}.")
        if test and test not in store.splits:
            console.note(f"no test split {test!r} in {store.path.name}: reporting validation numbers only.")
        with warnings_as_notes(console):
            res = run_probe(store, train_split=train_split, val_split=val, test_split=test, features=kind, Cs=cs,
                            metric=metric, class_weight=None if class_weight == "none" else class_weight, cv=cv,
                            refit=not no_refit, bootstrap=bootstrap, max_iter=max_iter,
                            positive_class=positive_class, threshold=threshold, progress=not quiet)
    echo_notes(console, res.warnings)
    est = res.probe
    where = "val" if est.selection_ == "val" else f"{est.cv_folds_}-fold CV"
    score_name = f"{where} {metric}"
    console.table([{"C": f"{c:g}", score_name: s, "lbfgs_iter": est.n_iter_.get(c)} for c, s in est.scores_.items()],
                  title=f"C sweep on {res.config['n_train']} {train_split} rows x {len(res.probe.scaler_.mean_)} "
                        f"features ({kind}), selection on {where}")
    console.echo(f"best C: {est.best_C_:g}  ({score_name} {est.best_score_:.4f})")
    if res.test is not None:
        console.table(_ci_rows(res.test), title=f"\ntest metrics ({res.test['n']} {test} rows, C = {est.best_C_:g}"
                                                f"{_positive_title(res.test)})")
    write_json(json_path, {**res.config, **res.metrics()})
    if out_dir:
        res.save(out_dir)
        console.note(f"wrote run directory {out_dir}")
