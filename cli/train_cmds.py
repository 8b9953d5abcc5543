"""`featcache train`, `featcache sweep`, `featcache predict`: heads on cached features."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from featcache.metrics import threshold_provenance, tuned_on_validation
from featcache.names import BALANCE, HEAD_NAMES, OPTIMIZERS, SELECTION_METRICS, SHOWN_METRICS
from featcache_cli.app import (CommaList, Console, FeatureKind, FiniteFloatRange, ThresholdRule, bootstrap_count,
                               checked_output_file, checked_run_dir, cli, device_option, echo_notes, given, json_option,
                               library_errors, per_label_rows, positive_option, quiet_option, unused_head_settings,
                               warnings_as_notes, write_json)

# the library (torch) is imported inside each command, so `featcache --help` stays instant


def recipe_options(fn: Callable) -> Callable:
    """Options shared by train and sweep (the TrainConfig fields that a sweep does not grid)."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Upper bound on epochs; early stopping usually ends sooner."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per step."),
        click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs without a better validation score before stopping."),
        click.option("--metric", type=click.Choice(SELECTION_METRICS), default="accuracy", show_default=True, help="Validation metric for early stopping and for ranking a sweep."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True, help="AdamW (decoupled decay) or Adam (L2)."),
        click.option("--balance", type=click.Choice(BALANCE), default="weights", show_default=True, help="Imbalanced data: class-weighted loss, class-balanced batches, or nothing."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for init, batch order and the held-out validation rows."),
        click.option("--train-split", default="train", show_default=True, help="Split to fit on."),
        click.option("--val-split", default=None, help="Validation split. Default: 'val' when the file has it, else --val-fraction of train held out (by group when the file has groups)."),
        click.option("--test-split", default=None, help="Test split. Default: 'test' when the file has it."),
        click.option("--val-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True, help="Share of train held out when there is no validation split."),
        click.option("--hidden", type=click.IntRange(min=1), default=512, show_default=True, help="mlp head: hidden width."),
        click.option("--dropout", type=FiniteFloatRange(0, 1, max_open=True), default=0.1, show_default=True, help="mlp / attn heads: dropout."),
        click.option("--standardize/--no-standardize", default=True, show_default=True, help="z-score each feature with the train split's mean and std (saved with the head; predict applies it)."),
        click.option("--max-memory-gb", type=FiniteFloatRange(min=0, min_open=True), default=4.0, show_default=True, help="Token caches bigger than this are streamed from disk by contiguous blocks."),
        device_option,
        click.option("--threshold", type=ThresholdRule(), default="0.5", show_default=True, help="Binary / multi-label decision threshold: a number, or youden / sensitivity:0.95 chosen on validation. Saved with the head; predict applies it."),
        positive_option,
        json_option,
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, callback=checked_run_dir, help="Run directory: config.json, metrics.json, history.json, head.safetensors + head.json, figures/."),
        quiet_option,
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)


def _recipe(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "batch_size", "patience", "metric", "optimizer", "balance", "seed", "train_split", "val_split",
            "test_split", "val_fraction", "hidden", "dropout", "standardize", "max_memory_gb", "device",
            "positive_class")
    return {k: kw[k] for k in keys}


def _metric_rows(val: dict | None, test: dict | None) -> list[dict[str, Any]]:
    rows = []
    ci = (test or {}).get("ci") or {}
    for name in SHOWN_METRICS:
        v, t = (val or {}).get(name), (test or {}).get(name)
        if v is not None or t is not None:
            row = {"metric": name, "val": v, "test": t}
            if ci:
                row["test 95% CI"] = f"[{ci[name][0]:.4f}, {ci[name][1]:.4f}]" if name in ci else ""
            rows.append(row)
    return rows


def _unused_options(t: Any) -> list[str]:
    """A note when --val-fraction was given but a validation split was used (it only applies without
    one), and for head settings this head kind does not read."""
    notes = unused_head_settings(t.config.head)
    if given("val_fraction") and str(t.val_source_).startswith("split"):
        notes.append(f"--val-fraction was not used: validation is {t.val_source_} (it holds rows out of train "
                     f"only when there is no validation split; --val-split names another).")
    return notes


def _decision_line(t: Any) -> str:
    """', positive class X at threshold T' for binary heads; '' otherwise."""
    if t.positive_ is None:
        return ""
    thr = t.threshold_ if t.threshold_ is not None else 0.5
    return f"; positive class {t.classes_[t.positive_]}, threshold {thr:.4g}" + (
        f" ({_where_chosen(t)})" if tuned_on_validation(t.threshold_rule_) else "")


def _per_label_table(console: Console, t: Any) -> None:
    """Multi-label heads: each finding's sensitivity / specificity at its threshold, AUROC (and CIs)."""
    split, block = ("test", t.test_metrics_) if t.test_metrics_ is not None else ("val", t.val_metrics_)
    rows = per_label_rows(block)
    if rows:
        console.table(rows, title=f"\nper label ({split})")


def _threshold_applies(features_file: str, threshold: str | None) -> None:
    """--threshold on a file of three or more classes, refused before any epoch (it ran them all)."""
    from featcache.metrics import check_threshold_task
    from featcache.store import FeatureStore

    if threshold is not None:
        with FeatureStore(features_file) as store:
            check_threshold_task(threshold, len(store.classes), store.multilabel)


def _probability(value: str | None) -> float | None:
    """predict's --threshold: a number in (0, 1); a rule is chosen at training time, not here."""
    if value is None:
        return None
    try:
        p = float(value)
    except ValueError:
        raise click.BadParameter(f"predict applies a number in (0, 1); rules such as youden or sensitivity:0.95 are "
                                 f"chosen on validation at training time (train / probe / sweep --threshold) and "
                                 f"saved with the head; got {value!r}", param_hint="--threshold") from None
    if not 0 < p < 1:  # also refuses nan
        raise click.BadParameter(f"must be a number in (0, 1); got {value!r}", param_hint="--threshold")
    return p


def _where_chosen(t: Any) -> str:
    """Where the head's threshold came from, in the words predict and the report use."""
    return threshold_provenance(t.threshold_rule_, t.threshold_, t.threshold_untuned_)


def bootstrap_option(fn: Callable) -> Callable:
    """--bootstrap of train and sweep (the head trained, or the sweep's best head)."""
    return click.option("--bootstrap", type=bootstrap_count(0), default=0, show_default=True,
                        help="95% CIs of the test metrics (0: none): this many bootstrap resamples (whole groups when "
                             "the file has them) for AUROC, balanced accuracy and macro F1; top-1, sensitivity and "
                             "specificity get Wilson score intervals.")(fn)


def _attach_intervals(t: Any, bootstrap: int) -> str:
    """Give the trained head's test metrics their intervals (when asked) and the bootstrap's
    warnings as notes; the words that say how the intervals were made, for a table's title."""
    if not bootstrap:
        return ""
    t.add_bootstrap_ci(bootstrap)
    boot = (t.test_metrics_ or {}).get("bootstrap") or {}
    t.notes_ += [n for n in boot.get("warnings", []) if n not in t.notes_]
    return f"; {boot['describe']}" if boot.get("describe") else ""


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", type=click.Choice(HEAD_NAMES), default="linear", show_default=True, help="linear / mlp on cls or pooled; mixer (token mixing: Linear over the token axis, Model2/Model3 of the original study) / attn (attention pooling) on full tokens.")
@click.option("--features", type=FeatureKind(), default=None, help="Input of linear / mlp heads: cls, pooled, cls+pooled, cls@N, cls@N+pooled [default: cls]. Token heads read the full tokens and refuse it.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Learning rate.")
@click.option("--wd", "weight_decay", type=FiniteFloatRange(min=0), default=1e-4, show_default=True, help="Weight decay.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Train with seeds --seed, --seed+1, ...; report median ± std of every metric (the first seed's head is saved).")
@bootstrap_option
@recipe_options
@library_errors
def train(features_file, head, features, lr, weight_decay, repeats, bootstrap, threshold, **kw):
    """Train one classifier head on cached features, keeping the best validation epoch.

    Example (a file extracted with --tokens full): featcache train feats.h5 --head mixer --lr 1e-3 --epochs 50 --out runs/mixer
    """
    from featcache.heads import uses_tokens
    from featcache.train import train_repeats

    console = Console(kw["quiet"], kw["json_path"])
    _threshold_applies(features_file, threshold)
    if features is not None and uses_tokens(head):
        raise click.BadParameter(f"head {head!r} reads the full token sequence; --features applies to linear and "
                                 f"mlp heads only.", param_hint="--features")
    options = dict(features=features or "cls", lr=lr, weight_decay=weight_decay, progress=not kw["quiet"],
                   **_recipe(kw))
    with warnings_as_notes(console):
        trainers, summary = train_repeats(features_file, repeats, head=head, threshold=threshold, **options)
    t = trainers[0]
    intervals = _attach_intervals(t, bootstrap)
    if repeats > 1:
        t.extra_metrics_["repeats"] = summary
    # every note printed is also in --json and metrics.json
    t.notes_ += [n for n in _unused_options(t) if n not in t.notes_]
    echo_notes(console, t.notes_, {t.split_names_["val"]: t.val_metrics_, t.split_names_["test"]: t.test_metrics_})
    if tuned_on_validation(t.threshold_rule_) and t.threshold_ is not None:
        value = t.threshold_ if isinstance(t.threshold_, float) else [round(v, 4) for v in t.threshold_]
        console.echo(f"threshold ({_where_chosen(t)}): {value}")
    console.echo(f"{head} head, {t.num_params_:,} parameters; best epoch {t.best_epoch_} "
                 f"(val {t.config.metric} {t.best_score_:.4f}); validation: {t.val_source_}"
                 + ("; tokens streamed from disk" if t.streamed_ else "") + _decision_line(t))
    rows = _metric_rows(t.val_metrics_, t.test_metrics_)
    console.table(rows, title=f"seed {t.config.seed}" + (f", positive class {t.classes_[t.positive_]}"
                                                         if t.positive_ is not None else "") + intervals)
    _per_label_table(console, t)
    if repeats > 1:
        split = "test" if "test" in summary else "val"
        console.table([{"metric": m, "median": s["median"], "std": s["std"], "runs": len(s["values"])}
                       for m, s in summary[split].items() if m in SHOWN_METRICS],
                      title=f"\n{split} over {repeats} seeds ({summary['seeds'][0]}..{summary['seeds'][-1]}): median ± std")
    write_json(kw["json_path"], t.run_metrics())
    if kw["out_dir"]:
        t.save(kw["out_dir"])
        console.note(f"wrote run directory {kw['out_dir']}")


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", type=click.Choice(HEAD_NAMES), default="linear", show_default=True, help="Head to sweep; every configuration trains together as one batched model.")
@click.option("--lr", "lrs", type=CommaList(float, minimum=1e-12), default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="Learning rates, comma-separated.")
@click.option("--wd", "wds", type=CommaList(float, minimum=0), default="0,1e-4,1e-2", show_default=True, help="Weight decays, comma-separated.")
@click.option("--features", "feature_list", type=CommaList(FeatureKind()), default="cls", show_default=True, help="Feature choices, comma-separated: cls, pooled, cls+pooled, cls@N, cls@N+pooled (e.g. DINOv2's grid: cls,cls+pooled,cls@4,cls@4+pooled).")
@bootstrap_option
@recipe_options
@library_errors
def sweep(features_file, head, lrs, wds, feature_list, bootstrap, threshold, **kw):
    """Train a grid of heads at once and rank them on validation; test metrics for the best only.

    Example: featcache sweep feats.h5 --lr 1e-4,3e-4,1e-3,3e-3 --wd 0,1e-4,1e-2 --features cls,pooled,cls+pooled
    """
    from featcache.sweeping import sweep as run_sweep

    console = Console(kw["quiet"], kw["json_path"])
    _threshold_applies(features_file, threshold)
    with warnings_as_notes(console):
        result = run_sweep(features_file, head=head, lrs=lrs, weight_decays=wds, features=feature_list,
                           progress=not kw["quiet"], threshold=threshold, **_recipe(kw))
    metric = f"val_{kw['metric']}"
    t = result.trainer
    intervals = _attach_intervals(t, bootstrap)  # of the best head's test metrics, chosen on validation
    result.notes += _unused_options(t)  # every note printed is also in --json and metrics.json
    echo_notes(console, result.notes + t.notes_, {t.split_names_["val"]: t.val_metrics_,
                                                 t.split_names_["test"]: t.test_metrics_})
    shown = [dict(r, best_epoch=f"diverged at {r['diverged_at']}") if r["diverged_at"] is not None else r
             for r in result.leaderboard]
    console.table(shown, ["rank", "features", "lr", "weight_decay", "best_epoch", metric],
                  title=f"{len(result.leaderboard)} {head} heads in {result.seconds:.1f}s "
                        f"({'one batched model' if result.fused else 'one after another'}), ranked by {metric}")
    if result.bytes_read is not None:
        console.echo(f"streamed {result.bytes_read / 2**20:.1f} MiB of tokens from disk: each epoch read once for "
                     f"all heads")
    console.echo(f"\nbest: features {result.best['features']}, lr {result.best['lr']:g}, wd "
                 f"{result.best['weight_decay']:g} (chosen on validation; test shown for it alone){_decision_line(t)}")
    console.table(_metric_rows(t.val_metrics_, t.test_metrics_), title=intervals.lstrip("; ") or None)
    _per_label_table(console, t)
    write_json(kw["json_path"], {**t.run_metrics(), "leaderboard": result.leaderboard, "best": result.best,
                                 "sweep_seconds": result.seconds, "fused": result.fused, "bytes_read": result.bytes_read,
                                 "notes": result.notes + t.notes_})
    if kw["out_dir"]:
        result.save(kw["out_dir"])
        console.note(f"wrote run directory {kw['out_dir']}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True))
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default=None, help="Split to predict [default: test, or the file's only split unless it is train].")
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False, allow_dash=True), callback=checked_output_file, help="CSV to write ('-' for standard output; the messages then go to standard error): image_path, probability (= P(positive class), binary) or prob_<class>, label, prediction.")
@click.option("--threshold", default=None, metavar="P", callback=lambda ctx, param, v: _probability(v), help="Binary / multi-label decision threshold, a number in (0, 1) [default: the one saved with the head, else 0.5]. Rules such as youden are chosen on validation at training time (train / probe / sweep --threshold).")
@click.option("--positive-class", default=None, metavar="NAME", help="Binary heads: the class whose probability is written and thresholded [default: the positive class saved with the head]; another class does not use the saved threshold.")
@quiet_option
@library_errors
def predict(run_dir, features_file, split, out_csv, threshold, positive_class, quiet):
    """Predictions of a trained head or probe on a feature file of the same backbone and preprocessing.

    Example: featcache predict runs/linear feats.h5 --split test --out preds.csv
    """
    from featcache.prediction import predict as run_predict, write_predictions_csv

    pred = run_predict(run_dir, features_file, split, threshold=threshold, positive_class=positive_class)
    write_predictions_csv(pred, out_csv)
    console = Console(quiet, out_csv)   # '-': the CSV took standard output, messages go to standard error
    console.note(pred.head)
    echo_notes(console, pred.notes)
    rule = ""
    if pred.positive is not None:
        rule = f" (positive class {pred.classes[pred.positive]}, threshold {pred.threshold:.4g}: {pred.threshold_source})"
    elif pred.multilabel:
        t = 0.5 if pred.threshold is None else pred.threshold
        values = (", ".join(f"{c} {v:.4g}" for c, v in zip(pred.classes, t)) if isinstance(t, (list, tuple))
                  else f"{t:.4g} for every label")
        rule = f" (thresholds {values}: {pred.threshold_source})"
    click.echo(f"wrote {len(pred.paths)} predictions to {'standard output' if out_csv == '-' else out_csv}{rule}",
               err=out_csv == "-")
