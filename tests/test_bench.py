"""`featcache bench` on tiny models: parameter counts, FLOPs and timings make sense."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from featcache_cli.main import cli


def test_bench_two_models_side_by_side(tiny_models, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "-m", str(tiny_models["vit"]), "-m", str(tiny_models["resnet"]),
                                      "--runs", "5", "--batch-size", "4", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "lat_p50_ms" in result.output and "resnet" in result.output
    rows = json.loads(out.read_text())
    from transformers import AutoModel

    for row, kind in zip(rows, ("vit", "resnet")):
        model = AutoModel.from_pretrained(tiny_models[kind])
        assert abs(row["params_m"] * 1e6 - sum(p.numel() for p in model.parameters())) < 1
        assert row["gflops"] > 0 and row["images_per_s"] > 0
        assert row["latency_ms_p90"] >= row["latency_ms_p50"] > 0


def test_flop_count_of_a_known_layer(tiny_vit):
    """The patch embedding alone: a 4x4 conv of 3->32 channels over an 8x8 grid = 2*MACs FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from featcache.backbones import load_backbone

    backbone = load_backbone(str(tiny_vit))
    conv = backbone.model.embeddings.patch_embeddings.projection
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        conv(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * (8 * 8) * 32 * (3 * 4 * 4)


def test_bench_unknown_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "-m", str(tmp_path / "nope"), "--runs", "5"])
    assert result.exit_code != 0 and "could not load model" in result.output
