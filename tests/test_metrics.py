"""Metrics against scikit-learn, undefined cases as notes, bootstrap and thresholds."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from featcache.metrics import (bootstrap_ci, choose_threshold, classification_metrics, selection_score,
                               summarize_repeats)


def _data(c: int, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.ones(c), n)
    p[np.arange(n), y] += 0.4
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [2, 3, 10])
def test_metrics_equal_scikit_learn(c):
    y, p = _data(c)
    pred = p.argmax(1)
    m = classification_metrics(y, p)
    assert m["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for i, row in enumerate(m["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((prec[i], rec[i], f1[i], sup[i]))
    # 0/0 rates are undefined (scikit-learn's zero_division=nan), not 0; MCC of one predicted class too
    one = classification_metrics(np.array([0, 0, 1, 1]), np.tile([0.9, 0.1], (4, 1)))
    prec, rec, _, _ = skm.precision_recall_fscore_support([0, 0, 1, 1], [0, 0, 0, 0], zero_division=np.nan)
    assert np.isnan(prec[1]) and one["per_class"][1]["precision"] is None and one["per_class"][1]["recall"] == 0.0
    assert one["per_class"][0]["precision"] == pytest.approx(prec[0])
    assert one["mcc"] is None and any("MCC undefined" in n for n in one["notes"])
    absent = classification_metrics(np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.1]]))
    assert absent["per_class"][1]["recall"] is None and absent["per_class"][1]["support"] == 0
    if c == 2:
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
        assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p[:, 1]))
        tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
        assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["top5"] is None
    else:
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
        assert m["auprc"] == pytest.approx(np.mean([skm.average_precision_score(y == k, p[:, k]) for k in range(c)]))
    if c == 10:
        assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=5))


def test_ece_matches_a_direct_computation():
    y, p = _data(4, seed=3)
    conf, correct = p.max(1), p.argmax(1) == y
    bins = np.linspace(0, 1, 16)
    ece = sum(((conf > lo) & (conf <= hi)).mean() * abs(correct[(conf > lo) & (conf <= hi)].mean()
                                                        - conf[(conf > lo) & (conf <= hi)].mean())
              for lo, hi in zip(bins[:-1], bins[1:]) if ((conf > lo) & (conf <= hi)).any())
    assert classification_metrics(y, p)["ece"] == pytest.approx(ece)


def test_one_class_split_says_so_instead_of_crashing():
    y = np.zeros(6, dtype=int)
    p = np.tile([0.8, 0.2], (6, 1))
    m = classification_metrics(y, p, classes=["normal", "pneumonia"])
    assert m["auroc"] is None and m["auprc"] is None and m["sensitivity"] is None
    assert m["top1"] == 1.0 and m["specificity"] == 1.0
    assert any("AUROC undefined" in n for n in m["notes"]) and any("pneumonia" in n for n in m["notes"])


def test_binary_threshold_moves_the_operating_point():
    y, p = _data(2, seed=1)
    low = classification_metrics(y, p, threshold=0.2)
    high = classification_metrics(y, p, threshold=0.8)
    assert low["sensitivity"] > high["sensitivity"] and low["specificity"] < high["specificity"]
    assert low["threshold"] == 0.2


def test_choose_threshold_youden_and_target_sensitivity():
    y, p = _data(2, seed=2)
    fpr, tpr, thr = skm.roc_curve(y, p[:, 1])
    t = choose_threshold(y, p[:, 1], "youden")
    best = np.max(tpr - fpr)
    sens, spec = (p[y == 1, 1] >= t).mean(), (p[y == 0, 1] < t).mean()
    assert sens + spec - 1 == pytest.approx(best)
    t95 = choose_threshold(y, p[:, 1], "sensitivity", target=0.95)
    assert (p[y == 1, 1] >= t95).mean() >= 0.95
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.ones(4), np.arange(4.0))


def test_multilabel_metrics_per_label_against_scikit_learn():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < [0.3, 0.1, 0.5]).astype(np.uint8)
    s = np.clip(y * 0.4 + rng.random((200, 3)) * 0.7, 0, 1)
    m = classification_metrics(y, s, classes=["effusion", "nodule", "mass"])
    for j, row in enumerate(m["per_label"]):
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y[:, j], s[:, j]))
        assert row["auprc"] == pytest.approx(skm.average_precision_score(y[:, j], s[:, j]))
        assert row["sensitivity"] == pytest.approx(skm.recall_score(y[:, j], s[:, j] >= 0.5))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    assert m["micro_auroc"] == pytest.approx(skm.roc_auc_score(y, s, average="micro"))
    y[:, 1] = 0  # a label with no positives: noted, left out of the macro average
    m = classification_metrics(y, s)
    assert m["per_label"][1]["auroc"] is None and any("no positives" in n for n in m["notes"])


def test_bootstrap_ci_contains_estimate_and_groups_widen_it():
    y, p = _data(3, n=300, seed=4)
    point = classification_metrics(y, p)
    ci = bootstrap_ci(y, p, metrics=("top1", "auroc", "macro_f1"), n_boot=300, seed=0)
    for name in ("top1", "auroc", "macro_f1"):
        assert ci[name][0] <= point[name] <= ci[name][1]
    # 30 patients with 10 near-identical images each: resampling patients gives a wider interval
    groups = np.repeat(np.arange(30), 10)
    yg, pg = y[groups], p[groups]  # each patient's images share one row of data
    flat = bootstrap_ci(yg, pg, metrics=("top1",), n_boot=300, seed=0)["top1"]
    grouped = bootstrap_ci(yg, pg, metrics=("top1",), n_boot=300, seed=0, groups=groups)["top1"]
    assert grouped[1] - grouped[0] > 1.5 * (flat[1] - flat[0])


def test_selection_score_and_repeats():
    y, p = _data(3)
    assert selection_score(y, p, "accuracy") == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert selection_score(y, p, "loss") == pytest.approx(-skm.log_loss(y, p))
    assert selection_score(y, p, "auroc") == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    with pytest.raises(ValueError, match="one of accuracy"):
        selection_score(y, p, "f2")
    s = summarize_repeats([{"top1": 0.8, "auroc": 0.9}, {"top1": 0.7, "auroc": 0.95}, {"top1": 0.9, "auroc": None}])
    assert s["top1"]["median"] == pytest.approx(0.8) and s["top1"]["std"] == pytest.approx(np.std([0.8, 0.7, 0.9]))
    assert s["auroc"]["values"] == [0.9, 0.95]


def test_selection_decides_an_exact_tie_for_the_runs_positive_class():
    """Epochs and sweep configurations were scored deciding a binary 0.5 tie as class 1 while the run's
    metrics decided it for the positive class (train's minority, maybe class 0): the leaderboard's
    val_accuracy could differ from metrics.json's val top1."""
    proba = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    y = np.array([0, 0, 1])
    top1 = classification_metrics(y, proba, classes=["pos", "neg"], positive=0)["top1"]
    assert selection_score(y, proba, "accuracy", positive=0) == top1 == 1.0
    assert selection_score(y, proba, "accuracy") == 2 / 3  # no positive class named: class 1 takes the tie


# ------------------------------------------------------------------ honest intervals of proportions

def test_sensitivity_of_few_positives_gets_an_interval_that_covers():
    """A test set of 4 positives whose true sensitivity is 0.878: the percentile bootstrap gave
    [1, 1] whenever all 4 were found (59 % of test sets), so its 95 % interval held the truth in
    about 41 % of them. Wilson's holds it in more than 90 %: exact coverage, summed over the
    binomial outcomes (no simulation noise)."""
    from scipy.stats import binom, binomtest

    from featcache.metrics import bootstrap_metrics

    true = 0.878
    coverage = 0.0
    for found in range(5):
        y = np.array([1] * 4 + [0] * 36)
        pred = np.array([1] * found + [0] * (4 - found) + [0] * 36)
        proba = np.c_[1 - pred, pred].astype(float)
        boot = bootstrap_metrics(y, proba, metrics=("sensitivity",), n_boot=200, positive=1)
        lo, hi = boot.ci["sensitivity"]
        assert (lo, hi) == pytest.approx(tuple(binomtest(found, 4).proportion_ci(method="wilson")), abs=1e-12)
        assert boot.methods == {"sensitivity": "wilson"} and boot.n_valid == {}
        coverage += binom.pmf(found, 4, true) * (lo <= true <= hi)
    assert coverage > 0.90


def test_patients_never_make_a_proportions_interval_narrower():
    """Every image twice (two views of one patient, identical outcomes): 40 rows carry the
    information of 20, and the interval by patient is no narrower than the Wilson interval of the
    20 patients (the design effect; the same as the loop reference in conftest)."""
    from scipy.stats import binomtest

    from featcache.metrics import proportion_interval
    from tests.conftest import wilson_by_patient

    hits = np.array([1] * 14 + [0] * 6, bool)
    patients = [f"p{i}" for i in range(20)]
    twice = proportion_interval(np.repeat(hits, 2), np.repeat(patients, 2).tolist())
    alone = binomtest(14, 20).proportion_ci(method="wilson")
    rows_as_independent = binomtest(28, 40).proportion_ci(method="wilson")
    assert twice[1] - twice[0] >= alone.high - alone.low > rows_as_independent.high - rows_as_independent.low
    assert twice == pytest.approx(wilson_by_patient(np.repeat(hits, 2), np.repeat(patients, 2).tolist()), abs=1e-12)
    # patients of one image each: plain Wilson; all found in 3 patients of 2 images: n counts patients
    assert proportion_interval(hits, patients) == pytest.approx(tuple(binomtest(14, 20).proportion_ci(method="wilson")))
    assert proportion_interval(np.ones(6, bool), ["a", "a", "b", "b", "c", "c"]) == pytest.approx(
        tuple(binomtest(3, 3).proportion_ci(method="wilson")))


def test_zero_width_bootstrap_intervals_and_scarce_classes_are_named():
    """4 positives perfectly separated: AUROC's bootstrap interval was [1, 1] with no warning."""
    from featcache.metrics import bootstrap_metrics

    rng = np.random.default_rng(0)
    y = np.array([0] * 36 + [1] * 4)
    score = np.where(y == 1, 3.0, 0.0) + rng.uniform(0, 0.5, 40)
    p = 1 / (1 + np.exp(-(score - 1.5)))
    boot = bootstrap_metrics(y, np.c_[1 - p, p], metrics=("auroc", "sensitivity"), n_boot=300, positive=1,
                             label_names=["normal", "pneumonia"])
    assert boot.ci["auroc"] == (1.0, 1.0) and boot.ci["sensitivity"][0] < 0.6
    text = " ".join(boot.warnings)
    assert "the auroc interval [1, 1] has zero width" in text
    assert "fewer than 10 rows of pneumonia (4 rows)" in text
    block = boot.attach({})
    assert block["bootstrap"]["methods"] == {"sensitivity": "wilson", "auroc": "bootstrap"}
    assert block["bootstrap"]["describe"] == ("95 % intervals: Wilson score for sensitivity; 300 bootstrap "
                                              "resamples for auroc")


def test_population_std_of_values_equal_up_to_rounding_is_zero():
    """knn few-shot printed balanced_accuracy_std 9.93e-17 for tries of one and the same score."""
    from featcache.metrics import population_std

    assert 0.1 + 0.2 != 0.3 and population_std([0.1 + 0.2, 0.3, 0.3]) == 0.0
    assert population_std([0.5, 0.6]) == pytest.approx(0.05) and population_std([0.7]) == 0.0


def test_a_zero_width_per_label_auroc_is_named_and_old_callers_lists_still_work():
    """Multi-label: a finding of 3 patients perfectly separated got AUROC [1, 1] with no zero-width
    line; choose_threshold_rule(untuned_out=[]) raised AttributeError after reasons were added."""
    from featcache.metrics import bootstrap_metrics, choose_threshold_rule

    rng = np.random.default_rng(2)
    y = np.zeros((60, 2), int)
    y[:6, 0] = 1
    y[:30, 1] = 1
    proba = np.c_[np.where(y[:, 0] == 1, 0.9, 0.1), np.clip(0.3 * y[:, 1] + rng.random(60) * 0.7, 0, 1)]
    boot = bootstrap_metrics(y, proba, metrics=("macro_auroc",), n_boot=200, groups=[f"p{i // 2}" for i in range(60)],
                             label_names=["rare", "common"])
    assert boot.per_label[0]["auroc"] == (1.0, 1.0)
    assert any("the label rare auroc interval [1, 1] has zero width" in w for w in boot.warnings)
    names: list[str] = []
    value = choose_threshold_rule("youden", np.zeros(10, int), np.full((10, 2), 0.5), 1, None, ["neg", "pos"], names)
    assert value == 0.5 and names == ["pos"]


def test_resamples_are_drawn_again_from_the_seed_on_every_pass():
    """The resamples were held as one list (10,000 of 50,000 rows: 4 GB); each pass over them now
    draws the same rows again from the seed, as numpy's generator drew the list."""
    from featcache.metrics import resample_indices

    rng = np.random.default_rng(7)
    expected = [rng.integers(0, 30, 30) for _ in range(5)]
    resamples = resample_indices(30, 5, None, 7)
    assert len(resamples) == 5 and not isinstance(resamples, list)
    for _ in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(resamples, expected))
    grouped = resample_indices(6, 4, ["a", "a", "b", "c", "c", "c"], 1)
    first, second = [list(map(tuple, grouped)) for _ in range(2)]
    assert first == second and all(len(ix) >= 1 for ix in first)
