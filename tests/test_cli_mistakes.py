"""Common user mistakes on the command line, as a review of every command found them (2026-12-02):
each is refused before any work with what was expected and the fix, never a traceback, a silently
changed protocol, or a file destroyed."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.store import write_arrays
from featcache_cli.main import cli


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture()
def files(tmp_path, digits_arrays):
    """A 10-class digits file, a second backbone's file of the same rows, and a binary file."""
    ten, other, binary = tmp_path / "digits.h5", tmp_path / "other.h5", tmp_path / "binary.h5"
    for path, scale in ((ten, 1.0), (other, 2.0)):
        write_arrays(path, {s: {"cls": x * scale, "labels": y, "paths": [f"{s}/{i}.png" for i in range(len(y))]}
                            for s, (x, y) in digits_arrays.items()}, [str(c) for c in range(10)],
                     {"model": f"m{scale}"}).close()
    write_arrays(binary, {s: {"cls": x, "labels": (y == 3).astype(np.int64)} for s, (x, y) in digits_arrays.items()},
                 ["other", "three"], {"model": "m"}).close()
    return ten, other, binary


def test_a_threshold_rule_on_a_multiclass_probe_names_the_real_reason(files, monkeypatch):
    """It said 'add --no-refit', which then failed with 'applies to binary tasks'."""
    ten, _, _ = files
    fits = []
    monkeypatch.setattr("featcache.probe.fit_logistic", lambda *a, **k: fits.append(1))
    for rule in ("youden", "0.3"):
        r = _run("probe", ten, "--threshold", rule, "-q")
        assert r.exit_code == 1 and "applies to binary and multi-label tasks; this one has 10 classes" in r.output
        assert "--no-refit" not in r.output and fits == []   # before the sweep
    # train and sweep ran every epoch first
    monkeypatch.setattr("featcache.train.HeadTrainer.fit", lambda *a, **k: fits.append(1))
    for cmd in ("train", "sweep"):
        r = _run(cmd, ten, "--threshold", "youden", "-q")
        assert r.exit_code == 1 and "this one has 10 classes and decides by argmax" in r.output and fits == []


def test_a_value_given_twice_in_a_list_is_refused(files):
    """--lr 1e-3,1e-3 trained two identical heads ranked 1 and 2; --k 10,10 collapsed silently."""
    ten, _, _ = files
    for args, shown in ((["sweep", ten, "--lr", "1e-3,0.001"], "gives 0.001 twice"),
                        (["knn", ten, "--k", "10,10"], "gives 10 twice"),
                        (["probe", ten, "--Cs", "1,1"], "gives 1.0 twice")):
        r = _run(*args)
        assert r.exit_code == 2 and shown in r.output, r.output
    r = _run("probe", ten, "--Cs", "dinov3")
    assert r.exit_code == 2 and "expected a named grid (default, dinov2) or comma-separated numbers" in r.output
    r = _run("sweep", ten, "--lr", "1e-3,,1e-2")
    assert r.exit_code == 2 and "e.g. 1e-3,1e-2" in r.output


def test_predictions_to_standard_output(files, tmp_path, monkeypatch):
    """--out - wrote a file named '-' and said 'wrote ... to -'."""
    ten, _, binary = files
    run = tmp_path / "run"
    assert _run("probe", binary, "--Cs", "1", "--no-refit", "--out", run, "-q").exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["predict", str(run), str(binary), "--out", "-"])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["image_path", "probability", "label", "prediction"] and len(rows) > 10
    assert "wrote" in r.stderr and "standard output" in r.stderr and not (tmp_path / "-").exists()
    assert _run("predict", run, binary, "--out", tmp_path / "p.csv").exit_code == 0
    assert (tmp_path / "p.csv").read_text().splitlines() == r.stdout.splitlines()


def test_compare_refuses_a_mistyped_validation_split_and_a_nan_temperature(files):
    """--val-split vla silently turned the probe's C selection into cross-validation."""
    ten, other, _ = files
    r = _run("compare", ten, other, "--val-split", "vla", "--bootstrap", "10", "-q")
    assert r.exit_code == 1 and "--val-split 'vla': no file has such a split" in r.output, r.output
    r = _run("compare", ten, other, "--temperature", "nan", "--bootstrap", "10")
    assert r.exit_code == 2 and "expected a finite number" in r.output and "(nan,)" not in r.output


def test_split_never_overwrites_a_feature_file_nor_reads_one_as_a_manifest(files, tmp_path):
    """split --out feats.h5 replaced the feature file by a CSV (exit 0); an HDF5 manifest gave a
    bare 'utf-8 codec can't decode byte 0x89'."""
    ten, _, _ = files
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(20)))
    before = ten.read_bytes()
    r = _run("split", manifest, "--out", ten)
    assert r.exit_code == 2 and "is an HDF5 file" in r.output and ten.read_bytes() == before
    r = _run("split", ten, "--out", tmp_path / "s.csv")
    assert r.exit_code == 1 and "is an HDF5 file (a feature file?), not a CSV" in r.output, r.output


def test_extract_option_mistakes(tiny_vit, digits_dir, tmp_path, monkeypatch):
    """--image-size 30 on a fixed-size model advised 'use 28 or 32' (28 then failed too); --token-mode
    without --num-tokens was ignored without a word; a decoding worker killed by the OOM killer gave
    torch's traceback, not what was saved."""
    base = ["extract", "--model", tiny_vit, "--data", digits_dir, "--workers", "0", "-q"]
    r = _run(*base, "--out", tmp_path / "a.h5", "--image-size", "30")
    assert r.exit_code == 1 and "runs at a fixed input size" in r.output and "use 28 or 32" not in r.output, r.output
    r = _run(*base, "--out", tmp_path / "b.h5", "--token-mode", "grid")
    assert r.exit_code == 2 and "--token-mode grid says how to reach --num-tokens, and none is given" in r.output

    def died(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr("featcache.extraction.run_extraction", died)
    r = _run(*base, "--out", tmp_path / "c.h5")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "a decoding worker died (DataLoader worker (pid 4242) is killed by signal: Killed; out of memory?)" in r.output
    assert "Run the same command again to resume, with fewer --workers" in r.output


def test_predict_on_an_import_without_model_names_the_unchecked_backbone(tmp_path):
    """Every import without --model has one fingerprint, so a head of one backbone's import was
    applied to another's without a word."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 60), ("val", 20), ("test", 20), ("other", 5)):
        np.savez(tmp_path / f"{name}.npz", cls=rng.normal(size=(n, 8)).astype(np.float32), labels=np.arange(n) % 2)
    r = _run("import", "--out", tmp_path / "a.h5", *(f"--split={s}={tmp_path / s}.npz" for s in ("train", "val", "test")))
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    assert _run("probe", tmp_path / "a.h5", "--Cs", "1", "--no-refit", "--out", run, "-q").exit_code == 0
    r = _run("import", "--out", tmp_path / "imp.h5", "--split", f"test={tmp_path / 'other.npz'}")
    assert r.exit_code == 0, r.output
    r = _run("predict", run, tmp_path / "imp.h5", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert "under the model name 'imported' (import's default), so their fingerprint cannot tell two backbones " \
           "apart" in " ".join(r.output.split())
