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

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, average_precision_score, recall_score, roc_auc_score,
                             top_k_accuracy_score)
from sklearn.preprocessing import StandardScaler

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


# CSV probabilities are written with 8 decimals: every figure recomputed from them agrees with the
# run's own float64 figures to far better than 1e-6 (rank-based AUROC/AUPRC exactly, unless two
# scores are within 1e-8 of each other, which continuous Gaussian features do not produce).
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

    run("predict", run_dir, binary_file, "--out", tmp_path / "p.csv")
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

def sklearn_probe(train, val, test, C: float) -> np.ndarray:
    """The probe's recipe in scikit-learn: scaler fitted on train, LogisticRegression(C) refitted on
    train + val, converged tightly (float64, tol 1e-10) so it is the model at that C."""
    scaler = StandardScaler().fit(train[0])
    x = scaler.transform(np.concatenate([train[0], val[0]]))
    y = np.concatenate([train[1], val[1]])
    model = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x, y)
    return model.predict_proba(scaler.transform(test[0]))


def _arrays(path: Path, split: str):
    with fc.open(path) as store:
        x, y, _ = store[split].arrays("cls")
    return x.astype(np.float64), y


def probe_and_predict(task, digits_feature_file, binary_file, tmp_path):
    """`featcache probe --out RUN` then `featcache predict RUN --split test`: (path, metrics, P, y, pred)
    with P the CSV's probabilities: (N, C) for digits, P(positive) for the binary task."""
    path = digits_feature_file if task == "digits" else binary_file
    run_dir = tmp_path / "probe"
    run("probe", path, "--Cs", PROBE_CS, "--quiet", "--out", run_dir)
    assert (run_dir / "head.safetensors").is_file() and (run_dir / "head.json").is_file()
    metrics = read_json(run_dir / "metrics.json")
    run("predict", run_dir, path, "--split", "test", "--out", tmp_path / "p.csv")
    rows = read_csv(tmp_path / "p.csv")
    with fc.open(path) as store:
        classes = list(store.classes)
    if task == "binary":
        y, got, pred = csv_arrays(rows, classes)
    else:
        y = np.array([classes.index(r["label"]) for r in rows])
        pred = np.array([classes.index(r["prediction"]) for r in rows])
        got = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return path, metrics, got, y, pred, classes


PROBE_CS = "0.001,0.01,0.1,1"


@pytest.mark.parametrize("task", ["digits", "binary"])
def test_probe_run_is_deployable_and_its_metrics_are_its_predictions(task, digits_feature_file, binary_file,
                                                                     tmp_path):
    from featcache.evaluation import run_probe

    path, metrics, got, y, pred, classes = probe_and_predict(task, digits_feature_file, binary_file, tmp_path)
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


@pytest.mark.xfail(strict=True, reason="known: the probe's final refit stops lbfgs at tol 1e-4 on float32 "
                                       "features, so its probabilities are up to ~0.08 (digits, C = 1) from the "
                                       "converged model at best_C; see /work/notes/tests12.md")
@pytest.mark.parametrize("task", ["digits", "binary"])
def test_probe_probabilities_equal_converged_sklearn_logistic_regression(task, digits_feature_file, binary_file,
                                                                         tmp_path):
    path, metrics, got, y, pred, classes = probe_and_predict(task, digits_feature_file, binary_file, tmp_path)
    ref = sklearn_probe(_arrays(path, "train"), _arrays(path, "val"), _arrays(path, "test"), metrics["best_C"])
    if task == "binary":
        ref = ref[:, classes.index(metrics["positive_class"])]
    # 1e-4: both fits converged, the head in float32: what remains is float32 rounding (~1e-6)
    np.testing.assert_allclose(got, ref, atol=1e-4)


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

    # the bootstrap decides every resample by the same rule: recompute its interval in numpy
    idx = resample_indices(len(test_y), 300, None, seed=0)
    values = [np.mean(pred[i] == test_y[i]) for i in idx]
    ci = metrics["test"]["ci"]["top1"]
    assert ci == pytest.approx([np.quantile(values, 0.025), np.quantile(values, 0.975)], abs=1e-12)


def test_top5_with_ties_orders_them_as_sklearn():
    rng = np.random.default_rng(0)
    # scores from 3 levels over 10 classes: nearly every row has ties across the top-5 boundary
    scores = rng.integers(0, 3, (400, 10)).astype(np.float64) + 1e-3
    proba = scores / scores.sum(axis=1, keepdims=True)
    y = rng.integers(0, 10, 400)
    ours = classification_metrics(y, proba)["top5"]
    assert ours == top_k_accuracy_score(y, proba, k=5, labels=np.arange(10))


def test_knn_top5_with_uniform_ties_matches_sklearn(digits_feature_file):
    # k = 4 uniform votes over 10 classes: at most 4 classes score, the other 6 tie at 0
    from featcache.evaluation import run_knn

    with fc.open(digits_feature_file) as store:
        res = run_knn(store, ks=[4], weighting="uniform", backend="torch")
    y = res.eval.y
    ref = top_k_accuracy_score(y, res.proba, k=5, labels=np.arange(10))
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


def test_ece_is_the_15_bin_top1_ece(digits_feature_file, tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (500, 4))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba[:20] = np.eye(4)[rng.integers(0, 4, 20)]                 # confidence exactly 1
    y = rng.integers(0, 4, 500)
    assert classification_metrics(y, proba)["ece"] == pytest.approx(numpy_ece(y, proba), abs=1e-12)

    # and in a real run's metrics.json, from the probabilities of its predictions CSV
    run_dir = tmp_path / "probe"
    run("probe", digits_feature_file, "--Cs", "0.01,0.1", "--quiet", "--out", run_dir)
    run("predict", run_dir, digits_feature_file, "--out", tmp_path / "p.csv")
    rows = read_csv(tmp_path / "p.csv")
    classes = [str(c) for c in range(10)]
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    yy = np.array([classes.index(r["label"]) for r in rows])
    assert read_json(run_dir / "metrics.json")["test"]["ece"] == pytest.approx(numpy_ece(yy, p), abs=CSV_TOL)


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
