"""Intermediate blocks (DINOv2's linear evaluation): extract --blocks N against a direct
transformers forward with output_hidden_states and the model's own final layernorm."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache_cli.main import cli


def reference_blocks(model_dir: Path, files: list[Path], n_blocks: int, n_prefix: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """CLS and mean patch token of the last N blocks after model.layernorm, oldest first: DINOv2's
    get_intermediate_layers(n, norm=True) written with plain transformers."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        out = model(**proc(images=images, return_tensors="pt"), output_hidden_states=True)
        normed = [model.layernorm(h) for h in out.hidden_states[-n_blocks:]]
    cls = np.stack([h[:, 0].numpy() for h in normed], axis=1)
    pooled = np.stack([h[:, n_prefix:].mean(1).numpy() for h in normed], axis=1)
    return cls, pooled


@pytest.mark.parametrize("kind,n_prefix", [("vit", 1), ("deit", 2), ("dinov2", 1), ("dinov2_reg", 5)])
def test_blocks_equal_a_direct_forward(kind, n_prefix, tiny_models, digits_dir, tmp_path):
    store = fc.extract(str(tiny_models[kind]), digits_dir, tmp_path / "b.h5", blocks=2, dtype="float32",
                       workers=0, batch_size=7, progress=False)
    s = store["test"]
    files = [digits_dir / p for p in s.paths]
    cls, pooled = reference_blocks(tiny_models[kind], files, 2, n_prefix)
    assert s._g["blocks_cls"].shape == (30, 2, 32)
    # float32 forward both sides, batched differently: agreement to float rounding
    np.testing.assert_allclose(s._g["blocks_cls"][()], cls, atol=1e-4)
    np.testing.assert_allclose(s._g["blocks_pooled"][()], pooled, atol=1e-4)
    np.testing.assert_array_equal(s._g["blocks_cls"][:, -1], s.cls[()])   # the last block's CLS is cls
    np.testing.assert_allclose(s._g["blocks_pooled"][:, -1], s.pooled[()], atol=1e-6)
    # feature kinds: cls@2 = both blocks' CLS concatenated, cls@2+pooled adds the last block's avgpool
    x = s.features("cls@2")
    np.testing.assert_array_equal(x, s._g["blocks_cls"][()].reshape(30, 64))
    np.testing.assert_array_equal(s.features("cls@1+pooled"), np.concatenate([s.cls[()], s.pooled[()]], 1))
    assert store.feature_dim("cls@2+pooled") == 96
    store.close()


def test_blocks_refused_where_there_are_none(tiny_models, digits_dir, tmp_path):
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_models["resnet"]), "-d", str(digits_dir),
                                   "-o", str(tmp_path / "r.h5"), "--blocks", "2", "--workers", "0", "-q"])
    assert res.exit_code == 1 and "--blocks" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_models["vit"]), "-d", str(digits_dir),
                                   "-o", str(tmp_path / "v.h5"), "--blocks", "9", "--workers", "0", "-q"])
    assert res.exit_code == 1 and "has 2 blocks" in res.output


def test_dinov2_grid_in_one_fused_sweep(tiny_models, digits_dir, tmp_path):
    """{cls, cls+pooled, cls@2, cls@2+pooled} x lr trains as one batched model; each config equals
    itself trained alone, and knn / probe / train accept the block kinds."""
    path = tmp_path / "grid.h5"
    fc.extract(str(tiny_models["vit"]), digits_dir, path, blocks=2, dtype="float32", workers=0,
               progress=False).close()
    kinds = ("cls", "cls+pooled", "cls@2", "cls@2+pooled")
    result = fc.sweep(path, lrs=(1e-3, 1e-2), weight_decays=(0.0,), features=kinds, epochs=6, patience=6,
                      val_fraction=0.3, test_split="test")
    assert result.fused and {r["features"] for r in result.leaderboard} == set(kinds)
    for row in result.leaderboard:
        alone = fc.train_head(path, lr=row["lr"], weight_decay=0.0, features=row["features"], epochs=6, patience=6,
                              val_fraction=0.3, test_split="test")
        assert alone.best_epoch_ == row["best_epoch"]
        assert abs(alone.best_score_ - row["val_accuracy"]) <= 1e-9
    for cmd in (["knn", "--features", "cls@2+pooled", "--train-split", "train", "--eval-split", "test", "--k", "5"],
                ["probe", "--features", "cls@2", "--Cs", "0.1,1"]):
        res = CliRunner().invoke(cli, [cmd[0], str(path), *cmd[1:], "-q"])
        assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(cli, ["knn", str(path), "--features", "cls@3", "--eval-split", "test", "-q"])
    assert bad.exit_code == 1 and "--blocks 3" in bad.output
    typo = CliRunner().invoke(cli, ["knn", str(path), "--features", "cls@x"])
    assert typo.exit_code == 2 and "--features" in typo.output


def test_native_token_mode_on_a_cnn_points_at_the_modes_that_work(tiny_models, digits_dir, tmp_path):
    res = CliRunner().invoke(cli, ["extract", "-m", str(tiny_models["resnet"]), "-d", str(digits_dir), "-o",
                                   str(tmp_path / "r.h5"), "--tokens", "full", "--num-tokens", "36", "--token-mode",
                                   "native", "--workers", "0", "-q"])
    assert res.exit_code == 1 and "is a CNN. Use --token-mode resize or grid." in res.output
    grid = CliRunner().invoke(cli, ["extract", "-m", str(tiny_models["resnet"]), "-d", str(digits_dir), "-o",
                                    str(tmp_path / "g.h5"), "--tokens", "full", "--num-tokens", "36", "--token-mode",
                                    "grid", "--workers", "0", "-q"])
    assert grid.exit_code == 0, grid.output
