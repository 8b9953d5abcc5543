"""`featcache extract`, `featcache import`, `featcache info`: making and inspecting feature files."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import click

from featcache.names import DTYPES, TOKEN_MODES
from featcache.store import FeatureStoreError
from featcache_cli.app import cli, device_option, given, json_option, print_table, quiet_option, write_json


def _nonempty(value: str, option: str, expected: str) -> str:
    """An option that names something (a model, an output file) must not be empty."""
    if value is not None and not str(value).strip():
        raise click.BadParameter(f"is empty; give {expected}", param_hint=option)
    return value


def _window(value: str | None) -> tuple[float, float] | None:
    if not value:
        return None
    try:
        centre, width = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected CENTRE,WIDTH such as 40,400; got {value!r}",
                                 param_hint="--window") from None
    if not (math.isfinite(centre) and math.isfinite(width)):
        raise click.BadParameter(f"expected finite numbers CENTRE,WIDTH such as 40,400; got {value!r}",
                                 param_hint="--window")
    if width < 1:  # DICOM's LINEAR window is at least 1 wide (PS3.3 C.11.2.1.2.1)
        raise click.BadParameter(f"the window width must be >= 1; got {width:g}", param_hint="--window")
    return centre, width


@cli.command()
@click.option("--model", "-m", required=True, callback=lambda ctx, param, v: _nonempty(v, "--model", "a hub id such as facebook/dino-vits16 or a local directory made with save_pretrained"), help="Hub id (facebook/dino-vits16) or a local directory made with save_pretrained.")
@click.option("--data", "-d", required=True, type=click.Path(exists=True), help="Image folder (root/class/x or root/split/class/x), a CSV manifest (path,label[,split][,group]), or a directory written by datasets' save_to_disk (needs featcache[hf]).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), callback=lambda ctx, param, v: _nonempty(v, "--out", "a file name such as feats.h5"), help="Feature file to write (HDF5). An existing file of the same config is resumed.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit); the resolved commit is recorded in the file.")
@click.option("--tokens", type=click.Choice(["none", "full"]), default="none", show_default=True, help="none: store cls and pooled only; full: also the whole last_hidden_state.")
@click.option("--num-tokens", type=click.IntRange(min=1), default=None, help="Token count to store, e.g. 257 (197 -> 257 as in the original study's Model3). Default: the backbone's own.")
@click.option("--token-mode", type=click.Choice(TOKEN_MODES), default="resize", show_default=True, help="How to reach --num-tokens: resize the token axis (the original study's recipe), resize the patch grid, or run at the native resolution.")
@click.option("--blocks", type=click.IntRange(min=1), default=None, metavar="N", help="Also store the CLS token and mean patch token of the last N blocks after the final norm (DINOv2's linear evaluation; feature kinds cls@N, cls@N+pooled). ViT, DeiT, DINOv2 only.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Override the processor's output size in pixels (square; for a transformer a multiple of its patch size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes. Default: one per core beyond the first (at most 8).")
@device_option
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True, help="Storage dtype of the features.")
@click.option("--amp", is_flag=True, help="bf16 autocast on GPU (ignored on CPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (worth it on GPU for big datasets).")
@click.option("--label-columns", default=None, help="Multi-label manifest: comma-separated 0/1 finding columns.")
@click.option("--image-column", default=None, help="Hugging Face datasets directory: the Image column to read, when it has several.")
@click.option("--label-column", default=None, help="Column holding the label: in a CSV manifest (default: label), or in a datasets directory (default: its ClassLabel column, else label/labels/target).")
@click.option("--window", default=None, help="DICOM window CENTRE,WIDTH overriding the files' own VOI LUT, e.g. 40,400.")
@click.option("--frame", type=click.IntRange(min=0), default=None, help="DICOM frame to use from multi-frame files (otherwise refused).")
@click.option("--fast-decode", is_flag=True, help="Decode JPEGs in libjpeg's draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) down to the processor's resize target before resizing: several times faster on large photos, slightly different pixels (recorded in the file's fingerprint; README '--fast-decode').")
@click.option("--merge", type=click.Choice(["copy", "virtual"]), default="copy", show_default=True, help="Under torchrun: join the per-rank shard files by copying, or as HDF5 virtual datasets pointing at the shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file made with another model or settings.")
@click.option("--retry-errors", is_flag=True, help="Try again the inputs that failed in an earlier run.")
@click.option("--update", is_flag=True, help="The data changed (images added, removed, relabelled, moved between splits): keep the stored features of images still there, compute the new ones, drop the removed ones. Same model and settings only; crash-safe.")
@click.option("--group-column", default=None, metavar="NAME", help="CSV manifest (or datasets) column holding each row's group (patient / study id), kept in the file so CIs, held-out rows and leakage checks respect patients [default: a column named 'group', if any].")
@json_option
@quiet_option
def extract(model, data, out, revision, tokens, num_tokens, token_mode, blocks, image_size, batch_size, workers,
            device, dtype, amp, compile_, label_columns, image_column, label_column, window, frame, fast_decode, merge,
            overwrite, retry_errors, update, group_column, json_path, quiet):
    """Run a frozen backbone over a dataset once and cache its features in an HDF5 file.

    Stores cls and pooled features for every image (and with --tokens full the whole token
    sequence). Killing the command loses nothing: run it again to finish the missing rows.

    On several GPUs or nodes, launch it with torchrun: each rank writes a shard, rank 0 joins them
    (torchrun --nproc-per-node 4 -m featcache extract ...).

    Example: featcache extract --model facebook/dino-vits16 --data images/ --out feats.h5
    """
    # torch and transformers load here, not at import, so `featcache --help` stays instant
    from featcache.backbones import BackboneError
    from featcache.extraction import (ExtractConfig, ExtractionWriteError, RunOptions, distributed_rank,
                                      run_extraction, saved_rows_line)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if update and overwrite:
        raise click.UsageError("--update keeps the stored features and --overwrite replaces the file: give one of them.")
    if given("token_mode") and token_mode != "resize" and num_tokens is None:   # ignored, and the file said nothing
        raise click.UsageError(f"--token-mode {token_mode} says how to reach --num-tokens, and none is given: add "
                               f"--num-tokens N (with --tokens full, unless --token-mode native), or drop --token-mode.")
    cores = os.cpu_count() or 1
    if workers is not None and workers > cores:
        click.echo(f"warning: --workers {workers} exceeds the {cores} CPU cores; using {cores}.", err=True)
        workers = cores
    cfg = ExtractConfig(model=model, revision=revision, tokens=tokens, num_tokens=num_tokens,
                        token_mode=token_mode, dtype=dtype, image_size=image_size,
                        window=_window(window), frame=frame, blocks=blocks, fast_decode=fast_decode)
    rank, world = distributed_rank()
    run = RunOptions(batch_size=batch_size, workers=workers, device=device, amp=amp, overwrite=overwrite,
                     retry_errors=retry_errors, progress=not quiet and rank == 0, compile=compile_, merge=merge,
                     update=update)
    source_options = {"label_columns": label_columns.split(",") if label_columns else None,
                      "image_column": image_column, "label_column": label_column, "group_column": group_column}
    try:
        summary = run_extraction(cfg, data, out, run, **source_options)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {saved_rows_line(out, update)} Run the same command again to "
                                   f"finish the rest.") from None
    except ExtractionWriteError as exc:
        raise click.ClickException(f"{exc} {saved_rows_line(out, update)} Free space (or fix the cause) and run the same "
                                   f"command again to resume.") from None
    except (BackboneError, FeatureStoreError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        # the OOM killer (or a signal) ended a decoding process: torch's 88-line traceback said nothing
        # of what was saved or what to do
        raise click.ClickException(f"a decoding worker died ({str(exc).splitlines()[0].rstrip('. ')}; out of "
                                   f"memory?). {saved_rows_line(out, update)} Run the same command again to resume, "
                                   f"with fewer --workers (or --workers 0) if memory is short.") from None
    state = "resumed" if summary.resumed else "created"
    if summary.updated:
        state = (f"updated ({summary.rows_reused} rows reused from the old file, {summary.rows_dropped} dropped "
                 f"with their images)")
    where = f" (rank {rank} of {world})" if world > 1 else ""
    speed = (f" ({summary.images_per_second:.1f} images/s)" if summary.rows_computed else
             " (nothing left to compute)")
    click.echo(f"{out}{where}: {state}; {summary.rows_computed} images extracted, {summary.rows_failed} skipped, "
               + ("" if summary.updated and not summary.rows_done_before else  # updated: 'reused' says it
                  f"{summary.rows_done_before} already done{' by the interrupted update' if summary.updated else ''}, ")
               + (f"{summary.rows_failed_before} unreadable before (not retried; --retry-errors), "
                  if summary.rows_failed_before else "")
               + (f"{summary.rows_changed} changed since extracted (computed again), " if summary.rows_changed else "")
               + f"{summary.rows_total} in all{speed}"
               + (f"; pixels: {summary.pixel_path}" if summary.pixel_path else "")
               + (f"; JPEG draft decoding to >= {summary.draft_px} px (--fast-decode)" if summary.draft_px else "")
               + ".", err=json_path == "-")
    for split, path, reason in summary.errors[:20]:  # path as in the file (and the warnings), split aside
        click.echo(f"  skipped {path} (split {split}): {reason}", err=json_path == "-")
    if len(summary.errors) > 20:
        click.echo(f"  ... and {len(summary.errors) - 20} more (see `featcache info {out}`)", err=json_path == "-")
    if world > 1 and json_path not in (None, "-"):
        # one summary per rank beside each other (ranks computing different rows must not race on one file)
        json_path = str(Path(json_path).with_name(f"{Path(json_path).stem}.rank{rank}{Path(json_path).suffix}"))
    write_json(json_path, {"out": str(out), "rank": rank, "world": world, "resumed": summary.resumed, "rows_total": summary.rows_total,
                           "rows_done_before": summary.rows_done_before, "rows_computed": summary.rows_computed,
                           "rows_failed": summary.rows_failed, "rows_failed_before": summary.rows_failed_before,
                           "seconds": summary.seconds,
                           "images_per_second": summary.images_per_second if summary.rows_computed else None,
                           "updated": summary.updated, "rows_reused": summary.rows_reused,
                           "rows_dropped": summary.rows_dropped, "rows_changed": summary.rows_changed,
                           "rows_unverified": summary.rows_unverified, "pixel_path": summary.pixel_path or None,
                           "draft_px": summary.draft_px,
                           "errors": [{"split": s, "path": p, "reason": r} for s, p, r in summary.errors]})


@cli.command("import")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), callback=lambda ctx, param, v: _nonempty(v, "--out", "a file name such as feats.h5"), help="Feature file to write.")
@click.option("--split", "splits", multiple=True, required=True, metavar="NAME=FILE", help="Features of one split: .npy (N, D), .npz or .pt (arrays cls/features, pooled, tokens, labels, paths, groups), or .h5/.hdf5 with a features dataset (thingsvision). Repeat per split.")
@click.option("--labels", "label_files", multiple=True, metavar="NAME=FILE", help="Labels of a split when its feature file has none: .npy, .pt, or a text file with one label per line.")
@click.option("--paths", "path_files", multiple=True, metavar="NAME=FILE", help="Text file with one image path per row of a split.")
@click.option("--classes", default=None, help="Class names, comma-separated or a text file with one per line. Default: sorted unique labels.")
@click.option("--model", default="imported", show_default=True, help="Name of the model the features came from (recorded and fingerprinted: give it, so that predict and compare can tell two backbones' imports apart).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Storage dtype.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@json_option
def import_(out, splits, label_files, path_files, classes, model, dtype, overwrite, json_path):
    """Bring features made elsewhere (.npy, .npz, .pt, thingsvision .h5) into a featcache file.

    Every later command (info, knn, probe, train, sweep) then works on them.

    Example: featcache import --out feats.h5 --split train=train.npz --split test=test.npz --model my-vit
    """
    from featcache.importing import import_features

    try:
        store = import_features(out, _pairs(splits, "--split"), labels=_pairs(label_files, "--labels"),
                                paths=_pairs(path_files, "--paths"), classes=classes, model=model,
                                dtype=dtype, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    rows = [{"split": s, "rows": store[s].n, "dim": store[s].cls.shape[1]} for s in store.splits]
    print_table(rows, title=f"{out}: imported {len(store.classes)} classes", err=json_path == "-")
    store.close()
    write_json(json_path, {"out": str(out), "classes": store.classes, "splits": rows})


def _pairs(values, option: str) -> dict[str, str]:
    pairs = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected NAME=FILE such as train=train.npz; got {v!r}", param_hint=option)
        name, file = v.split("=", 1)
        if not name.strip() or not file.strip():
            raise click.BadParameter(f"the {'split name before' if not name.strip() else 'file after'} '=' is empty; "
                                     f"expected NAME=FILE such as train=train.npz; got {v!r}", param_hint=option)
        if name.strip() in pairs:
            raise click.BadParameter(f"split {name.strip()!r} is given twice ({pairs[name.strip()]} and "
                                     f"{file.strip()}); give each split once", param_hint=option)
        pairs[name.strip()] = file.strip()
    return pairs


@cli.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.option("--errors", "show_errors", type=click.IntRange(min=0), default=10, show_default=True, help="How many skipped inputs (unreadable, or refused: decompression bombs, multi-frame DICOM without --frame) to list per split.")
def info(features, json_path, show_errors):
    """Describe a feature file: model, token layout, splits, rows done, class counts, errors.

    Example: featcache info feats.h5 --json info.json
    """
    from featcache.store import describe

    err = json_path == "-"  # --json - takes stdout: the human summary goes to stderr

    def echo(text: str = "", **kw) -> None:
        click.echo(text, err=True if kw.get("err") else err)

    def print_table_(rows, *args, **kw) -> None:
        print_table(rows, *args, err=err, **kw)

    try:
        d = describe(features)
    except (FeatureStoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    echo(f"file      {d['path']}  ({d['size_mb']:.1f} MB, encoding-version {d['encoding_version']})"
               + ("  [being written by another process]" if d["being_written"] else ""))
    echo(f"model     {d['model']}" + (f"  revision {d['revision']}" if d.get("revision") else ""))
    echo(f"family    {d.get('family') or 'n/a'}   dtype {d['dtype']}   fingerprint {d['fingerprint'][:16]}")
    echo(f"tokens    {d['token_layout']}")
    echo(f"classes   {len(d['classes'])}: {', '.join(d['classes'][:20])}{' ...' if len(d['classes']) > 20 else ''}"
         if d["classes"] else "classes   none (unlabelled images)")
    echo("")
    shown = ("split", "done", "total", "errors", "cls", "pooled", "tokens") + (
        ("blocks",) if any(s["blocks"] != "-" for s in d["splits"]) else ())
    print_table_([{k: s[k] for k in shown}
                 for s in d["splits"]])
    for s in d["splits"]:
        listed = s.get("class_counts_listed") or {}
        counts = ", ".join(f"{c}={n}" + (f" (of {listed[c]} listed)" if c in listed and listed[c] != n else "")
                           for c, n in s["class_counts"].items())
        echo(f"\n{s['split']} class counts (rows with features): {counts}"
             + (f" (unlabelled={s['unlabelled']})" if s["unlabelled"] else "")
             + (f"; {s['groups']} patients (groups)" if s.get("groups") is not None else ""))
        for warning in s["warnings"]:
            echo(f"  warning: {warning}")
        for path, reason in s["error_list"][:show_errors]:
            echo(f"  skipped: {path}: {reason}")   # unreadable, or refused (a bomb, a multi-frame DICOM)
    if d["leaked_groups"]:
        example = next(iter(d["leaked_groups"]))
        echo(f"\nwarning: leakage: {len(d['leaked_groups'])} group(s) appear in more than one split (e.g. "
                   f"{example!r} in {', '.join(d['leaked_groups'][example])}); re-split by group.", err=True)
    write_json(json_path, d)
