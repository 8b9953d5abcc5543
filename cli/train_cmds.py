"""`featcache train`, `featcache sweep`, `featcache predict`: heads on cached features."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from featcache_cli.app import cli, parse_csv, print_table, write_json


def recipe_options(fn: Callable) -> Callable:
    """Options shared by train and sweep (the TrainConfig fields that a sweep does not grid)."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Upper bound on epochs; early stopping usually ends sooner."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per step."),
        click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs without a better validation score before stopping."),
        click.option("--metric", type=click.Choice(["accuracy", "balanced_accuracy", "auroc", "loss"]), default="accuracy", show_default=True, help="Validation metric for early stopping and for ranking a sweep."),
        click.option("--balance", type=click.Choice(["weights", "sampler", "none"]), default="weights", show_default=True, help="Imbalanced data: class-weighted loss, class-balanced batches (as the seeds), or nothing."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, batch order and the held-out validation rows."),
        click.option("--train-split", default="train", show_default=True, help="Split to fit on."),
        click.option("--val-split", default=None, help="Validation split. Default: 'val' when the file has it, else --val-fraction of train held out (by group when the file has groups)."),
        click.option("--test-split", default=None, help="Test split. Default: 'test' when the file has it."),
        click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of train held out when there is no validation split."),
        click.option("--hidden", type=int, default=512, show_default=True, help="mlp head: hidden width."),
        click.option("--dropout", type=float, default=0.1, show_default=True, help="mlp / attn heads: dropout."),
        click.option("--standardize/--no-standardize", default=True, show_default=True, help="z-score each feature with the train split's mean and std (stored in the checkpoint; predict applies it)."),
        click.option("--max-memory-gb", type=float, default=4.0, show_default=True, help="Token caches bigger than this are streamed from disk by contiguous blocks."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the printed numbers as JSON."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run directory: config.json, metrics.json, history.json, best.pt, figures/."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)


def _recipe(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "batch_size", "patience", "metric", "balance", "seed", "train_split", "val_split",
            "test_split", "val_fraction", "hidden", "dropout", "standardize", "max_memory_gb", "device")
    return {k: kw[k] for k in keys}


def _metric_rows(val: dict | None, test: dict | None) -> list[dict[str, Any]]:
    names = ("top1", "top5", "balanced_accuracy", "macro_f1", "auroc", "auprc", "sensitivity", "specificity", "ece")
    rows = []
    for name in names:
        v, t = (val or {}).get(name), (test or {}).get(name)
        if v is not None or t is not None:
            rows.append({"metric": name, "val": v, "test": t})
    return rows


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", type=click.Choice(["linear", "mlp", "mixer", "attn"]), default="linear", show_default=True, help="linear / mlp on cls or pooled; mixer (the seeds' token mixer) / attn (attention pooling) on full tokens.")
@click.option("--features", type=click.Choice(["cls", "pooled", "cls+pooled"]), default="cls", show_default=True, help="Input of linear / mlp heads.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--wd", "weight_decay", type=float, default=1e-4, show_default=True, help="Weight decay.")
@click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw", show_default=True, help="AdamW (decoupled decay) or Adam (L2).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Train with seeds --seed, --seed+1, ...; report median ± std of every metric (the first seed's head is saved).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True, help="Bootstrap resamples for 95%% CIs of the test metrics (by group when the file has groups).")
@click.option("--threshold", default="0.5", show_default=True, help="Binary / multi-label decision threshold, chosen on validation: youden, sensitivity:0.95, or a number.")
@recipe_options
def train(features_file, head, features, lr, weight_decay, optimizer, repeats, bootstrap, threshold, **kw):
    """Train one classifier head on cached features, keeping the best validation epoch.

    Example: featcache train feats.h5 --head mixer --lr 1e-3 --epochs 50 --out runs/mixer
    """
    from featcache.train import train_repeats

    options = dict(features=features, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                   progress=not kw["quiet"], **_recipe(kw))
    try:
        trainers, summary = train_repeats(features_file, repeats, head=head, threshold=threshold, **options)
        t = trainers[0]
        chosen = t.threshold_
        if chosen is not None and threshold != "0.5":
            click.echo(f"threshold {threshold} chosen on validation: {chosen if isinstance(chosen, float) else [round(c, 4) for c in chosen]}")
        if bootstrap:
            t.add_bootstrap_ci(bootstrap)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if repeats > 1:
        t.extra_metrics_["repeats"] = summary
    if kw["out_dir"]:
        t.save(kw["out_dir"])
    click.echo(f"{head} head, {t.num_params_:,} parameters; best epoch {t.best_epoch_} "
               f"(val {t.config.metric} {t.best_score_:.4f}); validation: {t.val_source_}"
               + ("; tokens streamed from disk" if t.streamed_ else ""))
    rows = _metric_rows(t.val_metrics_, t.test_metrics_)
    ci = (t.test_metrics_ or {}).get("ci", {})
    for row in rows:
        if row["metric"] in ci:
            row["test 95% CI"] = f"[{ci[row['metric']][0]:.4f}, {ci[row['metric']][1]:.4f}]"
    print_table(rows, ["metric", "val", "test"] + (["test 95% CI"] if ci else []),
                title=f"seed {t.config.seed}" + (f", {bootstrap} bootstrap resamples" if bootstrap else ""))
    if repeats > 1:
        split = "test" if "test" in summary else "val"
        names = ("top1", "balanced_accuracy", "macro_f1", "auroc", "sensitivity", "specificity")
        print_table([{"metric": m, "median": s["median"], "std": s["std"], "runs": len(s["values"])}
                     for m, s in summary[split].items() if m in names],
                    title=f"\n{split} over {repeats} seeds ({summary['seeds'][0]}..{summary['seeds'][-1]}): median ± std")
    write_json(kw["json_path"], {"head": head, "num_params": t.num_params_, "best_epoch": t.best_epoch_,
                                 "val": t.val_metrics_, "test": t.test_metrics_,
                                 **({"repeats": summary} if repeats > 1 else {})})
    if kw["out_dir"]:
        click.echo(f"wrote run directory {kw['out_dir']}")


@cli.command()
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", type=click.Choice(["linear", "mlp", "mixer", "attn"]), default="linear", show_default=True, help="Head to sweep; every configuration trains together as one batched model.")
@click.option("--lr", "lrs", default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="Learning rates, comma-separated.")
@click.option("--wd", "wds", default="0,1e-4,1e-2", show_default=True, help="Weight decays, comma-separated.")
@click.option("--features", "feature_list", default="cls", show_default=True, help="Feature choices, comma-separated: cls, pooled, cls+pooled.")
@recipe_options
def sweep(features_file, head, lrs, wds, feature_list, **kw):
    """Train a grid of heads at once and rank them on validation; test metrics for the best only.

    Example: featcache sweep feats.h5 --lr 1e-4,3e-4,1e-3,3e-3 --wd 0,1e-4,1e-2 --features cls,pooled,cls+pooled
    """
    from featcache.train import sweep as run_sweep

    try:
        result = run_sweep(features_file, head=head, lrs=parse_csv(lrs, float), weight_decays=parse_csv(wds, float),
                           features=parse_csv(feature_list), progress=not kw["quiet"], out=kw["out_dir"], **_recipe(kw))
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    metric = f"val_{kw['metric']}"
    print_table(result.leaderboard, ["rank", "features", "lr", "weight_decay", "best_epoch", metric],
                title=f"{len(result.leaderboard)} {head} heads in {result.seconds:.1f}s "
                      f"({'one batched model' if result.fused else 'one after another'}), ranked by {metric}")
    if result.bytes_read is not None:
        click.echo(f"streamed {result.bytes_read / 2**20:.1f} MiB of tokens from disk: each epoch read once for all heads")
    t = result.trainer
    click.echo(f"\nbest: features {result.best['features']}, lr {result.best['lr']:g}, wd {result.best['weight_decay']:g} "
               f"(chosen on validation; test shown for it alone)")
    print_table(_metric_rows(t.val_metrics_, t.test_metrics_), ["metric", "val", "test"])
    write_json(kw["json_path"], {"leaderboard": result.leaderboard, "best": result.best, "val": t.val_metrics_,
                                 "test": t.test_metrics_, "seconds": result.seconds, "fused": result.fused,
                                 "bytes_read": result.bytes_read})
    if kw["out_dir"]:
        click.echo(f"wrote run directory {kw['out_dir']}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True))
@click.argument("features_file", metavar="FEATURES", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default="test", show_default=True, help="Split to predict.")
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="CSV to write: image_path, probability (or prob_<class>), label, prediction.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Binary tasks: decision threshold on P(second class).")
def predict(run_dir, features_file, split, out_csv, threshold):
    """Predictions of a trained head on a feature file of the same backbone and preprocessing.

    Example: featcache predict runs/linear feats.h5 --split test --out preds.csv
    """
    from featcache.train import predict as run_predict, write_predictions_csv

    try:
        pred = run_predict(run_dir, features_file, split)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    write_predictions_csv(pred, out_csv, threshold)
    click.echo(f"wrote {len(pred['paths'])} predictions to {out_csv}")
