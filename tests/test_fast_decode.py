"""--fast-decode: JPEG draft-mode decoding down to the processor's resize target (changes pixels)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache.sources import DecodeOptions, load_image


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like image: a smooth random colour field plus grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 40 + 2, width // 40 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray((smooth + rng.normal(0, 4, smooth.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                _photo(640, 480, hash((split, c, i)) % 2**32).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def test_draft_decodes_large_jpegs_at_a_reduced_scale_and_nothing_else(tmp_path):
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    _photo(640, 480, 0).save(big, quality=90)
    _photo(48, 40, 1).save(small, quality=90)
    _photo(640, 480, 0).save(tmp_path / "big.png")
    draft = DecodeOptions(draft=32)
    # 640 x 480 -> 1/8 (80 x 60): the largest power-of-two reduction keeping both sides >= 32
    assert load_image(big, draft).size == (80, 60)
    assert load_image(big, DecodeOptions(draft=100)).size == (160, 120)   # 1/4: 1/8 would give 60 < 100
    assert load_image(small, draft).size == (48, 40)                       # 48 // 32 = 1: no reduction
    np.testing.assert_array_equal(np.asarray(load_image(small, draft)), np.asarray(load_image(small)))
    assert load_image(tmp_path / "big.png", draft).size == (640, 480)      # PNG: draft is JPEG-only
    assert load_image(big).size == (640, 480)
    _photo(640, 480, 0).save(tmp_path / "camera.jpg", format="MPO", save_all=True,  # multi-picture JPEG
                             append_images=[_photo(64, 48, 2)])
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    assert load_image(tmp_path / "camera.jpg", draft).size == (80, 60)   # was decoded in full


def test_pixels_move_by_a_few_levels_after_the_processors_resize(tmp_path):
    """How much --fast-decode changes what the model sees, on photo-like JPEGs resized to 32 x 32
    (bilinear, as ViT's processor): a few grey levels on average, never a different picture."""
    diffs = []
    for seed in range(5):
        f = tmp_path / f"{seed}.jpg"
        _photo(640, 480, seed).save(f, quality=90)
        exact = np.asarray(load_image(f).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        fast = np.asarray(load_image(f, DecodeOptions(draft=32)).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        diffs.append(np.abs(exact - fast))
    diffs = np.stack(diffs)
    assert diffs.max() > 0            # the flag really changes pixels (so it must be in the fingerprint)
    assert diffs.mean() < 3.0         # measured 0.81 grey levels on this data (max 4)
    assert np.percentile(diffs, 99) < 12


def test_fast_decode_is_recorded_in_the_file_and_a_mixed_resume_is_refused(photo_dir, tiny_vit, tmp_path):
    from featcache_cli.main import cli

    fast, exact = tmp_path / "fast.h5", tmp_path / "exact.h5"
    run = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(photo_dir), "--out", str(fast),
                                   "--workers", "0", "--fast-decode", "--quiet", "--json", str(tmp_path / "s.json")])
    assert run.exit_code == 0, run.output
    assert "JPEG draft decoding to >= 32 px" in run.output
    assert json.loads((tmp_path / "s.json").read_text())["draft_px"] == 32
    run = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(photo_dir), "--out", str(exact),
                                   "--workers", "0", "--quiet"])
    assert run.exit_code == 0, run.output
    with fc.open(fast) as s_fast, fc.open(exact) as s_exact:
        cfg_fast, cfg_exact = s_fast.config, s_exact.config
        assert cfg_fast["fast_decode"] is True and cfg_fast["draft_px"] == 32
        assert "fast_decode" not in cfg_exact and "draft_px" not in cfg_exact
        assert s_fast.fingerprint != s_exact.fingerprint
        a, b = s_fast["train"].arrays("cls")[0], s_exact["train"].arrays("cls")[0]
    assert a.shape == b.shape and not np.array_equal(a, b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99           # the features move a little, not to another image's
    # the exact settings cannot resume into the fast file (nor the other way round)
    refused = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(photo_dir),
                                       "--out", str(fast), "--workers", "0", "--quiet"])
    assert refused.exit_code != 0 and "--overwrite" in refused.output
