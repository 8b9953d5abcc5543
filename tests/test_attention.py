"""CLS attention maps: grid shape, normalisation, agreement with the model's own attentions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featcache.attention import (cls_attention, display_image, load_attention_backbone,
                                 top_mass_mask)

# family -> number of prefix tokens before the patches, counted by hand (conftest's tiny models)
N_PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_reg": 1 + 4, "vit_wide": 1}


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Path]:
    return {k: tiny_models[k] for k in N_PREFIX}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four small real-looking pictures (smooth gradients with a bright square), plus a broken file."""
    root = tmp_path_factory.mktemp("attn_images")
    yy, xx = np.mgrid[0:40, 0:52]
    for i in range(4):
        img = np.stack([xx * 4, yy * 5, np.full_like(xx, 60 * i)], -1).astype(np.uint8)
        img[5 + 5 * i:15 + 5 * i, 10:20] = 255
        Image.fromarray(img).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    return root


def reference_maps(model_dir: Path, image: Image.Image, n_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent computation: the model's own attentions[-1][:, :, 0, n_prefix:], renormalised."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    px = proc(images=image, return_tensors="pt")["pixel_values"]
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type in ("vit", "deit") else {}
    with torch.no_grad():
        a = model(pixel_values=px, output_attentions=True, **kwargs).attentions[-1][0, :, 0, n_prefix:]
    heads = (a / a.sum(-1, keepdim=True)).numpy()
    mean = a.mean(0)
    return (mean / mean.sum()).numpy(), heads


@pytest.mark.parametrize("kind", list(N_PREFIX))
def test_maps_match_the_models_own_attention(models, images, kind):
    backbone = load_attention_backbone(str(models[kind]))
    assert backbone.n_prefix == N_PREFIX[kind]
    image = Image.open(images / "img1.png").convert("RGB")
    px = backbone.processor(images=image, return_tensors="pt")["pixel_values"]
    maps = cls_attention(backbone, px)
    grid = (8, 12) if kind == "vit_wide" else (8, 8)
    assert maps.grid == grid
    assert maps.mean.shape == (1, *grid) and maps.heads.shape == (1, 4, *grid)
    np.testing.assert_allclose(maps.mean.sum(axis=(1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.heads.sum(axis=(2, 3)), 1.0, atol=1e-5)
    ref_mean, ref_heads = reference_maps(models[kind], image, N_PREFIX[kind])
    np.testing.assert_allclose(maps.mean[0].ravel(), ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.heads[0].reshape(4, -1), ref_heads, rtol=1e-4, atol=1e-6)


def test_top_mass_mask_matches_dino_threshold():
    """DINO's visualize_attention: sort ascending, keep where cumulative > 1 - threshold."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.dirichlet(np.full(48, 0.3)).reshape(6, 8)
        val, idx = torch.sort(torch.tensor(m).flatten())
        keep_sorted = torch.cumsum(val / val.sum(), 0) > (1 - 0.5)
        dino = keep_sorted[torch.argsort(idx)].numpy().reshape(6, 8)
        ours = top_mass_mask(m)
        np.testing.assert_array_equal(ours, dino)
        assert m[ours].sum() >= 0.5 and m[ours].sum() - m[ours].min() < 0.5   # smallest such set


def test_layer_out_of_range_is_a_clear_error(models):
    backbone = load_attention_backbone(str(models["vit"]))
    with pytest.raises(ValueError, match="has 2 layers"):
        cls_attention(backbone, torch.zeros(1, 3, 32, 32), layer=5)
    first = cls_attention(backbone, torch.zeros(1, 3, 32, 32), layer=0)
    assert first.mean.shape == (1, 8, 8)


def test_display_image_undoes_the_processor(models, images):
    backbone = load_attention_backbone(str(models["vit"]))
    image = Image.open(images / "img0.png").convert("RGB")
    px = backbone.processor(images=image, return_tensors="pt")["pixel_values"][0]
    expected = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(display_image(px, backbone.processor), expected, atol=0.02)


def test_cli_writes_overlays_grid_and_maps(models, images, tmp_path):
    import featcache_cli.main as main

    out = tmp_path / "attn"
    res = CliRunner().invoke(main.cli, ["attention", "--model", str(models["dinov2_reg"]),
                                        "--data", str(images), "--out", str(out), "--per-head",
                                        "--grid-cols", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "skipped 1" in res.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"{i:04d}_img{i}.png" for i in range(4)]
                          + [f"{i:04d}_img{i}_heads.png" for i in range(4)] + ["grid.png"])
    for name in pngs:
        with Image.open(out / name) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    z = np.load(out / "attention.npz")
    assert [Path(p).name for p in z["paths"]] == [f"img{i}.png" for i in range(4)]
    assert z["mean"].shape == (4, 8, 8) and z["heads"].shape == (4, 4, 8, 8)
    np.testing.assert_allclose(z["mean"].sum(axis=(1, 2)), 1.0, atol=1e-5)
    ref_mean, _ = reference_maps(models["dinov2_reg"], Image.open(images / "img2.png").convert("RGB"),
                                 N_PREFIX["dinov2_reg"])
    np.testing.assert_allclose(z["mean"][2].ravel(), ref_mean, rtol=1e-4, atol=1e-6)
    for m, mask in zip(z["mean"], z["mask"]):
        assert m[mask].sum() >= 0.5


def test_cli_max_images_and_bad_inputs(models, images, tmp_path):
    import featcache_cli.main as main

    runner = CliRunner()
    res = runner.invoke(main.cli, ["attention", "--model", str(models["deit"]), "--data",
                                   str(images / "img3.png"), "--out", str(tmp_path / "one"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "one" / "0000_img3.png").exists() and (tmp_path / "one" / "grid.png").exists()
    res = runner.invoke(main.cli, ["attention", "--model", str(models["vit"]), "--data", str(images),
                                   "--out", str(tmp_path / "two"), "--max-images", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "two" / "attention.npz")["mean"].shape == (2, 8, 8)
    res = runner.invoke(main.cli, ["attention", "--model", str(models["vit"]), "--data", str(images),
                                   "--out", str(tmp_path / "bad"), "--layer", "7", "--quiet"])
    assert res.exit_code != 0 and "out of range" in res.output and "Traceback" not in res.output


def test_cnn_backbone_is_refused_with_a_reason(tmp_path, images, tiny_models):
    import featcache_cli.main as main

    res = CliRunner().invoke(main.cli, ["attention", "--model", str(tiny_models["resnet"]), "--data", str(images),
                                        "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0 and "has no attention" in res.output and "Traceback" not in res.output


def test_model_trained_at_a_non_square_size(tmp_path):
    """A ViT trained at 32 x 48 px runs at its own size (transformers' position interpolation
    assumes a square grid, so it is only asked for at another size)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=(32, 48), patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37)).save_pretrained(tmp_path / "m")
    ViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(tmp_path / "m")
    backbone = load_attention_backbone(str(tmp_path / "m"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    px = backbone.processor(images=image, return_tensors="pt")["pixel_values"]
    maps = cls_attention(backbone, px)
    assert maps.grid == (8, 12)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        a = model(pixel_values=px, output_attentions=True).attentions[-1][0, :, 0, 1:].mean(0)
    np.testing.assert_allclose(maps.mean[0].ravel(), (a / a.sum()).numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="trained at 32x48 px and cannot run at 40x40"):
        cls_attention(backbone, torch.zeros(1, 3, 40, 40))


def test_top_mass_mask_does_not_depend_on_cell_order():
    """Tied cells are kept or dropped together: a flat map keeps every cell (not its first rows),
    and permuting the cells permutes the mask."""
    assert top_mass_mask(np.full((4, 6), 1 / 24)).all()
    m = np.array([0.3, 0.2, 0.2, 0.2, 0.1])
    np.testing.assert_array_equal(top_mass_mask(m), [True, True, True, True, False])
    perm = np.random.default_rng(0).permutation(5)
    np.testing.assert_array_equal(top_mass_mask(m[perm]), top_mass_mask(m)[perm])


def test_image_size_must_be_a_multiple_of_the_patch_size(models):
    with pytest.raises(ValueError, match=r"--image-size 50 is not a multiple of .* patch size 4 \(the model would see 48 px\); use 48 or 52"):
        load_attention_backbone(str(models["vit"]), image_size=50)
    assert load_attention_backbone(str(models["vit"]), image_size=48).patch_size == 4


def test_a_second_run_into_the_same_directory_leaves_no_figure_of_the_first(models, images, tmp_path):
    """A 4-image --per-head run, then a 2-image run into the same --out: the first run's other
    PNGs stayed beside the new attention.npz, looking like its output. A --layer out of range is
    refused before any directory is made."""
    import featcache_cli.main as main

    out = tmp_path / "attn"
    run = lambda *extra: CliRunner().invoke(main.cli, ["attention", "--model", str(models["vit"]), "--data",  # noqa: E731
                                                       str(images), "--out", str(out), "--quiet", *extra])
    assert run("--per-head").exit_code == 0
    assert len(list(out.glob("*.png"))) == 9
    (out / "notes.txt").write_text("mine")  # a file of the user's own is kept
    second = run("--max-images", "2", "--layer", "-2")
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_img0.png", "0001_img1.png", "grid.png"]
    assert "wrote 2 PNGs" in second.output and (out / "notes.txt").read_text() == "mine"
    z = np.load(out / "attention.npz")
    assert int(z["layer"]) == -2 and int(z["layer_index"]) == 0
    assert sorted(z["figures"].tolist()) == ["0000_img0.png", "0001_img1.png", "grid.png"]
    refused = CliRunner().invoke(main.cli, ["attention", "--model", str(models["vit"]), "--data", str(images),
                                            "--out", str(tmp_path / "never"), "--layer", "2", "--quiet"])
    assert refused.exit_code != 0 and "has 2 layers" in refused.output and not (tmp_path / "never").exists()


def test_earlier_outputs_are_removed_by_name_only(models, images, tmp_path, caplog):
    """A directory holding a user's own 0001_ct.png beside an attention.npz of an older run (no
    'figures' key) kept it, not a pattern match; a truncated attention.npz (a killed run) leaves
    every file and is no crash."""
    import featcache_cli.main as main

    out = tmp_path / "attn"
    out.mkdir()
    np.savez(out / "attention.npz", paths=np.asarray([str(images / "img0.png")]), mean=np.zeros((1, 8, 8)))
    for name in ("0000_img0.png", "0000_img0_heads.png", "grid.png", "0001_ct.png", "0002_ct.png"):
        (out / name).write_bytes(b"old")
    run = lambda: CliRunner().invoke(main.cli, ["attention", "--model", str(models["vit"]), "--data",  # noqa: E731
                                                str(images / "img3.png"), "--out", str(out), "--quiet"])
    assert run().exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_img3.png", "0001_ct.png", "0002_ct.png", "grid.png"]
    assert (out / "0001_ct.png").read_bytes() == b"old" and (out / "grid.png").read_bytes() != b"old"
    (out / "attention.npz").write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level("WARNING", logger="featcache"):
        again = run()
    assert again.exit_code == 0, again.output
    assert "could not be read" in caplog.text and (out / "0001_ct.png").read_bytes() == b"old"
    assert np.load(out / "attention.npz")["mean"].shape == (1, 8, 8)


def test_an_interrupted_runs_figures_are_removed_by_the_next_run(models, images, tmp_path, monkeypatch):
    """Ctrl-C after some batches left their PNGs without an attention.npz, and the next run into
    the same --out left them beside its own figures."""
    import featcache.attention as attention
    import featcache_cli.main as main

    out = tmp_path / "attn"
    # the default batch of 8: interrupted inside the first batch, before any batch was complete
    args = ["attention", "--model", str(models["vit"]), "--data", str(images), "--out", str(out), "--quiet"]
    real, drawn = attention.save_image_figure, []

    def interrupt_after_two(*a, **k):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(attention, "save_image_figure", interrupt_after_two)
        assert CliRunner().invoke(main.cli, args).exit_code != 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_img0.png", "0001_img1.png"]
    assert not (out / "attention.npz").exists() and (out / attention.PARTIAL).exists()
    (out / "0007_mine.png").write_bytes(b"mine")   # not written by a run: kept
    second = CliRunner().invoke(main.cli, [*args[:4], str(images / "img3.png"), *args[5:]])
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_img3.png", "0007_mine.png", "grid.png"]
    assert not (out / attention.PARTIAL).exists()
