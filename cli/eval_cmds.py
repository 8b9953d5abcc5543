"""`featcache knn`: representation quality of cached features by k-NN."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from featcache_cli.app import cli, parse_csv, print_table, write_json


def load_split(store: Any, split: str, features: str, purpose: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, rows) of a split's done, labelled rows, or a ClickException that says what is there."""
    from featcache.store import FeatureStoreError

    if split not in store.splits:
        raise click.ClickException(f"{store.path.name} has no split {split!r} for {purpose}; it has: "
                                   f"{', '.join(store.splits)}.")
    try:
        x, y, rows = store[split].arrays(features)
    except (FeatureStoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if len(y) == 0:
        raise click.ClickException(f"split {split!r} has no labelled, extracted rows to use for {purpose}.")
    return x, y, rows


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default="train", show_default=True, help="Split whose rows are the neighbours.")
@click.option("--eval-split", default="test", show_default=True, help="Split to classify.")
@click.option("--k", "ks", default="10,20,100,200", show_default=True, help="Neighbour counts, comma-separated; the first is the headline in run directories.")
@click.option("--temperature", default="0.07", show_default=True, help="Vote temperature(s) T, comma-separated: each neighbour votes exp(sim / T).")
@click.option("--weighting", type=click.Choice(["distance", "uniform"]), default="distance", show_default=True, help="distance: DINO's exp(sim / T) vote; uniform: plain majority.")
@click.option("--features", default="cls", show_default=True, type=click.Choice(["cls", "pooled", "cls+pooled"]), help="Which cached features to compare.")
@click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True, help="Search backend; auto uses faiss on CPU when installed, torch (GPU when there is one) otherwise.")
@click.option("--bootstrap", type=int, default=0, show_default=True, help="Bootstrap resamples for 95%% CIs of the headline k (grouped by patient when the file has groups).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the same numbers as JSON.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run directory for `featcache report` (config.json, metrics.json, figures/).")
@click.option("--quiet", "-q", is_flag=True, help="Print the table only.")
def knn(features_file, train_split, eval_split, ks, temperature, weighting, features, backend, bootstrap,
        json_path, out_dir, quiet):
    """k-NN accuracy of cached features (DINO's weighted vote), every k and T from one search.

    Example: featcache knn feats.h5 --train-split train --eval-split test --k 10,20,100,200
    """
    import featcache as fc
    from featcache.metrics import bootstrap_ci, classification_metrics

    k_list, temps = parse_csv(ks, int), parse_csv(temperature, float)
    if not k_list or min(k_list) < 1:
        raise click.BadParameter(f"expected positive integers; got {ks!r}", param_hint="--k")
    with fc.open(features_file) as store:
        x, y, _ = load_split(store, train_split, features, "neighbours")
        tx, ty, trows = load_split(store, eval_split, features, "evaluation")
        classes, groups = store.classes, store[eval_split].groups
        model, fingerprint = store.config.get("model"), store.fingerprint
    if y.ndim == 1 and len(set(y.tolist())) < len(classes) and not quiet:
        click.echo(f"note: the {train_split} split lacks classes "
                   f"{', '.join(c for i, c in enumerate(classes) if i not in set(y.tolist()))}.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fc.knn_eval(x, y, tx, ty, ks=k_list, temperature=tuple(temps), weighting=weighting,
                          num_classes=len(classes), backend=backend, return_proba=True)
    for w in caught:
        click.echo(f"warning: {w.message}")
    rows = []
    for t, per_k in res.items():
        for k, r in per_k.items():
            rows.append({"k": k, "temperature": t, **{m: v for m, v in r.items() if m not in ("proba", "temperature")}})
    columns = ["k", "temperature"] + [c for c in ("top1", "top5", "balanced_accuracy", "auroc", "micro_auroc", "auprc")
                                       if any(c in r for r in rows)] + ["k_used"]
    print_table(rows, columns, title=f"k-NN ({weighting}, {features}): {len(y)} {train_split} rows -> "
                                     f"{len(ty)} {eval_split} rows")
    head_k, head_t = k_list[0], temps[0]
    proba = res[head_t][head_k]["proba"]
    headline = classification_metrics(ty, proba, classes=classes)
    if bootstrap:
        names = [m for m in ("top1", "balanced_accuracy", "auroc", "macro_f1") if headline.get(m) is not None]
        ci = bootstrap_ci(ty, proba, metrics=names, n_boot=bootstrap, groups=groups, seed=0)
        headline["ci"] = {k: [lo, hi] for k, (lo, hi) in ci.items()}
        print_table([{"metric": m, "value": headline[m], "95% CI": f"[{lo:.4f}, {hi:.4f}]"} for m, (lo, hi) in ci.items()],
                    title=f"k = {head_k}, T = {head_t}: {bootstrap} bootstrap resamples"
                          + (" by group" if groups is not None else ""))
    summary = {"kind": "knn", "features_file": str(features_file), "train_split": train_split,
               "eval_split": eval_split, "features": features, "weighting": weighting, "ks": k_list,
               "temperatures": temps, "headline": {"k": head_k, "temperature": head_t}, "results": rows}
    write_json(json_path, summary)
    if out_dir:
        _write_run_dir(Path(out_dir), summary, headline, res, model, fingerprint, eval_split)


def _write_run_dir(out: Path, summary: dict, headline: dict, res: dict, model: str | None, fingerprint: str,
                   eval_split: str) -> None:
    from featcache import plots

    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in summary.items() if k != "results"}
    config.update({"model": model, "fingerprint": fingerprint})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    split_key = eval_split if eval_split in ("val", "test") else "test"
    write_json(out / "metrics.json", {"kind": "knn", split_key: headline, "results": summary["results"],
                                      "headline": summary["headline"]})
    curve = {t: {k: {m: v for m, v in r.items() if m != "proba"} for k, r in per_k.items()} for t, per_k in res.items()}
    metrics = ("top1", "top5") if "top1" in next(iter(next(iter(curve.values())).values())) else ("auroc",)
    plots.knn_curve_plot(curve if len(curve) > 1 else next(iter(curve.values())), out / "figures" / "knn_curve",
                         metrics=metrics)
