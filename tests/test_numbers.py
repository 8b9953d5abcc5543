"""The numbers a user reads, checked against an independent reference.

Every figure featcache prints or writes (metrics.json, the predictions CSV, the CLI tables) is
recomputed here from something featcache did not compute: scikit-learn, a few lines of numpy,
the CSV that `featcache predict` writes, or the file the CLI produced. Commands run through the
real command line (click's CliRunner on featcache_cli.main.cli, or a subprocess where the
operating system is part of the behaviour: locks, file-size limits).
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, average_precision_score, recall_score, roc_auc_score,
                             top_k_accuracy_score)

import featcache as fc
from featcache.metrics import classification_metrics, resample_indices
from featcache.store import write_arrays
from featcache_cli.main import cli

CLASSES = ["abnormal", "normal"]   # "abnormal" (index 0) is the training minority below


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def run(*args: str, ok: bool = True):
    """`featcache ARGS` through click, as a user types it; asserts success unless ok=False."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def binary_split(rng: np.random.Generator, n_abnormal: int, n_normal: int, dim: int = 8, shift: float = 0.8):
    """Two overlapping Gaussian clouds: abnormal (label 0) shifted by `shift` along every axis."""
    x = np.concatenate([rng.normal(shift, 1.0, (n_abnormal, dim)), rng.normal(0.0, 1.0, (n_normal, dim))])
    y = np.array([0] * n_abnormal + [1] * n_normal)
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def write_binary(path: Path, sizes: dict[str, tuple[int, int]], seed: int = 0, groups: dict | None = None) -> Path:
    rng = np.random.default_rng(seed)
    splits = {}
    for name, (n_abn, n_norm) in sizes.items():
        x, y = binary_split(rng, n_abn, n_norm)
        splits[name] = {"cls": x, "labels": y, "paths": [f"{name}/{i:04d}.png" for i in range(len(y))]}
        if groups and name in groups:
            splits[name]["groups"] = groups[name]
    write_arrays(path, splits, CLASSES, {"model": "synthetic-binary", "tokens": "none", "dtype": "float32"})
    return path


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory) -> Path:
    """abnormal / normal, abnormal the minority of train (30 of 120), with val and test splits."""
    return write_binary(tmp_path_factory.mktemp("binary") / "binary.h5",
                        {"train": (30, 90), "val": (25, 50), "test": (30, 60)})


def binary_reference(y: np.ndarray, p_pos: np.ndarray, pred: np.ndarray, pos: int) -> dict[str, float]:
    """Sensitivity, AUROC and AUPRC of class `pos` from scikit-learn."""
    return {"sensitivity": recall_score(y, pred, pos_label=pos),
            "auroc": roc_auc_score((y == pos).astype(int), p_pos),
            "auprc": average_precision_score(y, p_pos, pos_label=pos)}


def csv_arrays(rows: list[dict[str, str]], classes: list[str]):
    """(label index, P(positive), predicted index) of a binary predictions CSV."""
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    pred = np.array([classes.index(r["prediction"]) for r in rows])
    return y, p, pred


# CSV probabilities are written as the exact numbers the run scored (prediction.exact_text): every
# figure recomputed from them agrees with the run's own figures up to float summation order
# (test_wrong_but_plausible pins the saturated case where 8 decimals had made ties).
CSV_TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# 3. the positive class of a binary task
# ------------------------------------------------------------------------------------------------

def test_default_positive_class_is_the_train_minority_and_metrics_match_sklearn(binary_file, tmp_path):
    run_dir = tmp_path / "probe"
    result = run("probe", binary_file, "--out", run_dir)
    assert "positive class abnormal" in result.output          # the test table's title names it
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["positive_class"] == "abnormal" and metrics["test"]["positive_class"] == "abnormal"

    said = run("predict", run_dir, binary_file, "--out", tmp_path / "p.csv")
    assert "head: linear (a logistic probe) on cls" in said.output  # was "probe linear head ...", read as an order
    y, p_pos, pred = csv_arrays(read_csv(tmp_path / "p.csv"), CLASSES)
    ref = binary_reference(y, p_pos, pred, pos=CLASSES.index("abnormal"))
    for name, value in ref.items():
        assert metrics["test"][name] == pytest.approx(value, abs=CSV_TOL), name


def test_positive_class_option_flips_it(binary_file, tmp_path):
    run_dir = tmp_path / "probe"
    run("probe", binary_file, "--positive-class", "normal", "--out", run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["positive_class"] == "normal"
    run("predict", run_dir, binary_file, "--out", tmp_path / "p.csv")
    y, p_pos, pred = csv_arrays(read_csv(tmp_path / "p.csv"), CLASSES)
    ref = binary_reference(y, p_pos, pred, pos=CLASSES.index("normal"))
    for name, value in ref.items():
        assert metrics["test"][name] == pytest.approx(value, abs=CSV_TOL), name


def test_unknown_positive_class_is_a_clear_error(binary_file):
    for command in (["knn", binary_file, "--k", "5"], ["probe", binary_file], ["train", binary_file, "--epochs", "1"]):
        result = run(*command, "--positive-class", "sick", ok=False)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert "'sick' is not a class" in result.output and "abnormal, normal" in result.output


def test_positive_class_named_in_knn_train_tables_and_report(binary_file, tmp_path):
    knn = run("knn", binary_file, "--k", "5", "--out", tmp_path / "knn")
    assert "positive class abnormal" in knn.output
    train = run("train", binary_file, "--epochs", "3", "--quiet", "--out", tmp_path / "train")
    assert "positive class abnormal" in train.output
    assert read_json(tmp_path / "knn" / "metrics.json")["positive_class"] == "abnormal"
    assert read_json(tmp_path / "train" / "metrics.json")["positive_class"] == "abnormal"
    run("report", tmp_path / "knn", tmp_path / "train", "--out", tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "positive class" in html and html.count("abnormal") >= 2   # one cell per run


# ------------------------------------------------------------------------------------------------
# 4. the threshold travels from train to predict
# ------------------------------------------------------------------------------------------------

def test_saved_threshold_is_what_predict_applies(binary_file, tmp_path):
    run_dir = tmp_path / "run"
    run("train", binary_file, "--threshold", "youden", "--epochs", "20", "--quiet", "--out", run_dir)
    metrics = read_json(run_dir / "metrics.json")
    saved = read_json(run_dir / "head.json")["threshold"]
    assert metrics["threshold"]["value"] == saved and saved != 0.5
    pos = CLASSES.index(metrics["positive_class"])

    run("predict", run_dir, binary_file, "--out", tmp_path / "p.csv")
    rows = read_csv(tmp_path / "p.csv")
    y, p_pos, pred = csv_arrays(rows, CLASSES)
    # the probability column is P(positive class): the CSV decision is (P >= saved threshold)
    away = np.abs(p_pos - saved) > 1e-7   # rows within the CSV's 8-decimal rounding of t are ambiguous
    np.testing.assert_array_equal(pred[away], np.where(p_pos >= saved, pos, 1 - pos)[away])

    # the run's test metrics are what the CSV gives, recomputed by scikit-learn
    test = metrics["test"]
    assert test["threshold"] == saved
    assert test["top1"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert test["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=pos), abs=1e-12)
    assert test["specificity"] == pytest.approx(recall_score(y, pred, pos_label=1 - pos), abs=1e-12)

    run("predict", run_dir, binary_file, "--threshold", "0.3", "--out", tmp_path / "p03.csv")
    y, p_pos, pred = csv_arrays(read_csv(tmp_path / "p03.csv"), CLASSES)
    away = np.abs(p_pos - 0.3) > 1e-7
    np.testing.assert_array_equal(pred[away], np.where(p_pos >= 0.3, pos, 1 - pos)[away])


# ------------------------------------------------------------------------------------------------
# 5. the probe is deployable and is scikit-learn's logistic regression
# ------------------------------------------------------------------------------------------------

def _arrays(path: Path, split: str):
    with fc.open(path) as store:
        x, y, _ = store[split].arrays("cls")
    return x.astype(np.float64), y


@pytest.fixture(scope="module", params=["digits", "binary"])
def probe_run(request, digits_feature_file, binary_file, tmp_path_factory):
    """`featcache probe --out RUN` then `featcache predict RUN --split test`, on digits (10 classes)
    and on the binary task: (task, file, metrics.json, P, y, pred, classes) with P the CSV's
    probabilities: (N, C) for digits, P(positive) for the binary task."""
    task = request.param
    path = digits_feature_file if task == "digits" else binary_file
    tmp = tmp_path_factory.mktemp(f"probe-{task}")
    run_dir = tmp / "probe"
    run("probe", path, "--Cs", PROBE_CS, "--quiet", "--out", run_dir)
    assert (run_dir / "head.safetensors").is_file() and (run_dir / "head.json").is_file()
    metrics = read_json(run_dir / "metrics.json")
    run("predict", run_dir, path, "--split", "test", "--out", tmp / "p.csv")
    rows = read_csv(tmp / "p.csv")
    with fc.open(path) as store:
        classes = list(store.classes)
    if task == "binary":
        y, got, pred = csv_arrays(rows, classes)
    else:
        y = np.array([classes.index(r["label"]) for r in rows])
        pred = np.array([classes.index(r["prediction"]) for r in rows])
        got = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return task, path, metrics, got, y, pred, classes


PROBE_CS = "0.001,0.01,0.1,1"


def test_probe_run_is_deployable_and_its_metrics_are_its_predictions(probe_run):
    from featcache.evaluation import run_probe

    task, path, metrics, got, y, pred, classes = probe_run
    # the saved head is scikit-learn's fitted model: StandardScaler.transform, then predict_proba of
    # the probe's LogisticRegression (the same fit, run again in-process: it is deterministic)
    with fc.open(path) as store:
        res = run_probe(store, Cs=PROBE_CS)
    assert res.probe.best_C_ == metrics["best_C"]
    sk_model = res.probe.model_.models[0]
    assert type(sk_model) is LogisticRegression and sk_model.C == metrics["best_C"]
    ref = sk_model.predict_proba(res.probe.scaler_.transform(_arrays(path, "test")[0].astype(np.float32)))
    if task == "binary":
        pos = classes.index(metrics["positive_class"])
        ref = ref[:, pos]
    # 1e-5: the head stores float32 weights and standardisation and the CSV 8 decimals
    np.testing.assert_allclose(got, ref, atol=1e-5)

    test = metrics["test"]
    assert test["top1"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    if task == "binary":
        assert test["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=pos), abs=1e-12)
        assert test["specificity"] == pytest.approx(recall_score(y, pred, pos_label=1 - pos), abs=1e-12)
        assert test["auroc"] == pytest.approx(roc_auc_score((y == pos).astype(int), got), abs=CSV_TOL)
    else:
        assert test["top5"] == pytest.approx(top_k_accuracy_score(y, got, k=5, labels=range(len(classes))),
                                             abs=1e-12)


# ------------------------------------------------------------------------------------------------
# 6. one tie rule: P(positive) >= 0.5 is positive, everywhere
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tie_file(tmp_path_factory) -> Path:
    """k = 2, uniform votes: rows between the abnormal and the normal neighbour get exactly 0.5.

    train: abnormal at e1 (the minority, so the positive class), normal at e2 and twice near e3.
    test: 14 rows on the e1/e2 diagonal (10 abnormal, 4 normal) -> P(abnormal) = 0.5 exactly;
          6 normal rows at e3 -> P(abnormal) = 0."""
    e = np.eye(3, dtype=np.float32)
    train_x = np.stack([e[0], e[1], e[2], e[2] + [0, 0.01, 0]]).astype(np.float32)
    train_y = np.array([0, 1, 1, 1])
    rng = np.random.default_rng(1)
    diag = np.array([1, 1, 0], np.float32) + rng.normal(0, 1e-3, (14, 3)).astype(np.float32) * [1, 1, 0]
    test_x = np.concatenate([diag, np.tile(e[2] + [0.001, 0, 0], (6, 1))]).astype(np.float32)
    test_y = np.array([0] * 10 + [1] * 4 + [1] * 6)
    path = tmp_path_factory.mktemp("ties") / "ties.h5"
    write_arrays(path, {"train": {"cls": train_x, "labels": train_y}, "test": {"cls": test_x, "labels": test_y}},
                 CLASSES, {"model": "ties", "tokens": "none", "dtype": "float32"})
    return path


def test_probability_one_half_is_positive_in_every_figure(tie_file, tmp_path):
    test_y = np.array([0] * 10 + [1] * 4 + [1] * 6)
    p_abnormal = np.array([0.5] * 14 + [0.0] * 6)
    pred = np.where(p_abnormal >= 0.5, 0, 1)          # the documented rule, in numpy
    expected = float(np.mean(pred == test_y))         # 16 / 20 (the other rule would give 10 / 20)
    assert expected == 0.8

    result = run("knn", tie_file, "--k", "2", "--weighting", "uniform", "--bootstrap", "300",
                 "--json", "-", "--out", tmp_path / "knn")
    table = json.loads(result.stdout)
    assert [r["top1"] for r in table["results"] if r["k"] == 2] == [expected]
    metrics = read_json(tmp_path / "knn" / "metrics.json")
    assert metrics["test"]["top1"] == expected
    assert metrics["test"]["sensitivity"] == 1.0      # every abnormal row sits at 0.5 -> positive

    # the interval decides by the same rule: the Wilson interval of 16 of 20 (10 of 20 by the other)
    from scipy.stats import binomtest

    ci = metrics["test"]["ci"]["top1"]
    assert ci == pytest.approx(list(binomtest(16, 20).proportion_ci(method="wilson")), abs=1e-12)


def test_top5_orders_ties_as_top1_does():
    """Ties rank the lower class index first, as the top-1 decision does: scikit-learn's
    top_k_accuracy_score ranks the higher first, so six tied classes pushed the top-1 class out of
    the top 5 (top-5 0.0 with top-1 1.0)."""
    rng = np.random.default_rng(0)
    # scores from 3 levels over 10 classes: nearly every row has ties across the top-5 boundary
    scores = rng.integers(0, 3, (400, 10)).astype(np.float64) + 1e-3
    proba = scores / scores.sum(axis=1, keepdims=True)
    y = rng.integers(0, 10, 400)
    rank = np.lexsort((np.broadcast_to(np.arange(10), proba.shape), -proba), axis=1)  # -score, then index
    expected = np.mean((rank[:, :5] == y[:, None]).any(axis=1))
    metrics = classification_metrics(y, proba)
    assert metrics["top5"] == expected and metrics["top5"] >= metrics["top1"]
    flat = np.full((10, 10), 0.1)  # every class tied: top-1 is class 0, so must top-5 count it
    assert classification_metrics(np.zeros(10, int), flat)["top5"] == classification_metrics(np.zeros(10, int), flat)["top1"] == 1.0
    # without ties it is scikit-learn's figure
    smooth = rng.dirichlet(np.ones(10), 400)
    assert classification_metrics(y, smooth)["top5"] == top_k_accuracy_score(y, smooth, k=5, labels=np.arange(10))


def test_knn_top5_never_credits_a_class_without_votes(digits_feature_file):
    # k = 4 uniform votes over 10 classes: at most 4 classes score, the other 6 tie at 0. Ranking the
    # zeros in tie order would make a row whose class no neighbour has a top-5 "hit" (by class index);
    # so top-5 here is the share of rows with a neighbour of their class, and with 5+ voted classes
    # scikit-learn's top-5 of the voted classes
    from featcache.evaluation import run_knn

    with fc.open(digits_feature_file) as store:
        res = run_knn(store, ks=[4], weighting="uniform", backend="torch")
    y = res.eval.y
    voted = res.proba[np.arange(len(y)), y] > 0
    ref = top_k_accuracy_score(y[voted], np.where(res.proba > 0, res.proba, -1.0)[voted], k=5,
                               labels=np.arange(10), normalize=False) / len(y)
    assert ref == np.mean(voted)  # at most 4 classes voted: every voted class is in the top 5
    assert ref < top_k_accuracy_score(y, res.proba, k=5, labels=np.arange(10))  # what the zero ties added
    assert res.headline["top5"] == ref and res.rows[0]["top5"] == ref


# ------------------------------------------------------------------------------------------------
# 7. one ECE
# ------------------------------------------------------------------------------------------------

def numpy_ece(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE: 15 equal-width bins (lo, hi] of the top-1 confidence (0 in the first)."""
    conf, correct = proba.max(axis=1), proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1]) | ((b == 0) & (conf == 0))
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - conf[inside].mean())
    return total / len(y)


def test_ece_is_the_15_bin_top1_ece():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (500, 4))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba[:20] = np.eye(4)[rng.integers(0, 4, 20)]                 # confidence exactly 1
    y = rng.integers(0, 4, 500)
    assert classification_metrics(y, proba)["ece"] == pytest.approx(numpy_ece(y, proba), abs=1e-12)



def test_ece_in_metrics_json_is_the_numpy_ece_of_the_predictions_csv(probe_run):
    task, path, metrics, got, y, pred, classes = probe_run
    proba = got if task == "digits" else None
    if proba is None:   # binary CSV: P(positive) -> both columns
        pos = classes.index(metrics["positive_class"])
        proba = np.zeros((len(got), 2))
        proba[:, pos], proba[:, 1 - pos] = got, 1 - got
    assert metrics["test"]["ece"] == pytest.approx(numpy_ece(y, proba), abs=CSV_TOL)


def test_calibration_figure_legend_shows_the_metrics_ece(tmp_path, monkeypatch):
    import featcache.plots as plots

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (300, 3))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, 300)
    legends = []
    original = plots._save

    def capture(fig, stem):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return original(fig, stem)

    monkeypatch.setattr(plots, "_save", capture)
    plots.calibration_plot(y, proba, tmp_path / "cal")
    assert any(f"ECE {numpy_ece(y, proba):.3f}, 15 bins" in t for t in legends), legends


# ------------------------------------------------------------------------------------------------
# 8. the bootstrap says how many resamples it could use
# ------------------------------------------------------------------------------------------------

def test_bootstrap_counts_resamples_where_auroc_is_defined(tmp_path):
    path = write_binary(tmp_path / "rare.h5", {"train": (20, 60), "test": (1, 39)})
    run_dir = tmp_path / "knn"
    result = run("knn", path, "--k", "5", "--bootstrap", "200", "--out", run_dir)
    boot = read_json(run_dir / "metrics.json")["test"]["bootstrap"]
    with fc.open(path) as store:
        y = store["test"].labels[:]
    pos = CLASSES.index("abnormal")
    both = sum(1 for i in resample_indices(len(y), 200, None, seed=0) if 0 < (y[i] == pos).sum() < len(i))
    assert boot["n_boot"] == 200 and boot["n_valid"]["auroc"] == both
    assert 200 - both > 0.05 * 200            # (39/40)^40: about a third of resamples lack the positive
    assert any("auroc was undefined" in w for w in boot["warnings"])
    assert "warning: bootstrap: auroc was undefined" in result.output


# ------------------------------------------------------------------------------------------------
# 9. groups (patients) travel from the manifest into the file, and leakage is reported
# ------------------------------------------------------------------------------------------------

EXTRACT = ("--workers", "0", "--batch-size", "16", "--dtype", "float32", "--quiet")


@pytest.fixture(scope="module")
def patient_manifest(digits_dir, tmp_path_factory) -> Path:
    """The 60 digit images as path,label,patient_id (3 images per patient), absolute paths."""
    files = sorted(digits_dir.glob("*/*/*.png"))
    out = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i, f in enumerate(files):
            w.writerow([str(f), f"digit{f.parent.name}", f"p{i // 3:02d}"])
    return out


def stored_groups(path: Path) -> dict[str, tuple[str, str]]:
    """{image path: (split, group)} as the feature file holds them."""
    with fc.open(path) as store:
        return {p: (name, g) for name in store.splits for p, g in zip(store[name].paths, store[name].groups)}


def test_group_column_is_stored_and_split_manifest_keeps_groups_and_splits(tiny_vit, patient_manifest, tmp_path):
    rows = read_csv(patient_manifest)
    run("extract", "--model", tiny_vit, "--data", patient_manifest, "--group-column", "patient_id",
        "--out", tmp_path / "a.h5", *EXTRACT)
    assert stored_groups(tmp_path / "a.h5") == {r["path"]: ("all", r["patient_id"]) for r in rows}

    run("split", patient_manifest, "--group", "patient_id", "--label", "label", "--out", tmp_path / "s.csv")
    split_rows = read_csv(tmp_path / "s.csv")
    run("extract", "--model", tiny_vit, "--data", tmp_path / "s.csv", "--out", tmp_path / "b.h5", *EXTRACT)
    # no --group-column: the split manifest's copy of the group column is picked up
    assert stored_groups(tmp_path / "b.h5") == {r["path"]: (r["split"], r["patient_id"]) for r in split_rows}
    assert "leakage" not in run("info", tmp_path / "b.h5").output


@pytest.fixture(scope="module")
def leaky_file(tmp_path_factory) -> Path:
    """Binary file whose patients p000 and p001 have images in both train and test (2 leaked groups)."""
    sizes = {"train": (30, 90), "val": (25, 50), "test": (30, 60)}
    groups = {name: [f"{name}-{i // 2}" for i in range(a + b)] for name, (a, b) in sizes.items()}
    groups["train"][:2] = ["p000", "p001"]
    groups["test"][:2] = ["p000", "p001"]
    return write_binary(tmp_path_factory.mktemp("leaky") / "leaky.h5", sizes, groups=groups)


@pytest.mark.parametrize("command", [["info"], ["knn", "--k", "5"], ["probe", "--Cs", "0.1"],
                                     ["train", "--epochs", "1"]])
def test_a_group_in_two_splits_is_reported_as_leakage(command, leaky_file):
    result = run(command[0], leaky_file, *command[1:])
    line = next((ln for ln in result.output.splitlines() if "leakage" in ln), None)
    assert line is not None and line.startswith("warning"), result.output
    assert "2 group(s)" in line


# ------------------------------------------------------------------------------------------------
# 10. 8-bit RGB DICOM is read as stored
# ------------------------------------------------------------------------------------------------

def test_8bit_rgb_dicom_loads_as_the_same_png(tmp_path):
    pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from featcache.sources import load_image

    pixels = np.random.default_rng(0).integers(100, 151, (24, 20, 3), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 24, 20, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    Image.fromarray(pixels, "RGB").save(tmp_path / "rgb.png")

    dicom = np.asarray(load_image(tmp_path / "rgb.dcm"))
    np.testing.assert_array_equal(dicom, np.asarray(load_image(tmp_path / "rgb.png")))
    np.testing.assert_array_equal(dicom, pixels)      # 100..150 as stored, not stretched to 0..255


# ------------------------------------------------------------------------------------------------
# 11. import keeps the paths of an .npz
# ------------------------------------------------------------------------------------------------

def test_import_npz_with_paths_stores_them(tmp_path, digits_arrays):
    x, y = digits_arrays["train"]
    paths = np.array([f"scans/{i:04d}.png" for i in range(len(y))])
    np.savez(tmp_path / "x.npz", cls=x, labels=y, paths=paths)
    run("import", "--out", tmp_path / "f.h5", "--split", f"train={tmp_path / 'x.npz'}")
    with fc.open(tmp_path / "f.h5") as store:
        assert list(store["train"].paths) == paths.tolist()
        np.testing.assert_array_equal(store["train"].labels[:], y)


# ------------------------------------------------------------------------------------------------
# 12. one command-line behaviour for every command
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["knn", "--k", "5"], ["probe", "--Cs", "0.1"], ["train", "--epochs", "1"],
                                     ["info"]])
def test_json_dash_is_valid_json_on_stdout_and_tables_on_stderr(command, binary_file):
    result = run(command[0], binary_file, *command[1:], "--json", "-")
    data = json.loads(result.stdout)                   # nothing but the JSON on standard output
    assert isinstance(data, dict) and data
    if command[0] != "info":
        assert "positive class abnormal" in result.stderr


def test_a_non_hdf5_file_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a feature file\n")
    result = run("knn", tmp_path / "notes.txt", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1


@pytest.mark.parametrize("args, option", [(["knn", "--k", "1,x"], "--k"),
                                          (["knn", "--bootstrap", "-5"], "--bootstrap"),
                                          # a typo of 10,000: a cap of 100,000 (cli.app.MAX_BOOTSTRAP)
                                          (["train", "--bootstrap", "1000000"], "--bootstrap"),
                                          (["sweep", "--bootstrap", "1000000"], "--bootstrap"),
                                          (["probe", "--bootstrap", "100001"], "--bootstrap"),
                                          (["probe", "--threshold", "foo"], "--threshold"),
                                          (["train", "--threshold", "foo"], "--threshold"),
                                          (["train", "--head", "mixer", "--features", "pooled"], "--features")])
def test_bad_options_are_usage_errors_naming_the_option(args, option, binary_file):
    result = run(args[0], binary_file, *args[1:], ok=False)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output


def test_threshold_rule_on_a_multiclass_file_is_a_clear_error(digits_feature_file):
    result = run("train", digits_feature_file, "--threshold", "youden", "--epochs", "1", "--quiet", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "binary and multi-label" in result.output and "10 classes" in result.output


def test_knn_on_its_own_training_split_warns(binary_file):
    result = run("knn", binary_file, "--k", "5", "--train-split", "train", "--eval-split", "train")
    assert "warning: the neighbours and the evaluated rows are the same split" in result.output


def test_help_shows_percent_signs_once():
    text = run("train", "--help").output
    assert "95%" in text and "95%%" not in text


def test_extracting_again_has_nothing_left_and_no_nan(tiny_vit, digits_dir, tmp_path):
    run("extract", "--model", tiny_vit, "--data", digits_dir, "--out", tmp_path / "f.h5", *EXTRACT)
    again = run("extract", "--model", tiny_vit, "--data", digits_dir, "--out", tmp_path / "f.h5", *EXTRACT)
    assert "nothing left to compute" in again.output and "nan" not in again.output.lower()


# ------------------------------------------------------------------------------------------------
# 13. convergence notes
# ------------------------------------------------------------------------------------------------

def test_sweep_warns_when_the_best_lr_is_the_largest_tried(digits_feature_file, tmp_path):
    # lr 1e-5 vs 1e-6 for 3 epochs: the larger one always learns more
    result = run("sweep", digits_feature_file, "--lr", "1e-6,1e-5", "--wd", "0", "--epochs", "3",
                 "--metric", "loss", "--quiet")
    warning = [ln for ln in result.output.splitlines() if ln.startswith("warning") and "largest in the grid" in ln]
    assert warning and "--lr" in warning[0], result.output


def test_train_warns_when_the_best_epoch_is_the_last(digits_feature_file):
    # the validation loss of a small-lr linear head falls every epoch: epoch 1 of 2 is the best
    result = run("train", digits_feature_file, "--epochs", "2", "--lr", "1e-3", "--metric", "loss", "--quiet")
    assert "warning: the best epoch is the last one (1)" in result.output


# ------------------------------------------------------------------------------------------------
# 14. loading a run directory never runs code
# ------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls os.system: what a booby-trapped checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_predict_refuses_a_pickled_checkpoint_that_would_run_code(binary_file, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"format": "featcache-head-1", "state_dict": _Payload(str(marker))}, run_dir / "best.pt")
    result = run("predict", run_dir, binary_file, "--out", tmp_path / "x.csv", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "refused to load" in result.output
    assert not marker.exists() and not (tmp_path / "x.csv").exists()


# ------------------------------------------------------------------------------------------------
# 15. a full disk or a file-size limit is a one-line error, never a crash or a broken file
# ------------------------------------------------------------------------------------------------

def test_too_little_free_space_is_refused_before_writing(tiny_vit, digits_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100_000, 100_000))
    out = tmp_path / "f.h5"
    result = run("extract", "--model", tiny_vit, "--data", digits_dir, "--out", out, *EXTRACT, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1
    assert re.search(r"needs [\d.]+ MiB", error[0]) and "0.1 MiB free" in error[0], error[0]
    assert list(tmp_path.iterdir()) == []             # no file, no half-created .creating file


def _featcache(*args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m featcache ARGS` in a child process (HDF5 file locking on)."""
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-m", "featcache", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_file_size_limit_is_a_clear_error_not_a_signal(tiny_vit, digits_dir, tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "f.h5"
    proc = _featcache("extract", "--model", tiny_vit, "--data", digits_dir, "--out", out, "--tokens", "full",
                      *EXTRACT, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr      # not killed by SIGXFSZ (-25) or a crash (139)
    assert "file-size limit" in proc.stderr and "Traceback" not in proc.stderr
    # the remedies that apply: raise the limit (not "free space"), and only settings not yet in use
    assert "Raise the limit (ulimit -f)" in proc.stderr and "Free space" not in proc.stderr
    assert "--tokens none" in proc.stderr and ("--dtype float16" in proc.stderr) == ("float32" in EXTRACT)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 16. two writers
# ------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_another_process_writes(tiny_vit, digits_dir, tmp_path):
    out = tmp_path / "f.h5"
    run("extract", "--model", tiny_vit, "--data", digits_dir, "--out", out, *EXTRACT)
    before = out.read_bytes()
    # another process opens the file for writing (HDF5 takes its lock) and keeps it open; a child
    # with h5py alone starts in a fraction of the time a featcache child needs, and the commands
    # below run as a user's would, in a process of their own (this one) against a foreign lock
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('locked', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            result = run("extract", "--model", tiny_vit, "--data", digits_dir, "--out", out, *EXTRACT, *extra,
                         ok=False)
            assert result.exit_code == 1, result.output
            lines = [ln for ln in result.output.splitlines() if ln.strip()]
            assert len(lines) == 1 and "another process is writing" in lines[0], result.output
        info = run("info", out)
        assert "being written by another process" in info.output
    finally:
        holder.communicate("", timeout=30)
    assert out.read_bytes() == before                 # neither attempt changed the file


def test_import_text_labels_of_class_indices(tmp_path, digits_arrays):
    """A labels text file of integers holds class indices (as a .npy of ints would): with --classes
    they name those classes, without it classes are 0..max in numeric order (10 after 9)."""
    from featcache.importing import import_features

    x, y = digits_arrays["train"]
    np.save(tmp_path / "x.npy", x[:12])
    y12 = np.array([0, 1, 2, 10, 9, 2, 1, 0, 10, 3, 4, 5])
    (tmp_path / "y.txt").write_text("\n".join(map(str, y12)) + "\n")
    with import_features(tmp_path / "a.h5", {"train": tmp_path / "x.npy"}, labels={"train": tmp_path / "y.txt"}) as s:
        assert s.classes == [str(i) for i in range(11)]
        assert [s.classes[i] for i in s["train"].labels] == [str(v) for v in y12]
    (tmp_path / "y3.txt").write_text("0\n1\n2\n" * 4)
    names = "normal,pneumonia,covid"
    with import_features(tmp_path / "b.h5", {"train": tmp_path / "x.npy"}, labels={"train": tmp_path / "y3.txt"},
                         classes=names) as s:
        assert s.classes == names.split(",") and s["train"].labels.tolist() == [0, 1, 2] * 4
