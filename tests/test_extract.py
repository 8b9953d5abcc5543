"""Extraction end to end: stored features equal a direct transformers forward, token modes,
bad inputs, config mismatch, and the CLI commands extract / import / info."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache as fc
from featcache_cli.main import cli


def direct_forward(model_dir: Path, files: list[Path], **forward_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the model's own AutoImageProcessor + AutoModel, no featcache code."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        out = model(**proc(images=images, return_tensors="pt"), **forward_kwargs)
    return out.last_hidden_state.numpy(), (None if out.pooler_output is None else out.pooler_output.numpy())


def _files(store, split: str, root: Path) -> list[Path]:
    return [root / p for p in store[split].paths]


@pytest.mark.parametrize("kind,n_prefix", [("vit", 1), ("deit", 2), ("dinov2", 1), ("dinov2_reg", 5), ("resnet", 0)])
def test_features_equal_direct_forward(kind, n_prefix, tiny_models, digits_dir, tmp_path):
    out = tmp_path / f"{kind}.h5"
    store = fc.extract(str(tiny_models[kind]), digits_dir, out, tokens="full", dtype="float32",
                       workers=0, batch_size=7, progress=False)
    s = store["test"]
    assert s.done.all() and s.n == 30
    hidden, pooler = direct_forward(tiny_models[kind], _files(store, "test", digits_dir))
    if kind == "resnet":  # CNN: pooled output as cls, flattened feature map as tokens
        tokens = hidden.reshape(hidden.shape[0], hidden.shape[1], -1).transpose(0, 2, 1)
        np.testing.assert_allclose(s.cls[()], pooler.reshape(len(pooler), -1), atol=1e-4)
    else:
        tokens = hidden
        np.testing.assert_allclose(s.cls[()], hidden[:, 0], atol=1e-4)
        if n_prefix > 1:  # the tiny models' prefix tokens differ (conftest), so CLS is told from the others
            assert np.abs(hidden[:, 1:n_prefix] - hidden[:, :1]).max(axis=2).min() > 0.1
    np.testing.assert_allclose(s.tokens[()], tokens, atol=1e-4)
    np.testing.assert_allclose(s.pooled[()], tokens[:, n_prefix:].mean(1), atol=1e-4)
    assert s.tokens.attrs["n_prefix"] == n_prefix
    assert store.config["n_prefix"] == n_prefix
    assert s.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert store.classes == ["0", "1", "2"]


def test_float16_storage_within_rounding(tiny_vit, digits_dir, tmp_path):
    store = fc.extract(str(tiny_vit), digits_dir, tmp_path / "f16.h5", workers=0, progress=False)
    s = store["train"]
    assert s.cls.dtype == np.float16 and s.tokens is None
    hidden, _ = direct_forward(tiny_vit, _files(store, "train", digits_dir))
    ref = hidden[:, 0]
    np.testing.assert_allclose(s.cls[()].astype(np.float32), ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(s.cls[()], ref.astype(np.float16))


def seed_resize_reference(hidden: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize((D, size)) on hidden.permute(0, 2, 1), written out in numpy:
    linear along the token axis with half-pixel centres (align_corners=False), edges clamped."""
    b, t, d = hidden.shape
    src = (np.arange(size) + 0.5) * t / size - 0.5
    src = np.clip(src, 0, None)
    lo = np.minimum(np.floor(src).astype(int), t - 1)
    hi = np.minimum(lo + 1, t - 1)
    w = (src - lo)[None, :, None]
    return hidden[:, lo] * (1 - w) + hidden[:, hi] * w


def test_token_mode_resize_equals_seed_recipe(tiny_vit, digits_dir, tmp_path):
    store = fc.extract(str(tiny_vit), digits_dir, tmp_path / "r.h5", tokens="full", num_tokens=85,
                       token_mode="resize", dtype="float32", workers=0, progress=False)
    s = store["test"]
    assert s.tokens.shape == (30, 85, 32)
    hidden, _ = direct_forward(tiny_vit, _files(store, "test", digits_dir))
    assert hidden.shape[1] == 65
    np.testing.assert_allclose(s.tokens[()], seed_resize_reference(hidden, 85), atol=1e-4)
    np.testing.assert_allclose(s.tokens[:, 0], hidden[:, 0], atol=1e-4)  # CLS survives the resize
    assert s.tokens.attrs["mode"] == "resize" and s.tokens.attrs["source_num_tokens"] == 65


def test_token_mode_resize_197_to_257_like_the_seed():
    from featcache.tokens import TokenLayout, apply_token_mode, plan_tokens

    hidden = torch.randn(2, 197, 768)
    plan = plan_tokens(TokenLayout.of_backbone(1, (14, 14), 768), 257, "resize")
    out = apply_token_mode(hidden, plan)
    assert out.shape == (2, 257, 768)
    # float32 (torch) against a float64 reference: source coordinates round at ~1e-5 relative
    np.testing.assert_allclose(out.numpy(), seed_resize_reference(hidden.numpy(), 257), rtol=1e-4, atol=1e-4)


def test_token_mode_grid_keeps_prefix_and_resizes_patch_grid(tiny_models, digits_dir, tmp_path):
    store = fc.extract(str(tiny_models["deit"]), digits_dir, tmp_path / "g.h5", tokens="full",
                       num_tokens=2 + 100, token_mode="grid", dtype="float32", workers=0, progress=False)
    s = store["test"]
    assert s.tokens.shape == (30, 102, 32)
    assert list(s.tokens.attrs["grid"]) == [10, 10] and s.tokens.attrs["n_prefix"] == 2
    hidden, _ = direct_forward(tiny_models["deit"], _files(store, "test", digits_dir))
    np.testing.assert_allclose(s.tokens[:, :2], hidden[:, :2], atol=1e-4)
    patches = torch.from_numpy(hidden[:, 2:]).reshape(30, 8, 8, 32).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(patches, size=(10, 10), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(s.tokens[:, 2:], ref.permute(0, 2, 3, 1).reshape(30, 100, 32).numpy(), atol=1e-4)


def test_token_mode_grid_refuses_non_square_count(tiny_vit, digits_dir, tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(digits_dir),
                                      "--out", str(tmp_path / "x.h5"), "--tokens", "full",
                                      "--num-tokens", "90", "--token-mode", "grid", "--quiet"])
    assert result.exit_code != 0
    assert "square" in result.output and "--token-mode resize" in result.output


def test_token_mode_native_runs_at_the_matching_resolution(tiny_vit, digits_dir, tmp_path):
    store = fc.extract(str(tiny_vit), digits_dir, tmp_path / "n.h5", tokens="full", num_tokens=101,
                       token_mode="native", dtype="float32", workers=0, progress=False)
    s = store["test"]
    assert s.tokens.shape == (30, 101, 32)  # 40 px / 4 px patches = 10x10 + CLS
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(tiny_vit, size={"height": 40, "width": 40})
    model = AutoModel.from_pretrained(tiny_vit).eval()
    images = [Image.open(f).convert("RGB") for f in _files(store, "test", digits_dir)]
    with torch.no_grad():
        ref = model(**proc(images=images, return_tensors="pt"), interpolate_pos_encoding=True).last_hidden_state
    np.testing.assert_allclose(s.tokens[()], ref.numpy(), atol=1e-4)
    assert store.config["input_size"] == [40, 40]
    from featcache.store import describe

    # "source 65" beside 101 stored tokens read as if 65 tokens had been resampled to 101
    assert describe(tmp_path / "n.h5")["token_layout"] == ("101 tokens stored (mode native: the backbone run at "
                                                           "40x40 px, nothing resampled; 1 prefix, grid 10x10; 65 "
                                                           "tokens at its own size)")
    # without stored tokens, info read 'grid 10x10, 65 tokens' (the 32 px count beside the 40 px grid)
    fc.extract(str(tiny_vit), digits_dir, tmp_path / "c.h5", num_tokens=101, token_mode="native", workers=0,
               progress=False)
    assert describe(tmp_path / "c.h5")["token_layout"] == ("not stored (backbone run natively at 40x40 px: 1 prefix, "
                                                           "grid 10x10, 101 tokens; 65 tokens at its own size)")


def make_bad_inputs(root: Path, digits_dir: Path) -> dict[str, str]:
    """Copy a few good digits and add every kind of unreadable file; returns name -> expected reason word."""
    import shutil

    good = root / "train" / "0"
    good.mkdir(parents=True)
    for f in sorted((digits_dir / "train" / "0").glob("*.png"))[:4]:
        shutil.copy(f, good / f.name)
    bad = root / "train" / "1"
    bad.mkdir(parents=True)
    for f in sorted((digits_dir / "train" / "1").glob("*.png"))[:3]:
        shutil.copy(f, bad / f.name)
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image")
    jpeg = bad / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    return {"empty.png": "empty", "notes.jpg": "image", "truncated.jpg": "truncat"}


def test_bad_inputs_are_skipped_and_listed(tiny_vit, digits_dir, tmp_path):
    expected = make_bad_inputs(tmp_path / "data", digits_dir)
    out = tmp_path / "bad.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"),
                                 "--out", str(out), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "7 images extracted, 3 skipped" in result.output
    store = fc.open(out)
    s = store[store.splits[0]]
    errors = dict((Path(p).name, r) for p, r in s.errors)
    assert set(errors) == set(expected)
    for name, word in expected.items():
        assert word in errors[name].lower(), errors[name]
    assert s.done.sum() == 7
    store.close()
    # a rerun does not retry known failures; --retry-errors does, and they fail again
    again = runner.invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"),
                                "--out", str(out), "--workers", "0", "--quiet"])
    assert "0 images extracted, 0 skipped, 7 already done, 3 unreadable before" in again.output
    retry = runner.invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"),
                                "--out", str(out), "--workers", "0", "--quiet", "--retry-errors"])
    assert "0 images extracted, 3 skipped" in retry.output
    info = runner.invoke(cli, ["info", str(out), "--json", str(tmp_path / "info.json")])
    assert info.exit_code == 0, info.output
    assert "truncated.jpg" in info.output
    # listed as skipped (a bomb or a multi-frame DICOM is readable but refused), with its reason
    assert any(line.startswith("  skipped: ") and "truncated.jpg: " in line for line in info.output.splitlines())
    d = json.loads((tmp_path / "info.json").read_text())
    assert d["splits"][0]["errors"] == 3 and d["splits"][0]["done"] == 7


def test_other_config_is_refused_then_overwritten(tiny_models, digits_dir, tmp_path):
    out = tmp_path / "f.h5"
    runner = CliRunner()
    base = ["extract", "--data", str(digits_dir), "--out", str(out), "--workers", "0", "--quiet"]
    assert runner.invoke(cli, base + ["--model", str(tiny_models["vit"])]).exit_code == 0
    refused = runner.invoke(cli, base + ["--model", str(tiny_models["deit"])])
    assert refused.exit_code != 0
    assert str(tiny_models["vit"]) in refused.output and str(tiny_models["deit"]) in refused.output
    assert "--overwrite" in refused.output
    ok = runner.invoke(cli, base + ["--model", str(tiny_models["deit"]), "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert fc.open(out).config["family"] == "deit"


def test_missing_model_is_a_clear_error(digits_dir, tmp_path, monkeypatch):
    """A path that is not there is named as such (not the hub's repo-id rules); a hub id that
    cannot be fetched offline says what offline mode needs."""
    result = CliRunner().invoke(cli, ["extract", "--model", str(tmp_path / "nope"), "--data", str(digits_dir),
                                      "--out", str(tmp_path / "x.h5"), "--quiet"])
    assert result.exit_code == 1
    assert f"--model '{tmp_path / 'nope'}' does not exist; pass a directory made with save_pretrained" in result.output
    assert "Repo id" not in result.output and ".." not in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = CliRunner().invoke(cli, ["extract", "--model", "nobody-here/no-such-model", "--data", str(digits_dir),
                                   "--out", str(tmp_path / "x.h5"), "--quiet"])
    assert hub.exit_code == 1 and "could not load model 'nobody-here/no-such-model'" in hub.output
    assert "HF_HUB_OFFLINE is set" in hub.output and "set HF_HUB_OFFLINE=1" not in hub.output


def test_import_npz_and_pt_then_info(tmp_path, digits_arrays):
    x, y = digits_arrays["train"]
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    torch.save({"cls": torch.from_numpy(digits_arrays["test"][0])}, tmp_path / "test.pt")
    np.save(tmp_path / "test_labels.npy", digits_arrays["test"][1])
    out = tmp_path / "imported.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["import", "--out", str(out), "--split", f"train={tmp_path / 'train.npz'}",
                                 "--split", f"test={tmp_path / 'test.pt'}",
                                 "--labels", f"test={tmp_path / 'test_labels.npy'}", "--model", "elsewhere"])
    assert result.exit_code == 0, result.output
    store = fc.open(out)
    np.testing.assert_array_equal(store["train"].features("cls"), x)
    np.testing.assert_array_equal(store["test"].labels, digits_arrays["test"][1])
    assert store.classes == [str(i) for i in range(10)]
    info = runner.invoke(cli, ["info", str(out)])
    assert info.exit_code == 0 and "elsewhere" in info.output
    assert "n/a prefix" not in info.output  # an import knows no backbone token layout: just "not stored"
    from featcache.store import describe, write_arrays

    empty = tmp_path / "empty_split.h5"
    write_arrays(empty, {"train": {"cls": x, "labels": y}, "test": {"cls": x[:0], "labels": y[:0]}},
                 [str(i) for i in range(10)], {"model": "m"}).close()
    test_entry = next(e for e in describe(empty)["splits"] if e["split"] == "test")
    assert any("no usable rows" in w for w in test_entry["warnings"])
    bad = runner.invoke(cli, ["import", "--out", str(tmp_path / "b.h5"), "--split", f"train={tmp_path / 'nothing.npy'}"])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_public_api_names_survive_submodule_imports():
    """`fc.extract` stays the pinned function however the submodules were imported before."""
    import importlib

    for module in ("featcache.extraction", "featcache.store", "featcache.backbones", "featcache.tokens"):
        importlib.import_module(module)
    from featcache.extraction import extract

    assert fc.extract is extract and callable(fc.extract)
    assert fc.open.__module__ == "featcache.store"


def test_dicom_folder_extracts_and_skips_undecodable(tiny_vit, tmp_path):
    import shutil

    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    root = tmp_path / "dicom"
    for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm"), ("mr", "MR_small_jpeg_ls_lossless.dcm")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name, download=False), root / cls / name)
    result = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(root), "--out",
                                      str(tmp_path / "d.h5"), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    with fc.open(tmp_path / "d.h5") as store:
        s = store["all"]
        assert store.classes == ["ct", "mr"] and s.done.sum() >= 2
        for path, reason in s.errors:  # JPEG-LS needs a decoder this machine may not have
            assert path.endswith("jpeg_ls_lossless.dcm") and "JPEG-LS" in reason


def test_multilabel_manifest_end_to_end(tiny_vit, digits_dir, tmp_path):
    files = sorted((digits_dir / "train").rglob("*.png"))[:24]
    lines = ["path,effusion,nodule,split"]
    for i, f in enumerate(files):
        split = "test" if i % 4 == 0 else "val" if i % 4 == 1 else "train"
        lines.append(f"{f},{int(f.parent.name == '1')},{int(f.parent.name == '2')},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    store = fc.extract(str(tiny_vit), tmp_path / "m.csv", tmp_path / "ml.h5", workers=0, progress=False)
    assert store.multilabel and store.classes == ["effusion", "nodule"]
    assert store["train"].labels.shape == (12, 2) and store["train"].labels.dtype == np.uint8
    t = fc.train_head(tmp_path / "ml.h5", lr=1e-2, epochs=5)
    assert t.test_metrics_["multilabel"] and len(t.test_metrics_["per_label"]) == 2
    s = fc.sweep(tmp_path / "ml.h5", lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=5)
    alone = fc.train_head(tmp_path / "ml.h5", lr=s.best["lr"], weight_decay=0.0, epochs=5)
    assert alone.best_score_ == pytest.approx(s.best["val_accuracy"], abs=0.005)


def test_info_counts_classes_and_warns_about_missing_ones(tiny_vit, digits_dir, tmp_path):
    import shutil

    shutil.copytree(digits_dir, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "test" / "2")
    out = tmp_path / "f.h5"
    assert CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"),
                                    "--out", str(out), "--workers", "0", "--quiet"]).exit_code == 0
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert "test class counts (rows with features): 0=10, 1=10, 2=0" in result.output
    assert "warning: no rows of class 2" in result.output
    # an unreadable image is no row of its class: counts are of the rows evaluators use, listed beside
    bad = sorted((tmp_path / "data" / "train" / "1").glob("*.png"))[0]
    bad.write_bytes(b"not an image")
    out2 = tmp_path / "g.h5"
    assert CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "data"),
                                    "--out", str(out2), "--workers", "0", "--quiet"]).exit_code == 0
    again = CliRunner().invoke(cli, ["info", str(out2), "--json", str(tmp_path / "i.json")])
    assert "train class counts (rows with features): 0=10, 1=9 (of 10 listed), 2=10" in again.output
    import json

    train = next(s for s in json.loads((tmp_path / "i.json").read_text())["splits"] if s["split"] == "train")
    assert train["class_counts"]["1"] == 9 and train["class_counts_listed"]["1"] == 10 and train["groups"] is None


def test_amp_is_recorded_and_fingerprinted_where_it_runs(tiny_vit, digits_dir, tmp_path):
    """bf16 autocast moves features by ~1e-2 but sat among the run options that 'change no number': an
    --amp file looked like a float32 one, and a resume could mix both kinds of rows."""
    from featcache.extraction import ExtractConfig, file_config, prepare_backbone
    from featcache.store import config_differences, fingerprint_of

    cfg = ExtractConfig(model=str(tiny_vit), dtype="float32")
    backbone, plan = prepare_backbone(cfg)
    plain, amp = file_config(cfg, backbone, plan, digits_dir), file_config(cfg, backbone, plan, digits_dir, amp=True)
    assert "amp" not in plain and amp["amp"] == "bfloat16"  # absent when off: older files keep their fingerprint
    assert fingerprint_of(plain) != fingerprint_of(amp) and "amp" in config_differences(plain, amp)
    # on the CPU --amp does not run (a warning says so): the file is the float32 one
    args = ["extract", "--model", str(tiny_vit), "--data", str(digits_dir), "--workers", "0", "-q", "--dtype", "float32"]
    assert CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a.h5"), "--amp"]).exit_code == 0
    assert CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b.h5")]).exit_code == 0
    with fc.open(tmp_path / "a.h5") as a, fc.open(tmp_path / "b.h5") as b:
        assert "amp" not in a.config and a.fingerprint == b.fingerprint


def test_a_vit_whose_processor_makes_another_size_is_refused_in_featcache_words(tiny_vit, digits_dir, tmp_path):
    """A ViT trained at 32 px saved with a 32x48 processor gave transformers' bare 'Input image size
    doesn't match model'."""
    import shutil

    from transformers import AutoImageProcessor

    wide = tmp_path / "wide"
    shutil.copytree(tiny_vit, wide)
    proc = AutoImageProcessor.from_pretrained(wide)
    proc.size = {"height": 32, "width": 48}
    proc.save_pretrained(wide)
    args = ["extract", "--model", str(wide), "--data", str(digits_dir), "--workers", "0", "-q"]
    r = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 1 and "image processor makes 32x48 px inputs, but the model runs at a fixed input" in r.output
    assert "--image-size" in r.output and "--token-mode native" in r.output and "Traceback" not in r.output
    assert CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b.h5"), "--image-size", "32"]).exit_code == 0


def test_info_counts_patients(tmp_path):
    from featcache.store import describe, write_arrays

    x = np.zeros((6, 3), np.float32)
    write_arrays(tmp_path / "g.h5", {"train": {"cls": x, "labels": np.array([0, 0, 1, 1, 0, 1]),
                                               "groups": ["p1", "p1", "p2", "p3", "", ""]}}, ["a", "b"],
                 {"model": "m"}).close()
    # two rows without an id are two patients of their own
    assert describe(tmp_path / "g.h5")["splits"][0]["groups"] == 5
    out = CliRunner().invoke(cli, ["info", str(tmp_path / "g.h5")]).output
    assert "train class counts (rows with features): a=3, b=3; 5 patients (groups)" in out


def test_info_of_an_unlabelled_split_with_an_unreadable_image_warns_of_no_class(tmp_path):
    """An inference split (every row -1) with one unreadable image said 'no rows of class a, b'."""
    from featcache.store import describe, write_arrays

    write_arrays(tmp_path / "u.h5", {"train": {"cls": np.zeros((4, 3), np.float32), "labels": np.array([0, 1, 0, 1])},
                                     "new": {"cls": np.zeros((5, 3), np.float32), "labels": np.full(5, -1)}},
                 ["a", "b"], {"model": "m"}).close()
    import h5py

    with h5py.File(tmp_path / "u.h5", "r+") as f:  # one image of the new split could not be read
        done = f["new"]["done"][()]
        done[0] = 0
        f["new"]["done"][...] = done
        done = f["train"]["done"][()]
        done[[1, 3]] = 0  # both rows of class b
        f["train"]["done"][...] = done
    splits = {s["split"]: s for s in describe(tmp_path / "u.h5")["splits"]}
    assert not any("no rows of class" in w for w in splits["new"]["warnings"]), splits["new"]["warnings"]
    assert "no rows with features of class b (2 listed): unreadable or not extracted yet" in splits["train"]["warnings"]
