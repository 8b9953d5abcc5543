"""Numbers that looked right and were not: each test pins a case an adversarial review found
(2026-12-01), against a reference featcache did not compute (scikit-learn, plain numpy, the
predictions CSV)."""
from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score

import featcache as fc
from featcache.comparing import paired_bootstrap
from featcache.evaluation import few_shot
from featcache.metrics import (bootstrap_metrics, choose_threshold_rule, classification_metrics, resample_indices,
                               selection_score)
from featcache.prediction import array_proba, probe_head_payload, write_predictions_csv
from featcache.probe import LogisticProbe
from featcache.store import write_arrays
from featcache_cli.main import cli


# ------------------------------------------------------------------------------------------------
# bootstrap intervals of class-averaged metrics with a rare class
# ------------------------------------------------------------------------------------------------

def _rare_class_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 rows, class 2 has 2 of them and is never predicted (a rare diagnosis)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(29, int), np.ones(29, int), [2, 2]]
    p = rng.dirichlet([1, 1, 0.2], size=60)
    p[:, 2] = 0.01
    return y, p / p.sum(axis=1, keepdims=True)


def test_bootstrap_of_balanced_accuracy_drops_resamples_without_a_rare_class():
    y, p = _rare_class_case()
    boot = bootstrap_metrics(y, p, metrics=("top1", "balanced_accuracy", "auroc"), n_boot=400, seed=3)
    # reference: scikit-learn on the same resamples, keeping only those that hold all three classes
    # (elsewhere balanced accuracy is the mean recall of two classes, not three: another quantity)
    kept = [idx for idx in resample_indices(len(y), 400, None, 3) if np.unique(y[idx]).size == 3]
    ref = [balanced_accuracy_score(y[idx], p[idx].argmax(1)) for idx in kept]
    assert 0 < len(kept) < 400
    assert boot.n_valid["balanced_accuracy"] == boot.n_valid["auroc"] == len(kept)
    assert "top1" not in boot.n_valid and boot.methods["top1"] == "wilson"  # a proportion: no resamples needed
    assert boot.ci["balanced_accuracy"] == pytest.approx((np.quantile(ref, 0.025), np.quantile(ref, 0.975)))
    point = classification_metrics(y, p)["balanced_accuracy"]
    assert boot.ci["balanced_accuracy"][0] <= point <= boot.ci["balanced_accuracy"][1]
    assert boot.ci["balanced_accuracy"][1] < 0.75  # the two-class resamples had pushed it to ~0.9
    assert any("balanced_accuracy was undefined" in w for w in boot.warnings)


def test_multilabel_macro_auroc_bootstrap_needs_every_label_defined():
    rng = np.random.default_rng(1)
    y = np.zeros((60, 2), int)
    y[:30, 0] = 1
    y[[5, 40], 1] = 1                        # a rare finding: 2 positives of 60
    s = np.c_[y[:, 0] * 0.8 + 0.1, rng.uniform(size=60) * 0.01 + (1 - y[:, 1]) * 0.5]  # label 1 ranked backwards
    boot = bootstrap_metrics(y, s, metrics=("auroc",), n_boot=300, seed=0)
    assert classification_metrics(y, s)["auroc"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert boot.n_valid["auroc"] < 300
    assert boot.ci["auroc"] == pytest.approx((0.5, 0.5))  # the resamples without label 1 would give 1.0


def test_compare_paired_bootstrap_drops_the_same_resamples():
    y, p = _rare_class_case()
    q = np.roll(p, 1, axis=0)
    indices = resample_indices(len(y), 200, None, 0)
    point, boot = paired_bootstrap(y, {("a", "knn"): p, ("b", "knn"): q}, ["top1", "balanced_accuracy"], indices, None)
    complete = np.array([np.unique(y[idx]).size == 3 for idx in indices])
    for f in ("a", "b"):
        assert np.array_equal(np.isfinite(boot[(f, "knn", "balanced_accuracy")]), complete)
        assert np.isfinite(boot[(f, "knn", "top1")]).all()


# ------------------------------------------------------------------------------------------------
# point metrics
# ------------------------------------------------------------------------------------------------

def test_macro_f1_counts_a_predicted_class_absent_from_the_split_as_scikit_learn_does():
    y = np.array([0, 0, 0, 0, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])           # class 1 never occurs but is predicted twice
    proba = np.eye(3)[pred] * 0.9 + 0.1 / 3
    m = classification_metrics(y, proba)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert "counted in macro F1 only when predicted, with F1 0: 1 predicted)" in " ".join(m["notes"])


def test_kappa_is_undefined_when_truth_and_predictions_are_one_class():
    y = np.zeros(5, int)
    m = classification_metrics(y, np.tile([0.9, 0.1], (5, 1)))
    assert m["top1"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that kappa is undefined here
        assert np.isnan(cohen_kappa_score(y, y))
    assert m["kappa"] is None  # not 0.0, which reads as "chance agreement"
    assert any("kappa undefined" in n for n in m["notes"])  # and the README's promised note says why


def test_non_finite_scores_are_refused_not_reported():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, np.nan, 0.8, 0.9])
    proba = np.c_[1 - p1, p1]
    with pytest.raises(ValueError, match="NaN or inf in 1 row"):
        classification_metrics(y, proba)
    with pytest.raises(ValueError, match="NaN or inf"):
        bootstrap_metrics(y, proba, n_boot=10)
    with pytest.raises(ValueError, match="NaN or inf"):
        choose_threshold_rule("youden", y, proba, 1)
    assert np.isnan(selection_score(y, proba))  # a diverged head: never selected, training goes on


def test_multilabel_selection_by_balanced_accuracy_is_not_element_accuracy():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(200, 3)) < [0.5, 0.1, 0.03]).astype(int)
    s = np.clip(y * 0.3 + rng.uniform(size=(200, 3)) * 0.6, 0, 1)
    pred = (s >= 0.5).astype(int)
    ref = np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(3)])
    assert selection_score(y, s, "balanced_accuracy") == pytest.approx(ref)
    assert selection_score(y, s, "balanced_accuracy") != pytest.approx(selection_score(y, s, "accuracy"))


# ------------------------------------------------------------------------------------------------
# thresholds
# ------------------------------------------------------------------------------------------------

def test_threshold_rule_with_one_class_in_validation_says_it_stayed_at_half():
    y = np.zeros(20, int)
    proba = np.c_[np.linspace(0.9, 0.1, 20), np.linspace(0.1, 0.9, 20)]
    notes: list[str] = []
    assert choose_threshold_rule("youden", y, proba, 1, notes, ["normal", "pneumonia"]) == 0.5
    assert notes and "positive class pneumonia (no positives)" in notes[0] and "stays at 0.5" in notes[0]
    ml = np.c_[np.r_[np.ones(10), np.zeros(10)], np.zeros(20)].astype(int)
    notes = []
    value = choose_threshold_rule("sensitivity:0.9", ml, proba, None, notes, ["a", "b"])
    assert value[1] == 0.5 and value[0] != 0.5 and "label b (no positives)" in notes[0]


@pytest.mark.parametrize("rule, match", [("sensitivity:1.5", r"target sensitivity in \(0, 1\]"),
                                         ("youden:0.9", "takes no target")])
def test_threshold_rule_typos_are_refused_even_when_validation_has_one_class(rule, match):
    with pytest.raises(ValueError, match=match):
        choose_threshold_rule(rule, np.zeros(10, int), np.tile([0.5, 0.5], (10, 1)), 1)


def test_a_given_threshold_is_not_reported_as_chosen_on_validation(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, n)
        return {"cls": (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32), "labels": y}

    path = write_arrays(tmp_path / "b.h5", {"train": split(200), "val": split(60), "test": split(60)},
                        ["normal", "pneumonia"], {"model": "m"}).path
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", str(path), "--threshold", "0.3", "--epochs", "2", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert "chosen on validation" not in res.output
    metrics = fc.load_run(run).metrics
    assert metrics["threshold"] == {"rule": "0.3", "value": 0.3, "chosen_on": "given", "untuned": [],
                                    "untuned_why": {}}
    out = CliRunner().invoke(cli, ["predict", str(run), str(path), "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 0, out.output
    assert "threshold 0.3: saved (0.3, given)" in out.output


# ------------------------------------------------------------------------------------------------
# k-NN: top-5 and exact ties
# ------------------------------------------------------------------------------------------------

def test_knn_top5_at_k1_is_top1():
    rng = np.random.default_rng(0)
    train_x, train_y = rng.normal(size=(100, 8)).astype(np.float32), rng.integers(0, 10, 100)
    test_x, test_y = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 10, 50)
    res = fc.knn_eval(train_x, train_y, test_x, test_y, ks=[1, 3], backend="torch")
    assert res[1]["top5"] == res[1]["top1"]  # one neighbour, one class voted: a top-5 of one class
    # k = 3: a hit needs a neighbour of the row's class among the 3 (at most 3 classes voted)
    sims = (test_x / np.linalg.norm(test_x, axis=1, keepdims=True)) @ \
        (train_x / np.linalg.norm(train_x, axis=1, keepdims=True)).T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    assert res[3]["top5"] == pytest.approx(np.mean((train_y[nearest] == test_y[:, None]).any(axis=1)))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_with_exact_duplicates_does_not_depend_on_the_other_ks_or_the_backend(backend):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    train_x = np.r_[base, base]                       # every image twice, the copy relabelled
    train_y = np.r_[y, (y + 1) % 3]
    test_x = base[:80] + 0.05 * rng.normal(size=(80, 16)).astype(np.float32)
    test_y = y[:80]
    # reference: neighbours by (-similarity, training row), so the first copy (the true label) wins
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    first = np.argsort(-(b @ a.T).astype(np.float32), axis=1, kind="stable")[:, 0]
    ref = np.mean(train_y[first] == test_y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [fc.knn_eval(train_x, train_y, test_x, test_y, ks=ks, backend=backend)[1]["top1"]
               for ks in ([1], [1, 11], [1, 200])]
    assert got == [ref] * 3


# ------------------------------------------------------------------------------------------------
# predict and exported probes
# ------------------------------------------------------------------------------------------------

def _binary_split(rng, n, d=8):
    y = rng.integers(0, 2, n)
    return {"cls": (rng.normal(size=(n, d)) + 1.5 * y[:, None]).astype(np.float32), "labels": y}


def test_predict_matches_labels_by_class_name_not_index(tmp_path):
    rng = np.random.default_rng(0)
    cfg = {"model": "same-backbone"}
    train = write_arrays(tmp_path / "train.h5", {"train": _binary_split(rng, 200), "val": _binary_split(rng, 60)},
                         ["normal", "pneumonia"], cfg).path
    ext = _binary_split(rng, 50)
    swapped = {"cls": ext["cls"], "labels": 1 - ext["labels"]}  # the same rows, classes listed the other way
    ext_path = write_arrays(tmp_path / "ext.h5", {"test": swapped}, ["pneumonia", "normal"], cfg).path
    only = write_arrays(tmp_path / "only.h5", {"test": {"cls": ext["cls"][:10], "labels": np.zeros(10, int)}},
                        ["pneumonia"], cfg).path
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", str(train), "--epochs", "2", "--out", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    truth = np.array(["normal", "pneumonia"])[ext["labels"]]
    for path, want in ((ext_path, truth), (only, ["pneumonia"] * 10)):
        res = CliRunner().invoke(cli, ["predict", str(run), str(path), "--out", str(tmp_path / "p.csv")])
        assert res.exit_code == 0, res.output
        assert "matched by name" in res.output
        rows = list(csv.DictReader(open(tmp_path / "p.csv")))
        assert [r["label"] for r in rows] == list(want)


def test_exported_probe_gives_the_probes_numbers_on_float64_with_a_large_offset():
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, 16)) + 0.5 * np.linspace(-1, 1, 16)[None, :] * y[:, None]
        return x * 0.01 + 1e4, y                      # float64: a spread of 0.01 on an offset of 10,000

    (x, y), (vx, vy), (tx, _) = split(600), split(150), split(150)
    probe = LogisticProbe(Cs=[0.1, 1.0, 10.0]).fit(x, y, vx, vy)
    head = probe_head_payload(probe, classes=["a", "b", "c"], fingerprint="f", model_name="m", features="cls",
                              threshold=None, threshold_rule=None, positive=None, recipe={})
    # float32 outputs of the head's softmax: 1e-6 bounds their rounding (the float32 centring the export
    # used to do moved these probabilities by up to 5e-2)
    np.testing.assert_allclose(array_proba(head, tx), probe.predict_proba(tx), atol=1e-6)


def test_balance_sampler_is_refused_on_multilabel_files(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        return {"cls": rng.normal(size=(n, 8)).astype(np.float32),
                "labels": (rng.uniform(size=(n, 3)) < 0.2).astype(np.uint8)}

    path = write_arrays(tmp_path / "ml.h5", {"train": split(100), "val": split(30)}, ["a", "b", "c"],
                        {"model": "m"}).path
    with pytest.raises(ValueError, match="--balance weights"):
        fc.train_head(path, balance="sampler", epochs=1, test_split=None)


def test_few_shot_says_a_class_with_no_training_rows_is_never_predicted(tmp_path):
    rng = np.random.default_rng(0)

    def split(n, classes):
        y = rng.choice(classes, n)
        return {"cls": (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32), "labels": y}

    path = write_arrays(tmp_path / "f.h5", {"train": split(60, [0, 1]), "test": split(30, [0, 1, 2])},
                        ["a", "b", "c"], {"model": "m"}).path
    with fc.open(path) as store:
        res = few_shot(store, method="knn", shots=[2], tries=1, eval_split="test", k=5)
    notes = " ".join(res.notes)
    assert "no train rows: c; they can never be predicted" in notes
    assert "c (0)" not in notes


def test_repeats_summarise_a_metric_undefined_in_some_seeds_over_the_others_and_say_so():
    from types import SimpleNamespace

    from featcache.metrics import summarize_repeats
    from featcache.report import repeats_rows

    runs = [{"top1": 0.8, "auroc": 0.9}, {"top1": 0.9, "auroc": None}, {"top1": 0.85, "auroc": float("nan")}]
    summary = summarize_repeats(runs)
    assert summary["auroc"] == {"median": 0.9, "std": 0.0, "values": [0.9]}  # not NaN
    assert summary["top1"]["median"] == pytest.approx(np.median([0.8, 0.9, 0.85]))
    assert summary["top1"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.85]))
    title, _, rows = repeats_rows(SimpleNamespace(metrics={"repeats": {"seeds": [0, 1, 2], "test": summary}}))
    shown = {r[0]: r[1] for r in rows}
    assert "over 1 of 3 seeds" in shown["auroc"] and "over" not in shown["top1"]


def test_macro_f1_interval_keeps_one_class_set():
    """A class absent from the test labels but predicted for a few rows enters macro F1 only in
    resamples that draw one of those rows: such an interval mixed a 2-class and a 1-class mean
    (upper end near 1.0). Resamples whose classes differ from the full split's leave it undefined."""
    y = np.zeros(200, int)
    proba = np.tile([0.9, 0.1], (200, 1))
    proba[:3] = [0.2, 0.8]  # three rows predicted as class 1, which the split does not hold
    point = classification_metrics(y, proba)["macro_f1"]
    boot = bootstrap_metrics(y, proba, metrics=("macro_f1",), n_boot=300, seed=0)
    lo, hi = boot.ci["macro_f1"]
    assert lo <= point <= hi and hi < 0.75, (point, boot.ci)  # never the one-class value ~0.99
    assert boot.n_valid["macro_f1"] < 300


# ------------------------------------------------------------------------------------------------
# the predictions CSV holds the very probabilities the run's metrics were computed from
# ------------------------------------------------------------------------------------------------

def test_predictions_csv_recomputes_the_runs_auroc_and_threshold_exactly(tmp_path):
    """Well separated classes give probabilities near 0 and 1: written with 8 decimals they merged
    into ties (AUROC from the CSV 0.8692 vs 0.8691 in metrics.json) and the validation row at a
    youden threshold was printed below it while predicted positive."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    splits = {}
    for name, n in (("train", 400), ("val", 100), ("test", 200)):
        y = rng.choice(2, n, p=[0.7, 0.3])
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += np.where(y == 1, 60.0, -60.0)  # far apart: the head saturates
        if name == "test":  # 15 % of labels flipped: confidently wrong rows among the tiny probabilities
            y = np.where(rng.random(n) < 0.15, 1 - y, y)
        splits[name] = {"cls": x, "labels": y}
    path = tmp_path / "sep.h5"
    write_arrays(path, splits, ["benign", "malignant"], {"model": "m"})
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", str(path), "--lr", "0.5", "--wd", "0", "--epochs", "300", "--patience",
                                   "300", "--metric", "loss", "--threshold", "youden", "--out", str(run), "-q"])
    assert res.exit_code == 0, res.output
    t = fc.load_run(run)
    for split in ("val", "test"):
        out = tmp_path / f"{split}.csv"
        r = CliRunner().invoke(cli, ["predict", str(run), str(path), "--split", split, "--out", str(out), "-q"])
        assert r.exit_code == 0, r.output
        rows = list(csv.DictReader(out.open()))
        p = np.array([float(r["probability"]) for r in rows])
        labels = np.array([r["label"] == "malignant" for r in rows])
        predicted = np.array([r["prediction"] == "malignant" for r in rows])
        # equal but for float summation order (featcache's AUROC is its own rank formula)
        assert roc_auc_score(labels, p) == pytest.approx(t.metrics[split]["auroc"], abs=1e-12)
        if split == "test":  # the case: tiny probabilities that 8 decimals cannot tell apart
            assert abs(roc_auc_score(labels, np.round(p, 8)) - t.metrics[split]["auroc"]) > 1e-5
        threshold = t.metrics[split]["threshold"]
        np.testing.assert_array_equal(predicted, p >= threshold)  # the printed numbers give the decisions
        assert labels[p >= threshold].sum() / labels.sum() == t.metrics[split]["sensitivity"]


def test_the_head_not_the_file_decides_multi_label_predictions(tmp_path):
    """A multi-label head on an unlabelled file of its backbone (the deployment case) wrote softmax
    probabilities summing to 1 and dropped its per-label thresholds; a single-label head on a file
    with 2-D labels wrote per-class sigmoids."""
    rng = np.random.default_rng(2)
    n, names = 600, ["x", "y", "z"]
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    multi = (feats[:, :3] + rng.normal(scale=0.5, size=(n, 3)) > 0.3).astype(np.uint8)
    single = multi[:, 0].astype(int)
    config = {"model": "m", "tokens": "none", "dtype": "float32"}
    cut = {"train": slice(0, 300), "val": slice(300, 450), "test": slice(450, n)}
    write_arrays(tmp_path / "ml.h5", {k: {"cls": feats[s], "labels": multi[s]} for k, s in cut.items()}, names, config)
    write_arrays(tmp_path / "bin.h5", {k: {"cls": feats[s], "labels": single[s]} for k, s in cut.items()},
                 ["neg", "pos"], config)
    write_arrays(tmp_path / "new.h5", {"test": {"cls": feats[cut["test"]]}}, [], config)  # unlabelled
    trained = fc.train_head(tmp_path / "ml.h5", epochs=20)
    trained.apply_threshold("youden")
    trained.save(tmp_path / "ml_run")
    labelled = fc.predict(tmp_path / "ml_run", tmp_path / "ml.h5")
    new = fc.predict(tmp_path / "ml_run", tmp_path / "new.h5")
    assert new.multilabel and new.threshold == labelled.threshold and len(new.threshold) == 3
    np.testing.assert_array_equal(new.proba, labelled.proba)      # sigmoid per label, not a softmax
    assert not np.allclose(new.proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(new.decisions(), labelled.decisions())
    write_predictions_csv(new, tmp_path / "new.csv")
    row = next(csv.DictReader((tmp_path / "new.csv").open()))
    assert [row[f"label_{c}"] for c in names] == ["", "", ""]      # unknown, not "no finding"
    assert float(row["prob_x"]) == labelled.proba[0, 0]
    assert new.notes == []  # no "lists its classes as , ..." for a file without labels
    with pytest.raises(ValueError, match="the head is multi-label .* holds one class per row"):
        fc.predict(tmp_path / "ml_run", tmp_path / "bin.h5")
    fc.train_head(tmp_path / "bin.h5", epochs=5, out=tmp_path / "bin_run")
    with pytest.raises(ValueError, match="predicts one class per row .* is multi-label"):
        fc.predict(tmp_path / "bin_run", tmp_path / "ml.h5")


def test_a_probe_threshold_is_chosen_on_the_probabilities_predict_gives(tmp_path):
    """sensitivity:0.9 was chosen on scikit-learn's float64 probabilities and applied to the exported
    float32 head: the validation row defining it came out 2e-8 below it and the deployed validation
    sensitivity was 18/21 = 0.857. Several datasets, so a float32 rounding down is certain to occur."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        splits = {}
        for name, n in (("train", 200), ("val", 80), ("test", 80)):
            y = rng.choice(2, n, p=[0.75, 0.25])
            x = rng.normal(size=(n, 8))
            x[np.arange(n), y] += 0.7
            splits[name] = {"cls": x.astype(np.float32), "labels": y}
        path = tmp_path / f"b{seed}.h5"
        write_arrays(path, splits, ["benign", "malignant"], {"model": "m"})
        run = tmp_path / f"probe{seed}"
        res = CliRunner().invoke(cli, ["probe", str(path), "--no-refit", "--Cs", "0.01,0.1,1", "--threshold",
                                       "sensitivity:0.9", "--out", str(run), "-q"])
        assert res.exit_code == 0, res.output
        val = fc.predict(run, path, split="val")
        positives = val.labels == 1
        assert (val.decisions()[positives] == 1).mean() >= 0.9, seed


def test_predict_says_which_rows_it_left_out_and_refuses_a_meaningless_positive_class(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 4)).astype(np.float32)
    y = np.arange(90) % 3
    path = tmp_path / "three.h5"
    write_arrays(path, {"train": {"cls": x[:60], "labels": y[:60]}, "test": {"cls": x[60:], "labels": y[60:]}},
                 ["a", "b", "c"], {"model": "m"})
    fc.train_head(path, epochs=2, out=tmp_path / "run")
    with pytest.raises(ValueError, match="--positive-class applies to binary heads; this head has 3 classes"):
        fc.predict(tmp_path / "run", path, positive_class="b")
    import h5py

    with h5py.File(path, "r+") as f:  # two rows whose image could not be read: not done
        done = f["test/done"][()]
        done[[3, 7]] = False
        f["test/done"][...] = done
    pred = fc.predict(tmp_path / "run", path)
    assert len(pred.paths) == 28
    assert any("2 of the 30 rows of split 'test' have no features" in n for n in pred.notes), pred.notes


def test_a_threshold_left_at_the_default_is_not_called_chosen_on_validation(tmp_path):
    """Validation without positives: youden falls back to 0.5, but metrics.json said chosen_on "val"
    and predict printed "saved (youden, chosen on validation)"."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(160, 4)).astype(np.float32)
    y = (x[:, 0] > 0.3).astype(int)
    yv = np.zeros(40, int)  # no positives in validation
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:80], "labels": y[:80]},
                                     "val": {"cls": x[80:120], "labels": yv},
                                     "test": {"cls": x[120:], "labels": y[120:]}}, ["neg", "pos"], {"model": "m"})
    for command in (["train", "--epochs", "3"], ["probe", "--no-refit", "--Cs", "1"]):
        run = tmp_path / command[0]
        r = CliRunner().invoke(cli, [command[0], str(tmp_path / "f.h5"), *command[1:], "--threshold", "youden",
                                     "--out", str(run), "-q"])
        assert r.exit_code == 0, r.output
        record = fc.load_run(run).metrics["threshold"]
        assert record["chosen_on"] == "default" and record["value"] == 0.5, record
        assert record["untuned"] == ["pos"]  # the bare class name (the note says why)
        assert record["untuned_why"] == {"pos": "no positives in validation"}
        pred = fc.predict(run, tmp_path / "f.h5")
        assert "chosen on validation" not in pred.threshold_source
        assert pred.threshold_source == "saved (youden: the default 0.5 for pos (no positives in validation))"
    loud = CliRunner().invoke(cli, ["train", str(tmp_path / "f.h5"), "--epochs", "3", "--threshold", "youden"])
    assert loud.exit_code == 0 and "chosen on validation" not in loud.output, loud.output
    assert "(youden: the default 0.5 for pos (no positives in validation))" in loud.output


def test_a_repeats_run_in_the_report_shows_the_seeds_median_threshold(tmp_path):
    """Each seed chooses its own youden threshold and the row shows medians over seeds: the threshold
    beside them was seed 0's alone."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=1.0, size=300) > 0.5).astype(int)
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:150], "labels": y[:150]},
                                     "val": {"cls": x[150:220], "labels": y[150:220]},
                                     "test": {"cls": x[220:], "labels": y[220:]}}, ["neg", "pos"], {"model": "m"})
    run = tmp_path / "rep"
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "f.h5"), "--epochs", "4", "--repeats", "3", "--threshold",
                                 "youden", "--out", str(run), "-q"])
    assert r.exit_code == 0, r.output
    per_seed = fc.load_run(run).metrics["repeats"]["test"]["threshold"]
    r = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "median of the seeds' youden thresholds" in text
    assert f"{per_seed['median']:.4g}" in text
    assert "### Metrics (test: 80 rows, 2 classes, seed 0 of 3: the saved head)" in text  # not unlabelled


def test_a_head_trained_on_imported_features_predicts_on_another_import_of_that_model(tmp_path):
    """The import recorded its source file names in the fingerprint: a head trained on one import was
    refused on a deployment set of the same model ("use the same model and extraction settings")."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(80, 4)).astype(np.float32), np.arange(80) % 2
    np.savez(tmp_path / "train.npz", cls=x[:60], labels=y[:60])
    np.savez(tmp_path / "test.npz", cls=x[60:], labels=y[60:])
    np.savez(tmp_path / "hospital_b.npz", cls=x[60:])
    runner = CliRunner()
    r = runner.invoke(cli, ["import", "--out", str(tmp_path / "a.h5"), "--split", f"train={tmp_path / 'train.npz'}",
                            "--split", f"test={tmp_path / 'test.npz'}", "--model", "my-vit"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["import", "--out", str(tmp_path / "b.h5"), "--split", f"test={tmp_path / 'hospital_b.npz'}",
                            "--model", "my-vit"])
    assert r.exit_code == 0, r.output
    fc.train_head(tmp_path / "a.h5", epochs=2, out=tmp_path / "run")
    pred = fc.predict(tmp_path / "run", tmp_path / "b.h5")
    np.testing.assert_array_equal(pred.proba, fc.predict(tmp_path / "run", tmp_path / "a.h5").proba)
    r = runner.invoke(cli, ["import", "--out", str(tmp_path / "c.h5"), "--split", f"test={tmp_path / 'hospital_b.npz'}",
                            "--model", "other-vit"])
    with pytest.raises(ValueError, match="trained on features of 'my-vit'"):
        fc.predict(tmp_path / "run", tmp_path / "c.h5")


# ------------------------------------------------------------------------------------------------
# k-NN: ties, unanimous votes, zero rows, composite features
# ------------------------------------------------------------------------------------------------

def _numpy_weighted_knn(train_x, train_y, test_x, k, t, c):
    """DINO's vote in float64 numpy, neighbours by (-similarity, training row)."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    out = np.zeros((len(b), c))
    for i, s in enumerate(sims):
        nn = np.lexsort((np.arange(len(s)), -s))[:k]
        np.add.at(out[i], train_y[nn], np.exp((s[nn] - s[nn].max()) / t))
    return out / out.sum(axis=1, keepdims=True)


def test_unanimous_knn_votes_tie_exactly_on_every_backend():
    """All 10 neighbours positive is a share of exactly 1: it came out 1 +- 2e-16, so AUROC ranked
    those rows by rounding noise (0.9278 vs 0.9270 tied) and torch and faiss disagreed."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 1400)
    x = (rng.normal(size=(1400, 16)) + y[:, None] * 1.2).astype(np.float32)
    tr, te = slice(0, 1000), slice(1000, 1400)
    aurocs = []
    for backend in ("torch", "faiss"):
        res = fc.knn_eval(x[tr], y[tr], x[te], y[te], ks=(10,), backend=backend, return_proba=True)[10]
        p = res["proba"][:, 1]
        assert p.max() <= 1.0 and (p == 1.0).sum() >= 20  # unanimous rows are exactly 1
        reference = _numpy_weighted_knn(x[tr], y[tr], x[te], 10, 0.07, 2)[:, 1]
        assert res["auroc"] == pytest.approx(roc_auc_score(y[te], np.round(reference, 12)), abs=1e-12)
        aurocs.append(res["auroc"])
    assert aurocs[0] == aurocs[1]


def test_knn_top5_keeps_the_top1_class_when_many_classes_tie():
    x = np.eye(10, dtype=np.float32) + 0.01
    res = fc.knn_eval(x, np.arange(10), x[:1] + 0.0, np.array([0]), ks=(10,), weighting="uniform")[10]
    assert res["top1"] == 1.0 and res["top5"] == 1.0  # top5 was 0.0: ties ranked the higher classes first


def test_an_all_zero_row_widens_only_its_own_search_and_is_flagged(monkeypatch):
    import featcache.knn as knn_module
    from featcache.knn import nearest_neighbours

    rng = np.random.default_rng(0)
    train = rng.normal(size=(3000, 8)).astype(np.float32)
    test = rng.normal(size=(50, 8)).astype(np.float32)
    alone, _ = nearest_neighbours(train, test, 5)
    test[7] = 0.0
    searched, real_search = [], knn_module._search

    def recording(train_x, test_x, k, *args):
        searched.append((len(test_x), k))
        return real_search(train_x, test_x, k, *args)

    monkeypatch.setattr(knn_module, "_search", recording)
    sims, idx = nearest_neighbours(train, test, 5)
    assert searched[0] == (50, 21) and all(rows == 1 for rows, _ in searched[1:]) and searched[-1][1] == 3000
    monkeypatch.undo()
    np.testing.assert_array_equal(np.delete(sims, 7, 0), np.delete(alone, 7, 0))
    assert idx[7].tolist() == [0, 1, 2, 3, 4]  # ties in training-row order
    with pytest.warns(UserWarning, match="1 evaluated row\\(s\\) have all-zero features"):
        fc.knn_eval(train, np.arange(3000) % 3, test, np.arange(50) % 3, ks=(5,))
    # an all-zero neighbour is nearest to a row whose every other cosine is negative, and votes
    lone = np.stack([np.r_[1.0, 0.0], np.r_[0.0, 0.0]]).astype(np.float32)
    with pytest.warns(UserWarning, match="1 neighbour row\\(s\\) have all-zero features.*negative, and vote"):
        res = fc.knn_eval(lone, np.array([0, 1]), np.array([[-1.0, 0.0]], np.float32), np.array([1]), ks=(1,))
    assert res[1]["top1"] == 1.0   # the zero row (class 1) won: the warning is about a real vote
    with pytest.raises(ValueError, match="train_y holds -1: labels must be class indices"):
        fc.knn_eval(train, np.r_[-1, np.arange(2999) % 3], test, np.arange(50) % 3, ks=(5,))
    with pytest.raises(ValueError, match="test_y holds -1"):
        fc.knn_eval(train, np.arange(3000) % 3, test, np.r_[-1, np.arange(49) % 3], ks=(5,))


def test_composite_knn_features_weigh_their_parts_equally(tmp_path):
    """cls carries the class, pooled is noise with 20x the norm: cls+pooled k-NN was the pooled k-NN."""
    rng = np.random.default_rng(2)
    y = np.arange(400) % 4
    cls = (np.eye(4)[y] * 3 + rng.normal(scale=0.5, size=(400, 4))).astype(np.float32)
    pooled = (rng.normal(size=(400, 4)) * 60).astype(np.float32)
    path = tmp_path / "parts.h5"
    write_arrays(path, {"train": {"cls": cls[:300], "pooled": pooled[:300], "labels": y[:300]},
                        "test": {"cls": cls[300:], "pooled": pooled[300:], "labels": y[300:]}},
                 ["a", "b", "c", "d"], {"model": "m"})
    from featcache.evaluation import run_knn

    with fc.open(path) as store:
        both = run_knn(store, ks=(10,), features="cls+pooled").headline["top1"]
        alone = run_knn(store, ks=(10,), features="cls").headline["top1"]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    x = np.hstack([unit(cls), unit(pooled)])
    expected = np.mean(_numpy_weighted_knn(x[:300], y[:300], x[300:], 10, 0.07, 4).argmax(1) == y[300:])
    assert both == pytest.approx(expected, abs=1e-12) and alone > 0.9 and both > 0.6


def test_metrics_api_refuses_labels_it_would_miscount():
    from featcache.metrics import choose_threshold

    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    assert classification_metrics(y.astype(float), p) == classification_metrics(y, p)  # pandas' float labels
    with pytest.raises(ValueError, match="needs 0/1 labels"):
        choose_threshold(np.array([1, 2, 2, 1]), np.array([0.1, 0.9, 0.8, 0.3]))  # was 0.1, silently
    with pytest.raises(ValueError, match="multi-label labels must be 0 or 1; found -1"):
        classification_metrics(np.array([[0], [-1], [1], [0]]), np.array([[0.1], [0.7], [0.9], [0.2]]))
    with pytest.raises(ValueError, match="30 groups for 6 rows"):
        bootstrap_metrics(y, p, n_boot=10, groups=[str(i) for i in range(30)])
    with pytest.raises(ValueError, match="no bootstrap interval for AUROC"):
        bootstrap_metrics(y, p, metrics=("AUROC",), n_boot=10)
    boot = bootstrap_metrics(np.r_[np.zeros(38, int), 1, 1], np.tile([[0.6, 0.4]], (40, 1)),
                             metrics=("specificity", "sensitivity", "auroc"), n_boot=200, seed=1)
    # sensitivity of 2 positives is a Wilson interval (needs no resample); AUROC's resamples without
    # a positive are dropped and said so, with why
    assert boot.methods["sensitivity"] == "wilson" and boot.ci["sensitivity"] == pytest.approx((0.0, 0.6576), abs=1e-4)
    assert any("auroc was undefined" in w and "e.g. no positive row" in w for w in boot.warnings), boot.warnings


def test_a_bootstrap_over_few_patients_says_so_and_unknown_ids_are_not_groups():
    """All 120 test rows of one site (one group) gave 'by group' intervals of zero width, no warning;
    rows without a patient id (each its own group) were reported as a grouped bootstrap."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p = np.clip(np.c_[1 - y * 0.6 - 0.2, y * 0.6 + 0.2] + rng.normal(scale=0.2, size=(120, 2)), 0.01, 0.99)
    p = p / p.sum(axis=1, keepdims=True)
    one = bootstrap_metrics(y, p, metrics=("top1", "auroc"), n_boot=200, groups=["site0"] * 120)
    assert one.grouped and one.n_units == 1 and one.ci["auroc"][0] == one.ci["auroc"][1]
    assert one.ci["top1"][1] - one.ci["top1"][0] > 0.7  # Wilson at one patient: about as wide as one row's
    assert any("only 1 patients (groups) to resample" in w for w in one.warnings)
    unique = bootstrap_metrics(y, p, metrics=("top1",), n_boot=200, groups=[f"row{i}" for i in range(120)])
    assert not unique.grouped and unique.n_units == 120 and unique.warnings == []
    # rows without an id (None, NaN, "") are patients of their own, never one giant patient
    holes = [None] * 50 + [float("nan")] * 30 + [""] * 20 + [f"p{i // 2}" for i in range(20)]
    mixed = bootstrap_metrics(y, p, metrics=("top1",), n_boot=200, groups=holes)
    assert mixed.grouped and mixed.n_units == 100 + 10
    sizes = [len(i) for i in resample_indices(120, 50, holes, seed=0)]
    assert max(sizes) < 140  # one giant "None" patient drawn once made resamples of 21 to 417 rows
    block = unique.attach({})
    assert block["bootstrap"]["grouped"] is False and block["bootstrap"]["n_units"] == 120


def test_choose_threshold_is_the_loop_it_replaced():
    from featcache.metrics import choose_threshold

    rng = np.random.default_rng(1)
    for n in (30, 400):
        y = rng.integers(0, 2, n)
        s = np.round(rng.random(n), 2)  # many tied scores
        cand = np.unique(s)
        sens = np.array([(s[y == 1] >= t).mean() for t in cand])
        spec = np.array([(s[y == 0] < t).mean() for t in cand])
        assert choose_threshold(y, s, "youden") == cand[np.argmax(sens + spec - 1)]
        assert choose_threshold(y, s, "sensitivity", 0.9) == cand[np.flatnonzero(sens >= 0.9).max()]


def test_summarize_repeats_reads_numpy_scalars():
    from featcache.metrics import summarize_repeats

    out = summarize_repeats([{"auroc": np.float32(0.8), "n": np.int64(5)}, {"auroc": np.float32(0.9), "n": np.int64(5)}])
    assert out["auroc"]["median"] == pytest.approx(0.85) and out["n"]["std"] == 0.0


def test_a_closed_pipe_does_not_lose_the_run_directory(tmp_path):
    """`featcache train ... --out RUN | head -1` stopped with 'Broken pipe' before RUN was written."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)).astype(np.float32), np.arange(200) % 2
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:120], "labels": y[:120]}, "val": {"cls": x[120:160],
                 "labels": y[120:160]}, "test": {"cls": x[160:], "labels": y[160:]}}, ["a", "b"], {"model": "m"})
    for command in (["train", "--epochs", "2"], ["probe", "--Cs", "0.1,1"]):
        run = tmp_path / command[0]
        proc = subprocess.Popen([sys.executable, "-m", "featcache", command[0], str(tmp_path / "f.h5"), *command[1:],
                                 "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.readline()  # the reader takes one line and goes, as `| head -1` does
        proc.stdout.close()
        assert proc.wait(timeout=300) == 0
        assert (run / "metrics.json").exists() and (run / "head.safetensors").exists()


def test_predict_on_an_external_file_with_one_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 4)).astype(np.float32), np.arange(100) % 2
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:60], "labels": y[:60]}, "test": {"cls": x[60:], "labels": y[60:]}},
                 ["a", "b"], {"model": "m"})
    write_arrays(tmp_path / "site_b.h5", {"all": {"cls": x[60:]}}, ["a", "b"], {"model": "m"})
    fc.train_head(tmp_path / "f.h5", epochs=2, out=tmp_path / "run")
    pred = fc.predict(tmp_path / "run", tmp_path / "site_b.h5")
    np.testing.assert_array_equal(pred.proba, fc.predict(tmp_path / "run", tmp_path / "f.h5").proba)
    assert any("predicted its only split, 'all'" in n for n in pred.notes)
    with pytest.raises(ValueError, match="has no split 'val'.*pass --split"):
        fc.predict(tmp_path / "run", tmp_path / "f.h5", split="val")


def test_binary_ece_decides_a_one_half_tie_as_every_figure_does():
    """4 positives at exactly P = 0.5 are positive (top-1 1.0), but the ECE scored them by argmax:
    wrong, so accuracy 0 in the 0.5 bin (0.155 where the run's own decisions give 0.395)."""
    from featcache.metrics import expected_calibration_error

    y = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    p1 = np.array([0.5, 0.5, 0.5, 0.5, 0.52, 0.52, 0.1, 0.1])
    proba = np.c_[1 - p1, p1]
    m = classification_metrics(y, proba)
    assert m["top1"] == 1.0
    decided = (p1 >= 0.5).astype(int)
    conf = np.where(decided == 1, p1, 1 - p1)
    edges = np.linspace(0, 1, 16)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, 14)
    reference = sum(abs((decided[which == b] == y[which == b]).mean() - conf[which == b].mean()) * (which == b).sum()
                    for b in range(15) if (which == b).any()) / len(y)
    assert m["ece"] == pytest.approx(reference, abs=1e-12) and m["ece"] == pytest.approx(0.395, abs=1e-9)
    assert expected_calibration_error(y, proba) != m["ece"]  # plain argmax: the tie went to the negative


def test_predict_never_defaults_to_a_training_split_and_the_cli_survives_closed_streams(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 2
    write_arrays(tmp_path / "t.h5", {"train": {"cls": x, "labels": y}}, ["a", "b"], {"model": "m"})
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:40], "labels": y[:40]}, "test": {"cls": x[40:],
                 "labels": y[40:]}}, ["a", "b"], {"model": "m"})
    fc.train_head(tmp_path / "f.h5", epochs=2, out=tmp_path / "run")
    with pytest.raises(ValueError, match="has no split 'test'; it has train"):
        fc.predict(tmp_path / "run", tmp_path / "t.h5")  # its training rows, scored as if a test set
    assert len(fc.predict(tmp_path / "run", tmp_path / "t.h5", split="train").paths) == 60  # asked for by name
    # stdout closed at start (>&-): every command crashed (rc 120); stderr in the closed pipe lost the run
    closed = subprocess.run(f"'{sys.executable}' -m featcache info '{tmp_path / 'f.h5'}' >&-", shell=True)
    assert closed.returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "featcache", "train", str(tmp_path / "f.h5"), "--epochs", "200",
                             "--patience", "200", "--out", str(tmp_path / "piped")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    proc.stdout.read(10)  # `2>&1 | head -c 10`: the progress bar hits the closed pipe
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0 and (tmp_path / "piped" / "metrics.json").exists()


def test_small_honesty_notes(tmp_path):
    """--val-fraction given beside a val split was silently unused; one few-shot try printed std 0."""
    from featcache.evaluation import few_shot

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 4)).astype(np.float32), np.arange(90) % 3
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:50], "labels": y[:50]}, "val": {"cls": x[50:70],
                 "labels": y[50:70]}, "test": {"cls": x[70:], "labels": y[70:]}}, ["a", "b", "c"], {"model": "m"})
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "f.h5"), "--epochs", "2", "--val-fraction", "0.3"])
    assert r.exit_code == 0 and "--val-fraction was not used: validation is split 'val'" in r.output, r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "f.h5"), "--epochs", "2"])
    assert "--val-fraction was not used" not in r.output
    with fc.open(tmp_path / "f.h5") as store:
        one = few_shot(store, method="knn", shots=(2,), tries=1)
        two = few_shot(store, method="knn", shots=(2,), tries=2)
    assert one.summary[0]["top1_std"] is None and isinstance(two.summary[0]["top1_std"], float)


def test_probe_by_a_metric_undefined_on_validation_says_so():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = np.arange(120) % 2
    probe = LogisticProbe(Cs=(0.1, 1.0), metric="auroc", refit=False)
    with pytest.raises(ValueError, match="--metric auroc is undefined on the validation split at every C"):
        probe.fit(x[:80], y[:80], x[80:], np.zeros(40, int))  # numpy's "All-NaN slice encountered" before


def test_machine_readable_outputs_hold_what_the_console_says(tmp_path):
    """train printed notes its --json and metrics.json lacked; sweep --json had no threshold record;
    compare --out crashed when its metric was undefined for every file and never warned about few
    patients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 2
    g = [f"p{i % 4}" for i in range(20)]
    write_arrays(tmp_path / "f.h5", {"train": {"cls": x[:30], "labels": y[:30]}, "val": {"cls": x[30:40], "labels": y[30:40]},
                                     "test": {"cls": x[40:], "labels": y[40:], "groups": g}}, ["neg", "pos"], {"model": "m"})
    runner = CliRunner()
    r = runner.invoke(cli, ["train", str(tmp_path / "f.h5"), "--epochs", "2", "--val-fraction", "0.2", "--bootstrap", "50",
                            "--out", str(tmp_path / "t"), "--json", str(tmp_path / "t.json"), "-q"])
    assert r.exit_code == 0, r.output
    for notes in (json.loads((tmp_path / "t.json").read_text())["notes"], fc.load_run(tmp_path / "t").metrics["notes"]):
        assert any("--val-fraction was not used" in n for n in notes)
        assert any("only 4 patients (groups) to resample" in n for n in notes)
    r = runner.invoke(cli, ["sweep", str(tmp_path / "f.h5"), "--lr", "1e-3,1e-2", "--wd", "0", "--epochs", "2",
                            "--threshold", "youden", "--out", str(tmp_path / "s"), "--json", str(tmp_path / "s.json"), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["threshold"] == fc.load_run(tmp_path / "s").metrics["threshold"] and summary["positive_class"] == "pos"
    assert summary["seconds"] == fc.load_run(tmp_path / "s").metrics["seconds"] and summary["sweep_seconds"] > 0
    r = runner.invoke(cli, ["probe", str(tmp_path / "f.h5"), "--Cs", "1", "--no-refit", "--shots", "20", "--tries", "2",
                            "--json", str(tmp_path / "p.json"), "-q"])
    assert r.exit_code == 0, r.output
    probe = json.loads((tmp_path / "p.json").read_text())
    assert probe["threshold"] == {"rule": "0.5", "value": 0.5, "chosen_on": "default", "untuned": [],
                                  "untuned_why": {}}  # as train's
    assert any("fewer train rows than 20 shots" in n for n in probe["notes"]), probe["notes"]
    write_arrays(tmp_path / "v1.h5", {"train": {"cls": x[:30], "labels": y[:30]}, "val": {"cls": x[30:40],
                 "labels": np.zeros(10, int)}}, ["neg", "pos"], {"model": "m"})
    r = runner.invoke(cli, ["sweep", str(tmp_path / "v1.h5"), "--lr", "1e-3,1e-2", "--wd", "0", "--epochs", "2",
                            "--metric", "auroc", "--json", str(tmp_path / "v.json"), "-q"])
    assert r.exit_code == 0, r.output
    notes = json.loads((tmp_path / "v.json").read_text())["notes"]
    assert any("undefined for every configuration" in n for n in notes) and not any("extend --lr" in n for n in notes)
    one_class = {"train": {"cls": x[:30], "labels": y[:30]}, "test": {"cls": x[40:], "labels": np.zeros(20, int), "groups": g}}
    write_arrays(tmp_path / "a.h5", one_class, ["neg", "pos"], {"model": "m"})
    write_arrays(tmp_path / "b.h5", one_class, ["neg", "pos"], {"model": "m"})
    r = runner.invoke(cli, ["compare", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--bootstrap", "50",
                            "--out", str(tmp_path / "c"), "--json", str(tmp_path / "c.json"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "metrics.json").exists()
    compared = json.loads((tmp_path / "c.json").read_text())
    assert any("only 4 patients (groups) to resample" in n for n in compared["notes"])
    assert compared["config"]["n_units"] == 4 and compared["config"]["grouped"] is True


def test_extract_json_accounts_for_every_row_on_resume(tiny_vit, tmp_path):
    from PIL import Image

    for i in range(3):
        (tmp_path / "d" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / "d" / "a" / f"{i}.png")
    (tmp_path / "d" / "a" / "bad.png").write_bytes(b"not an image")
    args = ["extract", "--model", str(tiny_vit), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "f.h5"),
            "--workers", "0", "-q", "--json", str(tmp_path / "s.json")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert CliRunner().invoke(cli, args).exit_code == 0  # resumed: nothing to do, one row unreadable before
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["rows_failed_before"] == 1 and s["pixel_path"] is None  # nothing decoded: null, not ""
    assert s["rows_total"] == s["rows_done_before"] + s["rows_computed"] + s["rows_failed"] + s["rows_failed_before"]


def test_predict_says_what_a_file_lacks_for_the_head(tmp_path):
    """A pooled head on an import of cls only said 'use --features cls' (predict has no such option);
    a token head on a file without tokens raised AttributeError."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 3, 4)).astype(np.float32), np.arange(60) % 2
    full = {"train": {"cls": x[:40, 0], "pooled": x[:40].mean(1), "tokens": x[:40], "labels": y[:40]},
            "test": {"cls": x[40:, 0], "pooled": x[40:].mean(1), "tokens": x[40:], "labels": y[40:]}}
    write_arrays(tmp_path / "a.h5", full, ["neg", "pos"], {"model": "m"}).close()
    write_arrays(tmp_path / "b.h5", {"test": {"cls": x[40:, 0], "labels": y[40:]}}, ["neg", "pos"], {"model": "m"}).close()
    fc.train_head(tmp_path / "a.h5", features="pooled", epochs=1, out=tmp_path / "pooled")
    fc.train_head(tmp_path / "a.h5", head="mixer", epochs=1, out=tmp_path / "mixer")
    assert fc.open(tmp_path / "b.h5").fingerprint == fc.open(tmp_path / "a.h5").fingerprint
    with pytest.raises(ValueError, match=r"reads 'pooled' features, but in b.h5 split 'test' has no 'pooled'") as err:
        fc.predict(tmp_path / "pooled", tmp_path / "b.h5")
    assert "--features" not in str(err.value)
    with pytest.raises(ValueError, match="reads token sequences, but split 'test' of b.h5 stores no tokens"):
        fc.predict(tmp_path / "mixer", tmp_path / "b.h5")
    np.testing.assert_array_equal(fc.predict(tmp_path / "pooled", tmp_path / "a.h5").labels, y[40:])


def test_a_class_absent_from_test_is_said_on_the_console_with_the_macro_f1_rule(tmp_path):
    """The note on a class missing from the test split was in metrics.json only, and said the
    class entered macro F1 'only when never predicted': the opposite of the rule (scikit-learn's
    labels are those in y or predicted)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    splits = {}
    for name, n, classes in (("train", 90, 3), ("val", 30, 3), ("test", 40, 2)):
        y = np.arange(n) % classes
        splits[name] = {"cls": (centres[y] + rng.normal(size=(n, 8))).astype(np.float32), "labels": y}
    path = tmp_path / "f.h5"
    write_arrays(path, splits, ["cat", "dog", "zebra"], {"model": "m"}).close()
    for args in (["knn", str(path), "--k", "5"], ["probe", str(path), "--Cs", "1"],
                 ["train", str(path), "--epochs", "3", "-q"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert "warning: test split: classes absent from this split: zebra (left out of balanced accuracy " \
               "and AUROC; counted in macro F1 only when predicted, with F1 0" in out.output, (args, out.output)
    y = splits["test"]["labels"]
    pred = np.r_[np.zeros(39, int), [2]]   # zebra predicted once: in macro F1, as in scikit-learn
    proba = np.eye(3)[pred]
    names = ["cat", "dog", "zebra"]
    assert classification_metrics(y, proba)["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert "with F1 0: zebra predicted)" in classification_metrics(y, proba, classes=names)["notes"][0]
