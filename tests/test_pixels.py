"""The split image processor: uint8 steps in the workers + the device-side table give exactly the
processor's own pixels; unknown processors fall back to running whole in the workers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache.sources import to_rgb
from featcache.extraction import ExtractConfig, RunOptions, prepare_backbone, run_extraction
from featcache.pixels import (PROCESSOR_PATH, UINT8_PATH, normalize_batch, normalize_tensor,
                              plan_from_processor, to_uint8)
from featcache_cli.main import cli


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise, so resampling filters see real structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin((k + 2) * np.pi * (xx + (k + 1) * yy)) for k in range(3)], -1)
    return ((img + 1) * 120 + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)


def test_images() -> dict[str, Image.Image]:
    """Odd sizes and modes, each made RGB by featcache's own to_rgb (as load_image does)."""
    rgba = np.concatenate([_photo(40, 29, 3), np.linspace(0, 255, 40 * 29).reshape(40, 29, 1).astype(np.uint8)], -1)
    raw = {"500x375": Image.fromarray(_photo(375, 500)),
           "375x500": Image.fromarray(_photo(500, 375, 1)),
           "37x53": Image.fromarray(_photo(53, 37, 2)),
           "7x300": Image.fromarray(_photo(300, 7, 5)),
           "gray": Image.fromarray(_photo(61, 90, 4)[..., 0], "L"),
           "rgba": Image.fromarray(rgba, "RGBA"),
           "palette": Image.fromarray(_photo(33, 47, 6)).convert("P")}
    return {k: to_rgb(v) for k, v in raw.items()}


test_images.__test__ = False  # a helper, not a test


def _processor_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def _split_pixels(plan, image: Image.Image) -> np.ndarray:
    return normalize_batch(torch.from_numpy(to_uint8(image, plan))[None], plan)[0].numpy()


def _assert_exact(processor) -> None:
    plan = plan_from_processor(processor)
    assert plan is not None, f"{type(processor).__name__} should have a plan"
    for name, image in test_images().items():
        want, got = _processor_pixels(processor, image), _split_pixels(plan, image)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.max(np.abs(got - want)) <= 1e-6, name   # in fact bit-identical (0.0)


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "dinov2_reg", "resnet"])
def test_tiny_model_processors_split_exactly(kind, tiny_models):
    from transformers import AutoImageProcessor

    _assert_exact(AutoImageProcessor.from_pretrained(tiny_models[kind]))


def _hub_like_processors() -> dict:
    """The processors' settings as the hub checkpoints ship them (ViT, DeiT, DINOv2, ResNet/ConvNeXT)."""
    from transformers import BitImageProcessor, ConvNextImageProcessor, DeiTImageProcessor, ViTImageProcessor

    return {
        "vit-base-patch16-224": ViTImageProcessor(),
        "deit-base-distilled": DeiTImageProcessor(size={"height": 256, "width": 256}, resample=3,
                                                  crop_size={"height": 224, "width": 224}),
        "dinov2-small": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                          do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225]),
        "resnet-50": ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875,
                                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        "convnext-384": ConvNextImageProcessor(size={"shortest_edge": 384}),
        "crop-larger-than-image": BitImageProcessor(size={"shortest_edge": 30}, do_center_crop=True,
                                                    crop_size={"height": 32, "width": 40}),
    }


@pytest.mark.parametrize("name", list(_hub_like_processors()))
def test_hub_like_processors_split_exactly(name):
    _assert_exact(_hub_like_processors()[name])


def test_plan_reads_the_processor_steps():
    procs = _hub_like_processors()
    dino = plan_from_processor(procs["dinov2-small"])
    assert dino.resize == ("shortest_edge", 256, 0) and dino.crops == ((224, 224),) and dino.resample == 3
    assert dino.resized_size(375, 500) == (256, 341)         # int(256 * 500 / 375)
    resnet = plan_from_processor(procs["resnet-50"])
    assert resnet.resize == ("shortest_edge", 256, 0) and resnet.crops == ((224, 224),)  # int(224 / 0.875)
    assert plan_from_processor(procs["convnext-384"]).resize == ("fixed", 384, 384)       # warp, no crop


def test_torch_lookup_equals_numpy_lookup():
    plan = plan_from_processor(_hub_like_processors()["dinov2-small"])
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    np.testing.assert_array_equal(normalize_tensor(pixels, plan).numpy(), normalize_batch(pixels, plan).numpy())


def test_normalize_batch_refuses_float_pixels():
    plan = plan_from_processor(_hub_like_processors()["vit-base-patch16-224"])
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(1, 3, 4, 4), plan)


def _odd_processor():
    """A processor class featcache does not know (same settings as the tiny ViT's)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    class OddImageProcessor(ViTImageProcessorPil):
        pass

    return OddImageProcessor(size={"height": 32, "width": 32})


def test_unknown_processor_falls_back():
    from transformers import ViTImageProcessor

    assert plan_from_processor(_odd_processor()) is None
    padded = ViTImageProcessor(size={"height": 32, "width": 32}, do_pad=True, pad_size={"height": 40, "width": 40})
    assert plan_from_processor(padded) is None


def test_settings_featcache_cannot_split_fall_back_with_their_reason():
    """size=None raised transformers' 'Could not convert size input to size dict: None' from the plan;
    a one-value mean/std list was refused as 'not 1 or 3 values'."""
    from transformers import ViTImageProcessor

    from featcache.pixels import _read_plan

    cases = {"do_resize is on but size is None": dict(size=None),
             "do_center_crop is on but crop_size is None": dict(do_center_crop=True, crop_size=None),
             "are not a scalar or 3 values": dict(image_mean=[0.4], image_std=[0.2])}
    for reason, settings in cases.items():
        proc = ViTImageProcessor(**{"size": {"height": 32, "width": 32}, **settings})
        for key, value in settings.items():  # set after construction: processors fill in defaults
            setattr(proc, key, value)
        plan, why = _read_plan(proc)
        assert plan is None and reason in why, why
        assert plan_from_processor(proc) is None


def test_processor_that_disagrees_with_its_plan_falls_back():
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    proc.rescale = lambda image, scale, **kw: (image.astype(np.float64) * scale * 0.5).astype(np.float32)
    assert plan_from_processor(proc) is None


def test_extraction_features_unchanged_vs_processor_path(tiny_models, digits_dir, tmp_path):
    cfg = ExtractConfig(model=str(tiny_models["dinov2"]), tokens="full", dtype="float32")
    prepared = prepare_backbone(cfg)
    runs = {}
    for mode, workers in (("auto", 1), ("processor", 0)):
        run = RunOptions(batch_size=8, workers=workers, progress=False, pixels=mode)
        runs[mode] = run_extraction(cfg, digits_dir, tmp_path / f"{mode}.h5", run, backbone=prepared)
    assert runs["auto"].pixel_path == UINT8_PATH
    assert runs["processor"].pixel_path == PROCESSOR_PATH
    a, b = fc.FeatureStore(tmp_path / "auto.h5"), fc.FeatureStore(tmp_path / "processor.h5")
    for split in ("train", "test"):
        for name in ("cls", "pooled", "tokens"):
            np.testing.assert_array_equal(getattr(a[split], name)[()], getattr(b[split], name)[()])


def test_unknown_processor_runs_whole_in_workers(tiny_vit, digits_dir, tmp_path):
    cfg = ExtractConfig(model=str(tiny_vit), dtype="float32")
    prepared = prepare_backbone(cfg)
    known = run_extraction(cfg, digits_dir, tmp_path / "known.h5", RunOptions(workers=0, progress=False),
                           backbone=prepared)
    prepared[0].processor = _odd_processor()
    odd = run_extraction(cfg, digits_dir, tmp_path / "odd.h5", RunOptions(workers=0, progress=False),
                         backbone=prepared)
    assert known.pixel_path == UINT8_PATH and odd.pixel_path == PROCESSOR_PATH
    assert odd.rows_computed == 60 and odd.rows_failed == 0
    np.testing.assert_array_equal(fc.FeatureStore(tmp_path / "odd.h5")["train"].cls[()],
                                  fc.FeatureStore(tmp_path / "known.h5")["train"].cls[()])


def test_cli_summary_names_the_pixel_path(tiny_vit, digits_dir, tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(digits_dir),
                                      "--out", str(tmp_path / "x.h5"), "--workers", "0", "--quiet",
                                      "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert f"pixels: {UINT8_PATH}" in result.output
    import json

    assert json.loads(Path(tmp_path / "s.json").read_text())["pixel_path"] == UINT8_PATH
