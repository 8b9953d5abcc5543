"""`featcache bench`: what a backbone costs before you extract with it."""
from __future__ import annotations

import click

from featcache_cli.app import cli, device_option, json_option, print_table, write_json


@cli.command()
@click.option("--model", "-m", "models", multiple=True, required=True, help="Hub id or local directory; repeat to compare several side by side.")
@device_option
@click.option("--runs", type=click.IntRange(min=5), default=50, show_default=True, help="Timed batch-1 forwards for the latency median and p90.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size of the throughput measurement.")
@click.option("--amp", is_flag=True, help="bf16 autocast on a GPU (ignored on CPU, as extract ignores it).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Override the processor's input size (px, square; a multiple of the patch size).")
@json_option
def bench(models, device, runs, batch_size, amp, image_size, json_path):
    """Parameters, GFLOPs per image, latency (batch 1) and throughput of backbones.

    Example: featcache bench -m facebook/dino-vits16 -m microsoft/resnet-50 --device cuda --amp
    """
    from featcache.backbones import BackboneError
    from featcache.bench import bench_model
    from featcache.devices import resolve_device

    try:
        dev = resolve_device(device)
        if amp and dev.type != "cuda":
            click.echo(f"warning: --amp is bf16 autocast on a GPU; on {dev} it is ignored, as extract ignores it, so "
                       f"these figures are of what extract runs here.", err=True)
        results = [bench_model(m, dev, runs=runs, batch_size=batch_size, amp=amp, image_size=image_size)
                   for m in models]
    except (BackboneError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [{"model": r.model, "input": f"{r.input_size[0]}x{r.input_size[1]}", "params_M": r.params_m,
             "GFLOPs": r.gflops, "lat_p50_ms": r.latency_ms_p50, "lat_p90_ms": r.latency_ms_p90,
             f"img/s@{batch_size}": r.images_per_s, "peak_MB": r.peak_mem_mb} for r in results]
    print_table(rows, title=f"device {dev}, amp {'on' if results[0].amp else 'off'}, peak memory = {results[0].peak_mem_kind}",
                err=json_path == "-")
    write_json(json_path, [r.as_dict() for r in results])
