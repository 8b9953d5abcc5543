"""`featcache probe` (logistic probe with a C sweep) and `featcache report` (run dirs -> report)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from featcache_cli.app import cli, parse_csv, print_table, write_json

# test metrics printed by `probe` (the JSON has every metric; these are the ones on screen)
_CI_METRICS = ("top1", "balanced_accuracy", "macro_f1", "auroc")
_BINARY_CI_METRICS = ("sensitivity", "specificity")


def _load_split(store: Any, split: str, features: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(X, y, groups) of the done, labelled rows of one split."""
    view = store[split]
    x, y, rows = view.arrays(features)
    if len(y) == 0:
        raise click.ClickException(f"split {split!r} of {store.path.name} has no labelled, done rows; "
                                   f"label it or pick another split.")
    groups = view.groups
    return x, y, ([groups[i] for i in rows] if groups is not None else None)


def _scalars(block: dict[str, Any]) -> dict[str, Any]:
    """The flat numeric part of a metrics dict (drops confusion matrix, per-class lists)."""
    return {k: v for k, v in block.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None}


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default="train", show_default=True, help="Split the probe is fitted on.")
@click.option("--val-split", default="val", show_default=True,
              help="Split C is chosen on; when the file has no such split (or with --val-split none), C "
                   "is chosen by 5-fold cross-validation on train (grouped by patient when groups exist).")
@click.option("--test-split", default="test", show_default=True,
              help="Split evaluated once at the chosen C (skipped when the file has none, or 'none').")
@click.option("--features", "kind", type=click.Choice(["cls", "pooled", "cls+pooled"]), default="cls",
              show_default=True, help="Which cached features to probe.")
@click.option("--Cs", "cs", default=None,
              help="Comma-separated C values (inverse L2 strength), or a named grid: 'default' (12 "
                   "values, 1e-6 ... 1e5) or 'dinov2' (DINOv2's 45 values, 1e-6 ... 1e5) [default: default].")
@click.option("--metric", type=click.Choice(["accuracy", "balanced_accuracy", "auroc", "loss"]),
              default="accuracy", show_default=True, help="What C is chosen by on validation.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="'balanced' reweights classes inversely to their frequency (imbalanced data).")
@click.option("--cv", default=5, show_default=True, type=click.IntRange(2, None),
              help="Folds when there is no validation split.")
@click.option("--no-refit", is_flag=True, help="Keep the model fitted on train only (default: refit on "
                                                "train + val at the chosen C).")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0, None),
              help="Bootstrap resamples of the test split for 95% confidence intervals (0: none; "
                   "resamples whole groups when the split has them).")
@click.option("--max-iter", default=1000, show_default=True, type=click.IntRange(1, None),
              help="lbfgs iterations per C (warm start along the C path needs few).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the printed numbers (and all test metrics) to this JSON file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory to write config.json, metrics.json and figures/ to (for `featcache report`).")
@click.option("--quiet", is_flag=True, help="Print only the tables, no progress messages.")
def probe(features_file: str, train_split: str, val_split: str, test_split: str, kind: str,
          cs: str | None, metric: str, class_weight: str, cv: int, no_refit: bool, bootstrap: int,
          max_iter: int, json_path: str | None, out_dir: str | None, quiet: bool) -> None:
    """Logistic-regression probe of cached features: standardise, sweep C (warm-started), pick C on
    validation, refit on train + val, evaluate on test.

    Example: featcache probe feats.h5 --features cls --bootstrap 1000 --out runs/probe-cls
    """
    import featcache
    from featcache.probe import DEFAULT_CS, NAMED_CS, LogisticProbe, expand_proba

    say = (lambda msg: None) if quiet else click.echo
    if cs and cs.strip().lower() in NAMED_CS:
        Cs = list(NAMED_CS[cs.strip().lower()])
    else:
        Cs = parse_csv(cs, float) if cs else list(DEFAULT_CS)
    try:
        store = featcache.open(features_file)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    with store:
        if train_split not in store.splits:
            raise click.ClickException(f"--train-split {train_split!r} is not in {store.path.name}; it has "
                                       f"splits {', '.join(store.splits)}. Pass one of those.")
        use_val = val_split.lower() != "none" and val_split in store.splits
        use_test = test_split.lower() != "none" and test_split in store.splits
        if not use_val:
            say(f"no validation split {val_split!r} in {store.path.name} (splits: "
                f"{', '.join(store.splits)}): choosing C by {cv}-fold cross-validation on "
                f"{train_split!r}.")
        if not use_test and test_split.lower() != "none":
            say(f"no test split {test_split!r} in {store.path.name}: reporting validation numbers only.")
        try:
            tx, ty, tgroups = _load_split(store, train_split, kind)
            vx, vy, _ = _load_split(store, val_split, kind) if use_val else (None, None, None)
            sx, sy, sgroups = _load_split(store, test_split, kind) if use_test else (None, None, None)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        classes = list(store.classes)
        multilabel = ty.ndim == 2
        config = {"kind": "probe", "features_file": str(Path(features_file).resolve()),
                  "fingerprint": store.fingerprint, "model": store.config.get("model"),
                  "features": kind, "train_split": train_split,
                  "val_split": val_split if use_val else None,
                  "test_split": test_split if use_test else None, "Cs": [float(c) for c in Cs],
                  "metric": metric, "class_weight": None if class_weight == "none" else class_weight,
                  "cv": cv, "refit": not no_refit, "bootstrap": bootstrap, "max_iter": max_iter,
                  "n_train": int(len(ty)), "n_val": int(len(vy)) if use_val else 0,
                  "n_test": int(len(sy)) if use_test else 0}

    say(f"probe: {len(ty)} train rows x {tx.shape[1]} features ({kind}), {len(Cs)} values of C")
    try:
        est = LogisticProbe(Cs=Cs, metric=metric, cv=cv, refit=not no_refit, max_iter=max_iter,
                            class_weight=None if class_weight == "none" else class_weight,
                            progress=not quiet)
        est.fit(tx, ty, vx, vy, groups=None if use_val else tgroups)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc

    where = "val" if est.selection_ == "val" else f"{est.cv_folds_}-fold CV"
    score_name = f"{where} {metric}"
    rows = [{"C": f"{c:g}", score_name: s, "lbfgs_iter": est.n_iter_.get(c)} for c, s in est.scores_.items()]
    print_table(rows, title=f"C sweep (selection on {where})")
    click.echo(f"best C: {est.best_C_:g}  ({score_name} {est.best_score_:.4f})")

    val_block = {metric: est.best_score_}
    if metric == "accuracy":
        val_block["top1"] = est.best_score_
    result: dict[str, Any] = {
        "kind": "probe", "best_C": est.best_C_, "selection": est.selection_, "cv_folds": est.cv_folds_,
        "metric": metric, "features": kind, "scores": {f"{c:g}": s for c, s in est.scores_.items()},
        "n_iter": {f"{c:g}": n for c, n in est.n_iter_.items()}, "val": val_block, "test": None,
    }
    proba = None
    if use_test:
        from featcache.metrics import bootstrap_ci, classification_metrics

        proba = est.predict_proba(sx)
        if not multilabel:
            proba = expand_proba(proba, est.classes_, len(classes))
        test = classification_metrics(sy, proba, classes=classes)
        if bootstrap:
            names = [m for m in (*_CI_METRICS, *_BINARY_CI_METRICS) if test.get(m) is not None]
            say(f"bootstrap: {bootstrap} resamples of the test split"
                + (" (by group)" if sgroups is not None else ""))
            ci = bootstrap_ci(sy, proba, metrics=tuple(names), n_boot=bootstrap, groups=sgroups, seed=0)
            test["ci"] = {k: [float(v[0]), float(v[1])] for k, v in ci.items()}
        result["test"] = test
        shown = [{"metric": k, "value": v,
                  "95% CI": (f"[{test['ci'][k][0]:.4f}, {test['ci'][k][1]:.4f}]"
                             if k in test.get("ci", {}) else "")}
                 for k, v in _scalars(test).items()]
        print_table(shown, columns=["metric", "value", "95% CI"] if bootstrap else ["metric", "value"],
                    title=f"test metrics ({len(sy)} rows, C = {est.best_C_:g})")
    write_json(json_path, result)
    if out_dir:
        _write_run_dir(Path(out_dir), config, result, sy, proba, classes, multilabel, say)


def _write_run_dir(out: Path, config: dict[str, Any], result: dict[str, Any], y: np.ndarray | None,
                   proba: np.ndarray | None, classes: list[str], multilabel: bool, say: Any) -> None:
    """config.json, metrics.json and figures/ (confusion matrix, ROC/PR for binary, calibration)."""
    from featcache import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_json(out / "metrics.json", result)
    if proba is None:
        say("no test split: no figures written.")
        return
    fig = out / "figures"
    test = result["test"] or {}
    if test.get("confusion_matrix") is not None and not multilabel:
        plots.confusion_matrix_plot(test["confusion_matrix"], classes, fig / "confusion_matrix")
    if multilabel or proba.shape[1] == 2:
        plots.roc_pr_plot(y, proba, fig / "roc_pr", classes=classes, threshold=test.get("threshold"))
    plots.calibration_plot(y, proba, fig / "calibration")
    say(f"wrote run directory {out}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write report.md, report.html and the copied figures to.")
@click.option("--title", default="featcache report", show_default=True, help="Report title.")
def report(run_dirs: tuple[str, ...], out_dir: str, title: str) -> None:
    """One report (Markdown + HTML) comparing run directories side by side: a table of key metrics
    with confidence intervals, then each run's configuration, metrics and figures.

    Example: featcache report runs/probe-cls runs/linear-cls runs/knn-cls --out reports/cls
    """
    from featcache.report import write_report

    try:
        paths = write_report(run_dirs, out_dir, title=title)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {paths['md']} and {paths['html']} ({len(run_dirs)} run(s))")
