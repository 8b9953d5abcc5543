"""Medical-imaging commands: grouped (patient-level) splits and attention maps."""
from __future__ import annotations

import click

from featcache_cli.app import (FiniteFloatRange, checked_output_file, cli, device_option, json_option, print_table,
                               quiet_option, write_json)


@cli.command("split")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), callback=checked_output_file,
              help="Where to write the manifest with its new `split` column (train/val/test); never a "
                   "feature file or a run directory's own file.")
@click.option("--group", default=None,
              help="Column of group ids (patient / study); no group is put in two splits. Default: the "
                   "column named 'group' when the manifest has one (as extract reads it), else every row "
                   "is its own group; 'none' splits row by row.")
@click.option("--label", default="label", show_default=True,
              help="Label column (class names or ids), or comma-separated 0/1 columns for "
                   "multi-label. When absent, all 0/1 columns are taken as multi-label.")
@click.option("--val", default=0.1, show_default=True, type=FiniteFloatRange(0, 1, max_open=True),
              help="Fraction of rows for validation (approximate: whole groups move).")
@click.option("--test", default=0.2, show_default=True, type=FiniteFloatRange(0, 1, max_open=True),
              help="Fraction of rows for test (approximate: whole groups move).")
@click.option("--stratify/--no-stratify", default=True, show_default=True,
              help="Keep class proportions in every split (else balance row counts only).")
@click.option("--multilabel", type=click.Choice(["rarest", "combination"]), default="rarest",
              show_default=True,
              help="Multi-label stratification key: each row's rarest positive label, or its "
                   "whole 0/1 combination.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Random seed; the same manifest and seed give the same split.")
@json_option
@quiet_option
def split_cmd(manifest, out, group, label, val, test, stratify, multilabel, seed, json_path, quiet):
    """Assign train/val/test splits to a CSV manifest, keeping every group in one split.

    Reads a manifest with columns path,label[,group...], assigns whole groups (patients) to
    splits so that the row fractions are about --val / --test and every split keeps the class
    proportions, and writes the manifest back with a `split` column. Prints rows, groups and
    class counts per split, and warns when a split lacks a class.

    Example: featcache split manifest.csv --group patient_id --val 0.1 --test 0.2 --stratify --seed 0 --out split_manifest.csv
    """
    from pathlib import Path

    from featcache.splitting import split_manifest

    if Path(out).resolve() == Path(manifest).resolve():
        raise click.BadParameter(f"is the input manifest {manifest}: writing the split there would replace it; give "
                                 f"another file", param_hint="--out")
    try:
        summary = split_manifest(manifest, out, group=group, label=label, val=val, test=test,
                                 stratify=stratify, seed=seed, multilabel=multilabel)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if summary.leaked_groups:  # cannot happen; a loud guard rather than a silent leak
        raise click.ClickException(f"internal error: groups in two splits: {summary.leaked_groups[:5]}")
    many = len(summary.classes) > 12
    table = [{"split": r["split"], "rows": r["rows"], "fraction": r["fraction"], "groups": r["groups"],
              **({} if many else r["counts"])} for r in summary.rows]
    err = json_path == "-"  # --json - takes stdout: the tables go to stderr
    if summary.group and group is None and not quiet:
        click.echo(f"grouping rows by the manifest's {summary.group!r} column (--group none splits row by row)",
                   err=True)
    print_table(table, title=f"{manifest} -> {out}" + (f" (groups: {summary.group})" if summary.group else ""),
                err=err)
    if many:
        per_class = [{"class": c, **{r["split"]: r["counts"][c] for r in summary.rows}}
                     for c in summary.classes]
        print_table(per_class, title="class counts per split", err=err)
    for split, lacking in summary.missing.items():
        shown = ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else "")
        click.echo(f"warning: split {split!r} has no rows of {len(lacking)} class(es): {shown}. "
                   f"Metrics on it will be undefined for those classes; try another --seed or "
                   f"a larger fraction.", err=True)
    if not quiet:
        click.echo(f"wrote {out}", err=err)
    write_json(json_path, {"manifest": manifest, "out": out, "group": summary.group, "seed": seed,
                           "val": val, "test": test, "stratify": stratify,
                           "splits": summary.rows, "missing": summary.missing})


@cli.command("attention")
@click.option("--model", required=True,
              help="ViT / DeiT / DINO / DINOv2 model: hub id or local directory.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Image folder, CSV manifest, or one image file.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory for the PNGs and attention.npz.")
@click.option("--layer", default=-1, show_default=True, type=int,
              help="Layer whose attention to draw (-1: the last).")
@click.option("--per-head", is_flag=True, help="Also draw every head's map (<image>_heads.png).")
@click.option("--max-images", default=32, show_default=True, type=click.IntRange(min=0),
              help="Draw at most this many images (the first readable ones in order); 0 for all.")
@click.option("--grid-cols", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per row in grid.png (and heads per row with --per-head).")
@click.option("--split", default=None, help="Only images of this split of the data source.")
@click.option("--image-size", default=None, type=click.IntRange(min=1),
              help="Resize inputs to this many pixels square (a multiple of the patch size).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@device_option
@quiet_option
def attention_cmd(model, data, out, layer, per_head, max_images, grid_cols, split, image_size,
                  batch_size, device, quiet):
    """Draw CLS-to-patch attention maps of a ViT-family model over images.

    Writes one PNG per image (input, heat-map overlay with the top-50%-attention-mass contour,
    the masked input), grid.png with all overlays, and attention.npz with the maps. Prefix
    tokens (CLS, distillation, registers) are excluded; each map sums to one over the patches.

    Example: featcache attention --model facebook/dino-vits16 --data images/ --out attn/ --per-head
    """
    from featcache.attention import attention_maps_for_images, list_images, load_attention_backbone
    from featcache.backbones import BackboneError
    from featcache.devices import resolve_device

    if grid_cols < 1 or batch_size < 1 or max_images < 0:
        raise click.ClickException("--grid-cols and --batch-size must be at least 1 and "
                                   "--max-images at least 0.")
    try:
        device = str(resolve_device(device))  # the one rule every command follows
        files = list_images(data, split=split)
        if not files:
            raise ValueError(f"no images found in {data}.")
        backbone = load_attention_backbone(model, image_size=image_size)
        result = attention_maps_for_images(backbone, files, out, layer=layer, per_head=per_head,
                                           grid_cols=grid_cols, batch_size=batch_size,
                                           device=device, max_images=max_images or None,
                                           progress=not quiet, log_skipped=False)
    except (ValueError, FileNotFoundError, BackboneError) as exc:
        raise click.ClickException(str(exc)) from exc
    for path, reason in result.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    if not result.paths:
        raise click.ClickException(f"none of the {len(files)} images could be read; see the "
                                   f"reasons above.")
    h, w = result.grid_shape
    click.echo(f"{len(result.paths)} image{'s' if len(result.paths) != 1 else ''}, patch grid {h}x{w}, layer {layer}: wrote "
               f"{len(result.figures)} PNG{'s' if len(result.figures) != 1 else ''}, {result.grid} and {result.arrays}"
               + (f"; skipped {len(result.skipped)}" if result.skipped else ""))
