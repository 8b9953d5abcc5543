"""`featcache bench` on tiny models: parameter counts, FLOPs and timings make sense."""
from __future__ import annotations

import json

import pytest
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


def test_gflops_equal_a_count_by_hand(tiny_vit):
    """count_gflops on the tiny ViT (32 px, 4 px patches, D 32, 2 layers, 4 heads, MLP 37) against
    its matmuls counted by hand, 2 FLOPs per multiply-add: the attention products included."""
    from featcache.backbones import load_backbone
    from featcache.bench import count_gflops

    t, d, heads, mlp, layers = 65, 32, 4, 37, 2
    patch_embed = 2 * 64 * d * (3 * 4 * 4)
    per_layer = (2 * t * d * d * 3            # q, k, v projections
                 + 2 * heads * t * t * (d // heads) * 2   # QK^T and attention x V
                 + 2 * t * d * d              # output projection
                 + 2 * t * d * mlp * 2)       # MLP up and down
    pooler = 2 * d * d                        # ViTModel's pooler on the CLS token
    expected = patch_embed + layers * per_layer + pooler
    backbone = load_backbone(str(tiny_vit))
    before = backbone.model.config._attn_implementation
    assert count_gflops(backbone, torch.zeros(2, 3, 32, 32)) * 1e9 == expected
    assert backbone.model.config._attn_implementation == before   # the model's own attention is restored


def test_bench_unknown_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "-m", str(tmp_path / "nope"), "--runs", "5"])
    assert result.exit_code != 0 and "does not exist; pass a directory made with save_pretrained" in result.output


def test_bench_at_another_size_and_its_own_peak_memory(tiny_models):
    """A ViT benched at another size than its config's (position embeddings interpolated), GFLOPs
    growing with the tokens; a size that is no multiple of the patch refused; on Linux each
    model's peak memory is its own, not the largest of the models benched before it."""
    import torch

    from featcache.bench import bench_model

    dev = torch.device("cpu")
    at32 = bench_model(str(tiny_models["vit"]), dev, runs=5, batch_size=2, batches=1, warmup=1)
    at48 = bench_model(str(tiny_models["vit"]), dev, runs=5, batch_size=2, batches=1, warmup=1, image_size=48)
    assert at48.input_size == (48, 48) and at48.gflops > 2 * at32.gflops
    with pytest.raises(ValueError, match=r"--image-size 50 is not a multiple of .* patch size 4 \(the model would see 48 px\); use 48 or 52"):
        bench_model(str(tiny_models["vit"]), dev, runs=5, image_size=50)
    if at32.peak_mem_kind.startswith("peak RSS of the process while benching each model"):
        big = torch.zeros(64 * 2**20 // 4)  # 64 MiB held, then freed: the next model must not report it
        big += 1
        del big
        again = bench_model(str(tiny_models["vit"]), dev, runs=5, batch_size=2, batches=1, warmup=1)
        assert again.peak_mem_mb < at32.peak_mem_mb + 32


def test_amp_on_cpu_is_ignored_as_extract_ignores_it(tiny_models, tmp_path, monkeypatch):
    """bench --amp ran bf16 autocast on the CPU (200 ms against 0.8 ms): a mode extract never uses there."""
    seen = []
    real = torch.autocast

    def spy(device_type, *args, enabled=True, **kwargs):
        seen.append(enabled)
        return real(device_type, *args, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    out = tmp_path / "b.json"
    result = CliRunner().invoke(cli, ["bench", "-m", str(tiny_models["vit"]), "--runs", "5", "--batch-size", "2",
                                      "--device", "cpu", "--amp", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "--amp is bf16 autocast on a GPU; on cpu it is ignored" in result.output and "amp off" in result.output
    assert seen and not any(seen) and json.loads(out.read_text())[0]["amp"] is False
