"""The logistic probe against independent scikit-learn references on real data (digits)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from featcache.probe import LogisticProbe, logistic_probe

CS = np.logspace(-4, 2, 7)  # a short grid keeps the cold-fit references fast


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # the references are tiny problems; BLAS threads only add contention on a shared machine
    with threadpool_limits(1):
        yield


def _cold_val_scores(x, y, vx, vy, cs, tol=1e-4):
    """Plain loop: standardise on train, one cold sklearn fit per C, validation accuracy."""
    sc = StandardScaler().fit(x)
    return np.array([LogisticRegression(C=c, max_iter=2000, tol=tol).fit(sc.transform(x), y)
                     .score(sc.transform(vx), vy) for c in cs])


def test_test_accuracy_matches_sklearn_at_the_same_C(digits_arrays):
    (x, y), (vx, vy), (sx, sy) = digits_arrays["train"], digits_arrays["val"], digits_arrays["test"]
    probe = LogisticProbe(Cs=CS, refit=False).fit(x, y, vx, vy)
    sc = StandardScaler().fit(x)
    ref = LogisticRegression(C=probe.best_C_, max_iter=2000).fit(sc.transform(x), y)
    assert abs(probe.score(sx, sy) - ref.score(sc.transform(sx), sy)) <= 0.01
    # at weak regularisation the optimum is flat: probabilities agree on average, not per cell
    assert np.abs(probe.predict_proba(sx) - ref.predict_proba(sc.transform(sx))).mean() < 0.01

    # default: refit on train + val at the chosen C (features standardised with the train scaler)
    refit = LogisticProbe(Cs=CS).fit(x, y, vx, vy)
    ref2 = LogisticRegression(C=refit.best_C_, max_iter=2000).fit(
        sc.transform(np.concatenate([x, vx])), np.concatenate([y, vy]))
    assert abs(refit.score(sx, sy) - ref2.score(sc.transform(sx), sy)) <= 0.01
    assert refit.score(sx, sy) > 0.9  # digits are nearly linearly separable


def test_best_C_is_chosen_on_validation_and_warm_start_picks_what_cold_fits_pick(digits_arrays):
    (x, y), (vx, vy) = digits_arrays["train"], digits_arrays["val"]
    cold = _cold_val_scores(x, y, vx, vy, CS)
    probe = LogisticProbe(Cs=CS).fit(x, y, vx, vy)
    assert probe.selection_ == "val"
    # where the fits converge to a well-defined optimum (C <= 1 here) the choice is identical
    converged = CS[CS <= 1.0]
    cold_conv = cold[CS <= 1.0]
    np.testing.assert_allclose([probe.scores_[c] for c in converged], cold_conv, atol=0.01)
    assert LogisticProbe(Cs=converged).fit(x, y, vx, vy).best_C_ == converged[int(np.argmax(cold_conv))]
    # at weak regularisation (C > 1) the optimum is flat and cold fits themselves stop at arbitrary
    # points of it (their val accuracy jumps by 1-2 %); the warm sweep still finds as good a model
    assert probe.best_score_ >= cold.max() - 0.01
    # the C grid order given by the user does not matter (the sweep sorts it ascending)
    assert LogisticProbe(Cs=CS[::-1]).fit(x, y, vx, vy).best_C_ == probe.best_C_

    # validating on the training rows themselves rewards overfitting: the largest C wins there,
    # so the choice above really came from the validation split
    in_sample = LogisticProbe(Cs=CS).fit(x, y, x, y)
    assert in_sample.best_C_ > probe.best_C_


def test_without_val_split_C_is_chosen_by_stratified_cv(digits_arrays):
    x, y = digits_arrays["train"]
    probe = LogisticProbe(Cs=CS, cv=3).fit(x, y)
    assert probe.selection_ == "cv" and probe.cv_folds_ == 3
    # reference: the same folds, a cold fit per (fold, C)
    folds = StratifiedKFold(3, shuffle=True, random_state=0).split(x, y)
    ref = np.mean([_cold_val_scores(x[tr], y[tr], x[va], y[va], CS) for tr, va in folds], axis=0)
    # (at C = 1e-4 the coefficients are so small that tol, not C, decides the argmax: skip it)
    np.testing.assert_allclose([probe.scores_[c] for c in CS[1:]], ref[1:], atol=0.01)
    assert probe.best_C_ == CS[int(np.argmax(ref))]


def test_cv_with_groups_never_splits_a_group(digits_arrays):
    x, y = digits_arrays["train"]
    groups = np.arange(len(y)) // 4  # "patients" with 4 images each
    probe = LogisticProbe(Cs=CS[:3], cv=3).fit(x, y, groups=groups)
    folds = list(StratifiedGroupKFold(3, shuffle=True, random_state=0).split(x, y, groups))
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
    ref = np.mean([_cold_val_scores(x[tr], y[tr], x[va], y[va], CS[:3]) for tr, va in folds], axis=0)
    np.testing.assert_allclose([probe.scores_[c] for c in CS[:3]], ref, atol=0.01)


def test_multilabel_is_one_vs_rest(digits_arrays):
    (x, y), (vx, vy), (sx, sy) = digits_arrays["train"], digits_arrays["val"], digits_arrays["test"]
    to_ml = lambda t: np.stack([t % 2 == 0, t > 5, t < 2], axis=1).astype(np.uint8)  # noqa: E731
    probe = LogisticProbe(Cs=CS, refit=False).fit(x, to_ml(y), vx, to_ml(vy))
    proba = probe.predict_proba(sx)
    assert proba.shape == (len(sx), 3)
    sc = StandardScaler().fit(x)
    for j in range(3):
        ref = LogisticRegression(C=probe.best_C_, max_iter=2000).fit(sc.transform(x), to_ml(y)[:, j])
        assert np.abs(proba[:, j] - ref.predict_proba(sc.transform(sx))[:, 1]).mean() < 0.01
        assert abs(np.mean((proba[:, j] >= 0.5) == to_ml(sy)[:, j])
                   - ref.score(sc.transform(sx), to_ml(sy)[:, j])) <= 0.01


def test_logistic_probe_function_reports_val_and_test(digits_arrays):
    (x, y), (vx, vy), (sx, sy) = digits_arrays["train"], digits_arrays["val"], digits_arrays["test"]
    out = logistic_probe(x, y, vx, vy, sx, sy, Cs=CS)
    assert out["best_C"] in CS
    assert out["val_accuracy"] == pytest.approx(max(out["scores"].values()))
    pred_ref = LogisticProbe(Cs=CS).fit(x, y, vx, vy).predict(sx)
    assert out["test_accuracy"] == pytest.approx(np.mean(pred_ref == sy))
    assert out["test"]["top1"] == pytest.approx(out["test_accuracy"])
    no_test = logistic_probe(x, y, vx, vy, Cs=CS[:2])
    assert no_test["test_accuracy"] is None


def test_user_errors_say_what_to_do(digits_arrays):
    x, y = digits_arrays["train"]
    bad = y.copy()
    bad[:3] = -1
    with pytest.raises(ValueError, match="unlabelled"):
        LogisticProbe(Cs=CS[:2]).fit(x, bad)
    with pytest.raises(ValueError, match="both val_x and val_y"):
        LogisticProbe(Cs=CS[:2]).fit(x, y, x)
    with pytest.raises(ValueError, match="positive"):
        LogisticProbe(Cs=[0.1, -1.0]).fit(x, y, x, y)
    with pytest.raises(ValueError, match="not fitted"):
        LogisticProbe().predict_proba(x)


def test_balanced_selection_and_class_weight_match_sklearn(digits_arrays):
    from sklearn.metrics import balanced_accuracy_score

    (x, y), (vx, vy) = digits_arrays["train"], digits_arrays["val"]
    keep = (y != 3) | (np.arange(len(y)) % 6 == 0)   # make class 3 rare (imbalanced, like lesions)
    x, y = x[keep], y[keep]
    cs = CS[CS <= 1.0]
    probe = LogisticProbe(Cs=cs, metric="balanced_accuracy", class_weight="balanced", refit=False)
    probe.fit(x, y, vx, vy)
    sc = StandardScaler().fit(x)
    ref = [balanced_accuracy_score(vy, LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
                                   .fit(sc.transform(x), y).predict(sc.transform(vx))) for c in cs]
    np.testing.assert_allclose([probe.scores_[c] for c in cs], ref, atol=0.01)
    assert ref[list(cs).index(probe.best_C_)] >= max(ref) - 0.01  # the choice is a reference near-tie


# ------------------------------------------------------------------------------------------------
# every C of the default grid is scored with a model converged at that C (issue: the C path did
# not fit large C). Reference: a converged sklearn fit per C in float64 (tol 1e-8); in float32
# sklearn's lbfgs stops after ~14 iterations at C = 1e-5 (the float32 loss cannot resolve further
# decrease) and lands up to 2 points away from the float64 optimum, so it is not a converged one.
# ------------------------------------------------------------------------------------------------

def _relu_features(x: np.ndarray) -> np.ndarray:
    """Random ReLU features of the digits (fixed-seed Gaussian projection to 256-d)."""
    w = np.random.default_rng(0).standard_normal((x.shape[1], 256)).astype(np.float32)
    return np.maximum(x @ w, 0)


def _converged_val_scores(x, y, vx, vy, cs):
    """Validation accuracy of a converged (tol 1e-8, float64) sklearn fit at every C."""
    sc = StandardScaler().fit(x.astype(np.float64))
    a, b = sc.transform(x.astype(np.float64)), sc.transform(vx.astype(np.float64))
    return np.array([LogisticRegression(C=c, tol=1e-8, max_iter=10000).fit(a, y).score(b, vy)
                     for c in cs])


@pytest.mark.parametrize("features", ["pixels", "relu"])
def test_every_C_of_the_default_grid_is_scored_with_its_own_converged_model(digits_arrays, features):
    from featcache.probe import DEFAULT_CS

    (x, y), (vx, vy) = digits_arrays["train"], digits_arrays["val"]
    if features == "relu":
        x, vx = _relu_features(x), _relu_features(vx)
    ref = _converged_val_scores(x, y, vx, vy, DEFAULT_CS)
    probe = LogisticProbe().fit(x, y, vx, vy)
    assert sorted(probe.scores_) == list(DEFAULT_CS)
    got = np.array([probe.scores_[float(c)] for c in DEFAULT_CS])
    np.testing.assert_allclose(got, ref, atol=0.01)
    # the chosen C is (near) the converged best: before the fix pixels picked C = 10, 0.84 points
    # below the converged best at C = 1
    assert ref[list(DEFAULT_CS).index(probe.best_C_)] >= ref.max() - 0.005


def test_lbfgs_iterations_per_C_are_the_iterations_run_at_that_C(digits_arrays):
    """n_iter_ counts real lbfgs iterations at each C: a warm start that is not converged at the
    new C (the previous C's W, whose gradient there exceeds the final fit's tol) iterates."""
    from featcache.probe import DEFAULT_CS

    (x, y), (vx, vy) = digits_arrays["train"], digits_arrays["val"]
    probe = LogisticProbe(refit=False).fit(x, y, vx, vy)
    sc = StandardScaler().fit(x)
    a = sc.transform(x)
    prev = None
    for c in DEFAULT_CS:
        snap = probe._snapshots.get(float(c)) if hasattr(probe, "_snapshots") else None
        assert snap is None  # snapshots are released after fit
        if prev is not None:
            # the previous C's model, re-evaluated at this C: its gradient under the final tol?
            m = LogisticRegression(C=c, tol=probe.tol, max_iter=probe.max_iter, warm_start=True)
            m.coef_, m.intercept_ = prev.coef_.copy(), prev.intercept_.copy()
            m.fit(a, y)
            if int(m.n_iter_[0]) > 0:   # not converged at c under tol: the probe must iterate
                assert probe.n_iter_[float(c)] > 0, c
        prev = LogisticRegression(C=c, tol=1e-8, max_iter=10000).fit(a, y)
    assert probe.n_iter_[float(DEFAULT_CS[6])] > 0  # C = 1 moves far from C = 0.1: iterations


def test_named_grids(digits_arrays):
    from featcache.probe import DEFAULT_CS, DINOV2_CS

    assert DINOV2_CS.size == 45 and DINOV2_CS[0] == pytest.approx(1e-6) and DINOV2_CS[-1] == pytest.approx(1e5)
    (x, y), (vx, vy) = digits_arrays["train"], digits_arrays["val"]
    probe = LogisticProbe(Cs="dinov2").fit(x[:300], y[:300], vx, vy)
    np.testing.assert_allclose(probe.Cs_, DINOV2_CS)
    np.testing.assert_allclose(LogisticProbe(Cs="default").fit(x[:300], y[:300], vx, vy).Cs_, DEFAULT_CS)
    with pytest.raises(ValueError, match="dinov2"):
        LogisticProbe(Cs="imagenet").fit(x, y, vx, vy)


def test_a_split_named_validation_is_the_validation_split(tmp_path, digits_arrays):
    """Hugging Face datasets and many folders name it "validation": every evaluator's default finds
    it instead of holding rows out of train or cross-validating."""
    from click.testing import CliRunner

    import featcache as fc
    from featcache.comparing import compare
    from featcache.evaluation import few_shot, run_probe
    from featcache.store import write_arrays
    from featcache_cli.main import cli

    renamed = {"validation" if s == "val" else s: v for s, v in digits_arrays.items()}
    path = tmp_path / "hf_like.h5"
    write_arrays(path, {s: {"cls": x, "labels": y, "paths": [f"{s}/{i}.png" for i in range(len(y))]}
                        for s, (x, y) in renamed.items()}, [str(c) for c in range(10)], {"model": "m"}).close()
    with fc.open(path) as store:
        res = run_probe(store, Cs=[0.1, 1.0])
        assert res.probe.selection_ == "val" and res.config["val_split"] == "validation"
        fs = few_shot(store, method="probe", shots=(2,), tries=1, Cs=[1.0])
        assert fs.config["val_split"] == "validation"
    head = fc.train_head(path, epochs=2)
    assert head.split_names_["val"] == "validation" and head.val_source_ == "split 'validation'"
    assert len(head.val_y_) == len(renamed["validation"][1])
    other = tmp_path / "other.h5"
    write_arrays(other, {s: {"cls": x * 2, "labels": y, "paths": [f"{s}/{i}.png" for i in range(len(y))]}
                         for s, (x, y) in renamed.items()}, [str(c) for c in range(10)], {"model": "m2"}).close()
    assert compare([path, other], bootstrap=10).config["val_split"] == "validation"
    out = CliRunner().invoke(cli, ["probe", str(path), "--Cs", "1"])
    assert out.exit_code == 0 and "cross-validation" not in out.output, out.output


def test_a_c_chosen_among_ties_is_said_to_be_a_tie(tmp_path):
    """Imbalanced binary data and the default --metric accuracy: every strongly penalised C predicts
    the majority class and scores its share, so C was 'chosen' among equals without a word."""
    from featcache.evaluation import run_probe, tied_c_notes
    from featcache.store import FeatureStore, write_arrays

    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 200), ("val", 60), ("test", 60)):
        y = (rng.random(n) < 0.1).astype(np.int64)
        splits[name] = {"cls": rng.normal(size=(n, 5)).astype(np.float32), "labels": y}  # no signal at all
    write_arrays(tmp_path / "f.h5", splits, ["normal", "finding"], {"model": "m"}).close()
    with FeatureStore(tmp_path / "f.h5") as store:
        res = run_probe(store, Cs=(1e-4, 1e-3, 1e-2, 0.1))
    scores = res.probe.scores_
    tied = [c for c, v in scores.items() if v == max(scores.values())]
    assert len(tied) >= 3 and res.probe.best_C_ == min(tied)
    assert any(f"{len(tied)} C values tie at the best validation accuracy" in n for n in res.warnings), res.warnings
    assert any("--metric auroc or balanced_accuracy" in n for n in res.warnings)
    assert tied_c_notes({0.1: 0.9, 1.0: 0.8, 10.0: 0.9}, 0.1, "accuracy") == []  # two equal are no note
    assert tied_c_notes({0.1: 1.0, 1.0: 1.0, 10.0: 1.0}, 0.1, "auroc") == []      # perfect everywhere: nothing to tell
    # never the advice to switch to the metric in use
    assert "--metric balanced_accuracy or loss" in tied_c_notes({0.1: 0.8, 1.0: 0.8, 10.0: 0.8}, 0.1, "auroc")[0]


def test_a_probe_too_large_for_memory_is_refused_before_any_work(tmp_path, monkeypatch, digits_arrays):
    """ImageNet (1.28M rows x 1,000 classes) needs >= 41 GB of float64 logits: a clear refusal
    with the way out, instead of the OOM killer minutes into the C sweep."""
    from click.testing import CliRunner

    import featcache.logistic as logistic
    from featcache.store import write_arrays
    from featcache_cli.main import cli

    with pytest.raises(ValueError, match=r"1,281,167 rows x 1,000 classes holds at least 41\.8 GiB.*"
                                         r"8\.0 GiB of memory and swap available.*train --head linear"):
        logistic.check_fits_in_memory(1_281_167, 1000, 768, available=8 * 2**30)
    logistic.check_fits_in_memory(100_000, 10, 768, available=8 * 2**30)   # 0.3 GiB: fine
    monkeypatch.setattr(logistic, "available_memory", lambda: None)
    logistic.check_fits_in_memory(10**9, 10**4, 768)                        # unknown: never refused

    path = tmp_path / "digits.h5"
    write_arrays(path, {s: {"cls": x, "labels": y} for s, (x, y) in digits_arrays.items()},
                 [str(c) for c in range(10)], {"model": "m"}).close()
    (tx, ty), (vx, _) = digits_arrays["train"], digits_arrays["val"]
    need = logistic.PEAK_LOGIT_ARRAYS * (len(ty) + len(vx)) * 10 * 8 + (len(ty) + len(vx)) * tx.shape[1] * 4
    monkeypatch.setattr(logistic, "available_memory", lambda: need - 1)
    fits = []
    monkeypatch.setattr("featcache.probe.fit_logistic", lambda *a, **k: fits.append(1))
    out = CliRunner().invoke(cli, ["probe", str(path), "--Cs", "1"])
    assert out.exit_code != 0 and "holds at least" in out.output and "Traceback" not in out.output, out.output
    assert fits == []   # refused before the first fit
    monkeypatch.undo()
    monkeypatch.setattr(logistic, "available_memory", lambda: need)   # exactly enough: it runs
    assert LogisticProbe(Cs=[1.0]).fit(tx, ty, vx, digits_arrays["val"][1]).best_C_ == 1.0


def test_a_fit_does_not_change_the_logits_of_its_init(digits_arrays):
    """The trial-logit buffers are reused in place; a LogisticFit passed as init keeps its own."""
    from featcache.logistic import fit_logistic

    x, y = digits_arrays["train"]
    x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
    first = fit_logistic(x, y, 10, 0.01)
    kept = first.logits.copy()
    second = fit_logistic(x, y, 10, 0.1, init=first)
    assert np.array_equal(first.logits, kept)
    np.testing.assert_allclose(second.logits, x.astype(np.float64) @ second.coef.T + second.intercept,
                               rtol=1e-4, atol=1e-4)
