"""Regression tests for edge cases that once failed silently or with a traceback.

Each test reproduces the original report (quoted in its docstring) through the command line, with
tiny models built here or features imported from arrays, and checks what the README promises:
a one-line error (exit 1, no traceback) or a correct result.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache as fc
from featcache.store import write_arrays
from featcache_cli.main import cli

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def run_cli(*args: str):
    """featcache ARGS in-process; the result keeps stdout and stderr together in .output."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 1 with a single 'Error: ...' line (click's way), no traceback, naming every needle."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def save_tiny_vit(folder: Path, seed: int, layernorm_scale: float | None = None) -> Path:
    """A tiny randomly initialised ViT (as conftest's) saved with save_pretrained into `folder`;
    another seed gives other weights with the same config and processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(image_size=32, patch_size=4, intermediate_size=37, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4))
    if layernorm_scale is not None:
        with torch.no_grad():
            model.layernorm.weight *= layernorm_scale
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def extract_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(model), "--data", str(data), "--out", str(out), "--workers", "0",
            "--batch-size", "16", "--quiet", *extra]


def done_rows(path: Path) -> int:
    with h5py.File(path, "r", locking=False) as f:
        return int(sum(f[k]["done"][()].sum() for k in f if isinstance(f[k], h5py.Group)))


def blobs(n_per_class: int, classes: int = 10, dim: int = 16, seed: int = 0, spread: float = 1.0):
    """Gaussian class clusters: continuous features (no tied similarities), labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def write_blob_file(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: int = 10) -> Path:
    write_arrays(path, {name: {"cls": x, "pooled": x, "labels": y} for name, (x, y) in splits.items()},
                 [f"c{i}" for i in range(classes)], {"model": "blobs", "tokens": "none", "dtype": "float32"})
    return path


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory) -> Path:
    """train / val / test of 10 classes, 8 rows per class each."""
    root = tmp_path_factory.mktemp("blobs")
    return write_blob_file(root / "blobs.h5", {s: blobs(8, seed=i) for i, s in enumerate(("train", "val", "test"))})


TRAIN_FAST = ("--epochs", "2", "--patience", "1", "--quiet")
PROBE_FAST = ("--Cs", "1", "--quiet")
KNN_FAST = ("--k", "5", "--quiet")


# ------------------------------------------------------------------------------------------------
# 1. a local model folder's weights are part of the fingerprint
# ------------------------------------------------------------------------------------------------

def test_new_weights_in_same_folder_are_not_resumed(tiny_vit, digits_dir, tmp_path):
    """'A local model folder's weights are not in the fingerprint. Kill an extraction, save new
    weights into the same folder, run again: it says "resumed" and the file mixes two models.'"""
    folder = tmp_path / "model"
    shutil.copytree(tiny_vit, folder)
    out = tmp_path / "out.h5"
    first = run_cli(*extract_args(folder, digits_dir, out, "--dtype", "float32"))
    assert first.exit_code == 0, first.output
    with fc.open(out) as store:
        reference = {s: store[s].cls[()] for s in ("train", "test")}
    # what a SIGKILL half-way leaves behind (tests/test_resume.py kills a real run): rows not done
    with h5py.File(out, "r+") as f:
        f["test"]["done"][:] = False
    assert done_rows(out) == 30

    # the same weights copied to another folder are the same model: resume works from the copy
    copy = tmp_path / "elsewhere" / "model-copy"
    shutil.copytree(folder, copy)
    resumed = run_cli(*extract_args(copy, digits_dir, out, "--dtype", "float32"))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output and "30 already done" in resumed.output
    with fc.open(out) as store:
        for s in ("train", "test"):
            assert store[s].done.all()
            np.testing.assert_allclose(store[s].cls[()], reference[s], atol=1e-5)  # float32 CPU re-run

    # a head trained on this file
    run_dir = tmp_path / "run"
    trained = run_cli("train", out, "--out", run_dir, *TRAIN_FAST)
    assert trained.exit_code == 0, trained.output

    # new weights saved into the same folder: same path, same config, another model
    with h5py.File(out, "r+") as f:
        f["test"]["done"][:] = False
    save_tiny_vit(folder, seed=1)
    refused = run_cli(*extract_args(folder, digits_dir, out, "--dtype", "float32"))
    assert_one_line_error(refused, "--overwrite", "another --out")
    assert "resumed" not in refused.output
    assert done_rows(out) == 30  # nothing was written into the old file

    # features of the new weights: a head trained on the old ones refuses them
    new = tmp_path / "new.h5"
    assert run_cli(*extract_args(folder, digits_dir, new, "--dtype", "float32")).exit_code == 0
    with fc.open(new) as a, fc.open(out) as b:
        assert a.fingerprint != b.fingerprint and a.config["weights"] != b.config["weights"]
        assert not np.allclose(a["train"].cls[()], reference["train"], atol=1e-3)
    predicted = run_cli("predict", run_dir, new, "--out", tmp_path / "p.csv", "--quiet")
    assert_one_line_error(predicted, "fingerprint")
    assert not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------------------------------------
# 2. float16 overflow is refused, never stored as inf
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def huge_vit(tmp_path_factory) -> Path:
    """A tiny ViT whose final layernorm weight is scaled by 1e6: its features exceed float16's 65504."""
    return save_tiny_vit(tmp_path_factory.mktemp("huge") / "vit", seed=0, layernorm_scale=1e6)


def test_float16_overflow_refused_in_extract(huge_vit, digits_dir, tmp_path):
    """'float16 overflow is stored as inf and the rows are marked done (extraction): a model whose
    features exceed 65504.'"""
    out = tmp_path / "f16.h5"
    result = run_cli(*extract_args(huge_vit, digits_dir, out, "--dtype", "float16"))
    line = assert_one_line_error(result, "65504", "--dtype float32")
    assert "RuntimeWarning" not in result.output  # numpy's cast warning is not part of the message
    largest = float(re.search(r"reach ([0-9.e+]+)", line).group(1))
    assert largest > 65504
    if out.exists():  # the file is laid out at creation; no row of it may be marked done
        assert done_rows(out) == 0
    ok = run_cli(*extract_args(huge_vit, digits_dir, tmp_path / "f32.h5", "--dtype", "float32"))
    assert ok.exit_code == 0, ok.output
    with fc.open(tmp_path / "f32.h5") as store:
        cls = np.concatenate([store[s].cls[()] for s in store.splits])
        assert all(store[s].done.all() for s in store.splits) and np.isfinite(cls).all()
        # the value the float16 error named (the largest of the refused batch) is stored in float32;
        # 1e-3 relative: the message prints 6 significant digits
        assert np.isclose(np.abs(cls), largest, rtol=1e-3).any()


def test_float16_overflow_refused_in_import(tmp_path):
    """'float16 overflow is stored as inf and the rows are marked done (import).'"""
    x, y = blobs(3, classes=2, dim=4)
    x[1, 2] = 1e6
    np.savez(tmp_path / "train.npz", cls=x, labels=y)
    out = tmp_path / "imp16.h5"
    result = run_cli("import", "--out", out, "--split", f"train={tmp_path / 'train.npz'}", "--dtype", "float16")
    assert_one_line_error(result, "1e+06", "--dtype float32")
    assert "RuntimeWarning" not in result.output
    # an import is all or nothing: no half-made file is left to block the advised re-run
    assert not out.exists()
    ok = run_cli("import", "--out", out, "--split", f"train={tmp_path / 'train.npz'}", "--dtype", "float32")
    assert ok.exit_code == 0, ok.output
    with fc.open(out) as store:
        assert store["train"].cls[1, 2] == 1e6 and store["train"].done.all()


# ------------------------------------------------------------------------------------------------
# 3. non-finite features never reach k-NN, probes or heads
# ------------------------------------------------------------------------------------------------

def test_import_refuses_nan(tmp_path):
    x, y = blobs(3, classes=2, dim=4)
    x[0, 0] = np.nan
    np.savez(tmp_path / "train.npz", cls=x, labels=y)
    result = run_cli("import", "--out", tmp_path / "nan.h5", "--split", f"train={tmp_path / 'train.npz'}")
    assert_one_line_error(result, "NaN")


def test_nan_features_refused_by_every_evaluator(blob_file, tmp_path):
    """'Non-finite features reach knn and train unchecked.' Import refuses NaN, so the NaN is
    written into a valid file with h5py (as a float16 overflow of an old featcache would leave)."""
    path = tmp_path / "nan.h5"
    shutil.copy(blob_file, path)
    with h5py.File(path, "r+") as f:
        f["train"]["cls"][3, :2] = np.nan
    lines = [assert_one_line_error(run_cli("knn", path, *KNN_FAST), "NaN", "split 'train'"),
             assert_one_line_error(run_cli("probe", path, *PROBE_FAST), "NaN", "split 'train'"),
             assert_one_line_error(run_cli("train", path, *TRAIN_FAST), "NaN", "split 'train'")]
    # every evaluator refuses with the message of the one check (store.check_finite)
    assert all("2 non-finite values" in ln and "in 1 rows (first: [3])" in ln for ln in lines), lines

    x, y = blobs(5, classes=3, dim=4)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fc.knn_eval(bad, y, x, y, ks=[3])
    with pytest.raises(ValueError, match="NaN"):
        fc.knn_eval(x, y, np.where(bad == bad, bad, np.inf), y, ks=[3])


# ------------------------------------------------------------------------------------------------
# 4. k-NN temperature: small T is exact, T <= 0 is refused
# ------------------------------------------------------------------------------------------------

def reference_knn(train_x, train_y, test_x, k: int, t: float, num_classes: int) -> np.ndarray:
    """DINO's weighted vote in plain float64 numpy with log-sum-exp (no featcache code)."""
    a = train_x.astype(np.float64)
    b = test_x.astype(np.float64)
    sims = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    logits = np.take_along_axis(sims, idx, axis=1) / t
    proba = np.zeros((len(b), num_classes))
    for c in range(num_classes):
        masked = np.where(train_y[idx] == c, logits, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        # log sum_j exp(l_j) - log sum_all exp(l_j), both shifted by the row's max logit
        with np.errstate(divide="ignore"):  # log(0) = -inf for a class no neighbour has: proba 0
            proba[:, c] = np.exp(np.log(np.exp(masked - top).sum(1)) - np.log(np.exp(logits - top).sum(1)))
    return proba


def test_knn_small_temperature_matches_float64_reference():
    """'k-NN temperature <= ~0.011 overflows float32: top-5 0.22 < top-1 0.27 at T = 0.001.'
    exp(1 / 0.001) is inf even in float64; the vote must shift by the row's largest similarity."""
    train_x, train_y = blobs(20, classes=10, dim=16, seed=1, spread=2.0)
    test_x, test_y = blobs(10, classes=10, dim=16, seed=2, spread=2.0)
    temps = (0.001, 0.005, 0.011, 0.07)
    res = fc.knn_eval(train_x, train_y, test_x, test_y, ks=[10], temperature=temps, num_classes=10,
                      backend="torch", return_proba=True)
    for t in temps:
        row = res[t][10]
        ref = reference_knn(train_x, train_y, test_x, 10, t, 10)
        assert np.isfinite(row["proba"]).all()
        # float32 similarities (torch) vs float64 (reference): a cosine differs by ~1e-7, so a weight
        # exp(sim / T) by a factor exp(1e-7 / 0.001) ~ 1 + 1e-4 at the smallest T; 1e-3 bounds it
        np.testing.assert_allclose(row["proba"], ref, atol=1e-3)
        assert row["top1"] == pytest.approx(float(np.mean(ref.argmax(1) == test_y)))
        # top-5 ranks only the classes some neighbour voted for (DINO's top-min(5, k) when k < 5): a
        # class without a vote (reference probability 0) is never a hit; equal scores in scikit-learn's
        # order (the higher class index first)
        hits = [y in sorted((c for c in range(10) if p[c] > 0), key=lambda c: (-p[c], -c))[:5]
                for p, y in zip(ref, test_y)]
        assert row["top5"] == pytest.approx(np.mean(hits))
        assert row["top5"] >= row["top1"]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_knn_nonpositive_temperature_refused(blob_file, bad):
    """'T = 0 and negative T are accepted.'"""
    x, y = blobs(5, classes=3, dim=4)
    with pytest.raises(ValueError, match="temperature"):
        fc.knn_eval(x, y, x, y, ks=[3], temperature=float(bad))
    with pytest.raises(ValueError, match="temperature"):
        fc.knn_eval(x, y, x, y, ks=[3], temperature=[0.07, float(bad)])
    result = run_cli("knn", blob_file, *KNN_FAST, f"--temperature={bad}")
    assert result.exit_code == 2, result.output  # click's usage error
    assert "--temperature" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------
# 5. empty or single-class splits in train
# ------------------------------------------------------------------------------------------------

def test_empty_test_or_val_split_is_one_line_error(tmp_path):
    """'Empty or one-class splits in train: an empty val/test split crashes (load_state_dict(None)).'"""
    tr, va, te = blobs(6, 3, 4, seed=0), blobs(3, 3, 4, seed=1), blobs(3, 3, 4, seed=2)
    unlabelled = (te[0], np.full_like(te[1], -1))
    no_rows = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))

    empty_test = write_blob_file(tmp_path / "unlabelled_test.h5", {"train": tr, "val": va, "test": unlabelled}, 3)
    assert_one_line_error(run_cli("train", empty_test, *TRAIN_FAST), "split 'test'", "no labelled")
    zero_test = write_blob_file(tmp_path / "zero_test.h5", {"train": tr, "val": va, "test": no_rows}, 3)
    assert_one_line_error(run_cli("train", zero_test, *TRAIN_FAST), "split 'test'", "no labelled")
    empty_val = write_blob_file(tmp_path / "unlabelled_val.h5", {"train": tr, "val": unlabelled, "test": te}, 3)
    assert_one_line_error(run_cli("train", empty_val, *TRAIN_FAST), "validation", "empty")
    zero_val = write_blob_file(tmp_path / "zero_val.h5", {"train": tr, "val": no_rows, "test": te}, 3)
    assert_one_line_error(run_cli("train", zero_val, *TRAIN_FAST), "validation", "empty")


def test_single_class_splits(tmp_path):
    """'one class trains to accuracy 0.0 or 1.0 silently': refused for train, a warning for val."""
    x, y = blobs(6, 3, 4)
    one = (x[y == 0], y[y == 0])
    single_train = write_blob_file(tmp_path / "one_train.h5", {"train": one, "val": (x, y), "test": (x, y)}, 3)
    assert_one_line_error(run_cli("train", single_train, *TRAIN_FAST), "single class", "c0")
    assert_one_line_error(run_cli("probe", single_train, "--Cs", "1"), "split 'train'", "single class (c0)")

    single_val = write_blob_file(tmp_path / "one_val.h5", {"train": (x, y), "val": one, "test": (x, y)}, 3)
    result = run_cli("train", single_val, *TRAIN_FAST)
    assert result.exit_code == 0, result.output
    # printed as one "warning:" line (not Python's file:line: UserWarning form)
    assert any(line.startswith("warning:") and "single class" in line for line in result.output.splitlines())
    with pytest.warns(UserWarning, match="single class"):  # the library raises it as a Python warning
        fc.train_head(single_val, epochs=2)


# ------------------------------------------------------------------------------------------------
# 6. labels, locks, decompression bombs, reports
# ------------------------------------------------------------------------------------------------

def test_labels_outside_class_range(blob_file, tmp_path):
    """'Labels outside the class range in a file give tracebacks in knn/probe/train.'"""
    path = tmp_path / "label12.h5"
    shutil.copy(blob_file, path)
    with h5py.File(path, "r+") as f:
        f["train"]["labels"][0] = 12
    for args in (("knn", path, *KNN_FAST), ("probe", path, *PROBE_FAST), ("train", path, *TRAIN_FAST)):
        assert_one_line_error(run_cli(*args), "12", "10 classes")


def _featcache(*args: str, **kw) -> subprocess.CompletedProcess:
    """A real second process (HDF5 locks are per process); file locking left on."""
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    return subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE",
                    reason="HDF5 file locking is switched off in this environment")
def test_overwrite_and_info_while_another_process_writes(tiny_vit, digits_dir, tmp_path):
    """'--overwrite while another process writes the same file makes both report success (refuse
    while the lock is held)' and 'info cannot read a file being written'."""
    out = tmp_path / "locked.h5"
    assert run_cli(*extract_args(tiny_vit, digits_dir, out)).exit_code == 0
    with h5py.File(out, "r+"):  # this process is "the extraction in progress": it holds the write lock
        over = _featcache(*extract_args(tiny_vit, digits_dir, out, "--overwrite"))
        info = _featcache("info", out)
    assert over.returncode == 1 and "Traceback" not in over.stderr, over.stderr
    assert "another process is writing" in over.stderr and "nothing was changed" in over.stderr
    assert done_rows(out) == 60 and not list(tmp_path.glob("*.creating"))  # the file is intact
    assert info.returncode == 0, info.stderr
    assert "being written by another process" in info.stdout
    assert "being written" not in _featcache("info", out).stdout  # lock released


def test_decompression_bomb_limit_is_featcache_s(tmp_path, monkeypatch):
    """"README's decompression-bomb limit (178,956,970 px) differs from the code's (89,478,485)":
    PIL's own MAX_IMAGE_PIXELS never applies, DecodeOptions.max_pixels does, and README says it."""
    from PIL import Image

    from featcache.sources import DecodeOptions, ImageDecodeError, load_image

    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px: a "bomb" to PIL, not to featcache
    assert load_image(path).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after decoding
    with pytest.raises(ImageDecodeError, match=r"decompression bomb.*20x20.*limit of 399 px"):
        load_image(path, DecodeOptions(max_pixels=399))

    readme = (REPO / "README.md").read_text()
    documented = re.search(r"`max_pixels` \(([\d,]+) px", readme)
    assert documented, "README no longer documents max_pixels"
    assert int(documented.group(1).replace(",", "")) == DecodeOptions().max_pixels == 178_956_970


EVIL = "**bold** [x](http://evil) <b>"


def _fake_run(path: Path, model: str) -> Path:
    (path / "figures").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kind": "knn", "model": model, "features": "cls"}))
    (path / "metrics.json").write_text(json.dumps({"kind": "knn", "test": {"top1": 0.5, "n": 10}}))
    return path


def test_report_escapes_names(tmp_path):
    """'report.md embeds run/model names unescaped.'"""
    run = _fake_run(tmp_path / "**run**_<i>", EVIL)
    result = run_cli("report", run, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "report.md").read_text()
    html_text = (tmp_path / "report" / "report.html").read_text()
    assert "[x](" not in md and "<b>" not in md and "<i>" not in md and "**bold**" not in md
    assert "**run**" not in md
    assert r"\*\*bold\*\*" in md  # still there, shown literally
    assert "<b>" not in html_text and "<i>" not in html_text
    assert "&lt;b&gt;" in html_text and "&lt;i&gt;" in html_text


def test_report_skips_symlinked_figures(tmp_path):
    """'a figure that is a symlink is followed': the report neither copies nor links it."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the report")
    run = _fake_run(tmp_path / "run", "m")
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run / "figures" / "real.png")
    (run / "figures" / "evil.png").symlink_to(secret)
    result = run_cli("report", run, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    copied = sorted(p.name for p in (tmp_path / "report").rglob("*.png"))
    assert copied == ["real.png"]
    for name in ("report.md", "report.html"):
        text = (tmp_path / "report" / name).read_text()
        assert "evil" not in text and "real.png" in text


# ------------------------------------------------------------------------------------------------
# CLI review (2026-12-01): one split in two roles, non-finite numbers, options that do nothing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,roles", [
    (["probe", "--val-split", "test", "--test-split", "test", "--Cs", "1"], ("val-split", "test-split", "test")),
    (["probe", "--test-split", "train", "--Cs", "1"], ("train-split", "test-split", "train")),
    (["train", "--val-split", "train", "--epochs", "1"], ("train-split", "val-split", "train")),
    (["sweep", "--val-split", "test", "--test-split", "test", "--epochs", "1", "--lr", "1e-3", "--wd", "0"],
     ("val-split", "test-split", "test")),
])
def test_one_split_in_two_roles_is_refused(digits_feature_file, argv, roles, monkeypatch):
    """`probe --val-split test --test-split test` chose C on the test rows, refitted on train + test
    and reported the result as test metrics (exit 0); train/sweep early-stopped on their own rows."""
    import featcache.probe as probe_module

    monkeypatch.setattr(probe_module.LogisticProbe, "fit", lambda *a, **k: pytest.fail("fitted before refusing"))
    r = CliRunner().invoke(cli, [argv[0], str(digits_feature_file), *argv[1:], "-q"])
    a, b, name = roles
    assert r.exit_code == 1 and f"--{a} and --{b} are both {name!r}" in r.output, r.output
    assert "Traceback" not in r.output


def test_compare_refuses_one_split_in_two_roles(digits_feature_file, tmp_path):
    other = tmp_path / "copy.h5"
    shutil.copy(digits_feature_file, other)
    r = CliRunner().invoke(cli, ["compare", str(digits_feature_file), str(other), "--val-split", "test", "-q"])
    # the user typed only --val-split: the message says where the other 'test' comes from
    assert r.exit_code == 1 and "--val-split and --test-split are both 'test' ('test' is --test-split's default)" \
        in r.output, r.output


@pytest.mark.parametrize("argv,message", [
    (["train", "--lr", "nan"], "expected a finite number"),
    (["sweep", "--lr", "1e-3,nan"], "every value must be a finite number"),
    (["knn", "--temperature", "nan"], "every value must be a finite number"),
    (["knn", "--k", "10,,20"], "empty item at position 2 of '10,,20'"),
    (["probe", "--Cs", "0"], "every C must be > 0"),
    (["probe", "--Cs", "abc"], "expected a named grid (default, dinov2) or comma-separated numbers"),
    (["knn", "--tries", "3"], "--tries applies to few-shot curves: add --shots"),
    (["probe", "--tries", "3"], "--tries applies to few-shot curves: add --shots"),
])
def test_bad_numbers_and_idle_options_are_usage_errors_before_any_work(digits_feature_file, argv, message):
    """--lr nan reached torch's 'Invalid learning rate: nan' (sweep trained its whole grid first and
    blamed divergence), --Cs 0 printed 'got array([0.])', --k 10,,20 ran k = 10 and 20, --tries
    without --shots was ignored."""
    r = CliRunner().invoke(cli, [argv[0], str(digits_feature_file), *argv[1:], "-q"])
    assert r.exit_code == 2 and message in r.output, r.output


def test_settings_a_run_does_not_use_are_named(digits_feature_file, tmp_path):
    """--hidden / --dropout on a linear head and --cv beside a validation split did nothing, silently."""
    r = CliRunner().invoke(cli, ["train", str(digits_feature_file), "--epochs", "1", "--hidden", "64", "--dropout",
                                 "0.3", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    notes = fc.load_run(tmp_path / "t").metrics["notes"]
    for key in ("hidden", "dropout"):
        note = f"--{key} was not used: the linear head does not read it"
        assert note in r.output and any(n.startswith(note) for n in notes)
    r = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", "1", "--cv", "3", "--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    assert "--cv 3 was not used: C was chosen on split 'val'" in json.dumps(json.loads(r.stdout)["notes"])


@pytest.mark.parametrize("extra,message,code", [
    (["--update", "--overwrite"], "--update keeps the stored features and --overwrite replaces the file", 2),
    (["--window", "40,400"], "--window applies to DICOM files, but every input here is another format", 1),
    (["--frame", "0"], "--frame applies to DICOM files", 1),
    (["--label-columns", "a,b"], "--label-columns reads columns of a CSV manifest or a datasets directory", 1),
    (["--group-column", "patient"], "but {data} is an image folder", 1),
    (["--frame", "-1"], "-1 is not in the range x>=0", 2),
    (["--batch-size", "0"], "0 is not in the range x>=1", 2),
])
def test_extract_refuses_options_that_would_do_nothing(tiny_vit, digits_dir, tmp_path, extra, message, code):
    """On an image folder --label-columns / --group-column were ignored (no patient ids, exit 0), and
    --window / --frame on PNGs changed no pixel but entered the fingerprint: the same command without
    them was then refused as 'other settings'. --update --overwrite silently overwrote."""
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", "--model", str(tiny_vit), "--data", str(digits_dir), "--out", str(out),
                                 "--workers", "0", "-q", *extra])
    assert r.exit_code == code and message.format(data=digits_dir) in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_empty_names_and_pairs_are_usage_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["extract", "--model", "", "--data", str(tmp_path), "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 2 and "--model: is empty; give a hub id" in r.output, r.output
    r = runner.invoke(cli, ["extract", "--model", "m", "--data", str(tmp_path), "--out", ""])
    assert r.exit_code == 2 and "--out: is empty; give a file name" in r.output, r.output
    np.savez(tmp_path / "train.npz", cls=np.zeros((4, 3), np.float32), labels=np.array([0, 1, 0, 1]))
    r = runner.invoke(cli, ["import", "--out", str(tmp_path / "i.h5"), "--split", f"={tmp_path / 'train.npz'}"])
    assert r.exit_code == 2 and "the split name before '=' is empty" in r.output, r.output


def test_split_refuses_to_write_over_its_input(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(20)))
    before = manifest.read_text()
    r = CliRunner().invoke(cli, ["split", str(manifest), "--out", str(manifest)])
    assert r.exit_code == 2 and "is the input manifest" in r.output and manifest.read_text() == before
    r = CliRunner().invoke(cli, ["split", str(manifest), "--out", str(tmp_path / "s.csv"), "--val", "nan"])
    assert r.exit_code == 2 and "expected a finite number" in r.output


def test_knn_uniform_refuses_a_temperature_it_would_not_read(digits_feature_file):
    r = CliRunner().invoke(cli, ["knn", str(digits_feature_file), "--weighting", "uniform", "--temperature",
                                 "0.1,0.2", "--k", "5", "-q"])
    assert r.exit_code == 2 and "reads no temperature" in r.output, r.output


def test_predict_says_why_a_saved_threshold_does_not_apply(tmp_path):
    """predict --positive-class <the other class> dropped the saved threshold to 0.5 and said only
    'default 0.5'; predict --threshold youden said "'youden' is not a valid float range"."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    path = write_arrays(tmp_path / "b.h5", {"train": {"cls": x[:60], "labels": y[:60]},
                                            "val": {"cls": x[60:90], "labels": y[60:90]},
                                            "test": {"cls": x[90:], "labels": y[90:]}}, ["neg", "pos"],
                        {"model": "m"}).path
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", str(path), "--epochs", "3", "--threshold", "youden", "--out", str(run), "-q"])
    assert r.exit_code == 0, r.output
    pred = fc.predict(run, path, positive_class="neg")
    assert pred.threshold == 0.5 and "does not apply to positive class neg (pass --threshold)" in pred.threshold_source
    assert "is on P(pos)" in pred.threshold_source
    r = CliRunner().invoke(cli, ["predict", str(run), str(path), "--threshold", "youden", "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "rules such as youden" in r.output and "chosen on validation at training" in r.output
    from featcache.report import write_report  # report told the user to re-run with a class that does not exist

    with pytest.raises(ValueError, match=r"--positive-class 'nope' is not a class of these runs \(their classes: neg, pos\)"):
        write_report([run], tmp_path / "rep", positive_class="nope")


def test_report_and_compare_name_a_missing_class_or_split_plainly(digits_feature_file, tmp_path):
    other = tmp_path / "copy.h5"
    shutil.copy(digits_feature_file, other)
    r = CliRunner().invoke(cli, ["compare", str(digits_feature_file), str(other), "--test-split", "nope", "-q"])
    assert r.exit_code == 1 and "no file has a split 'nope' (option --test-split)" in r.output, r.output


def test_a_file_made_with_window_before_the_check_is_still_resumed(tiny_vit, digits_dir, tmp_path, monkeypatch):
    """A file extracted before --window was refused for PNG data records the window in its
    fingerprint: refusing it now left only --overwrite (re-extract everything)."""
    import featcache.extraction as extraction

    out = tmp_path / "old.h5"
    argv = ["extract", "--model", str(tiny_vit), "--data", str(digits_dir), "--out", str(out), "--workers", "0", "-q",
            "--window", "40,400"]
    with monkeypatch.context() as m:  # the code before the check
        m.setattr(extraction, "check_dicom_options", lambda *a, **k: None)
        assert CliRunner().invoke(cli, argv).exit_code == 0
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    r = CliRunner().invoke(cli, [*argv[:-1], "40,nan"])
    assert r.exit_code == 2 and "expected finite numbers CENTRE,WIDTH" in r.output, r.output


def test_probe_console_says_how_its_intervals_were_made(digits_feature_file):
    r = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", "1", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    assert "95 % intervals: Wilson score for top1; 50 bootstrap resamples for balanced_accuracy" in r.output
