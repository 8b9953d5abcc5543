"""featcache.logistic against scikit-learn and a plain-numpy objective on real data (digits)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from featcache.logistic import _Objective, cold_ladder, fit_logistic
from featcache.probe import LogisticProbe

SKLEARN_RULE = dict(rtol=None, step_tol=None)   # max |gradient| <= tol alone, as scikit-learn


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(x), y


def _numpy_objective(x, y, coef, intercept, C, weight=None):
    """scikit-learn's documented L2 objective, written out: (1/S) sum s_i loss_i + ||W||^2/(2 C S)."""
    weight = np.ones(len(y)) if weight is None else weight
    classes = np.unique(y)
    z = x @ coef.T + intercept
    if classes.size == 2:
        t = (y == classes[1]).astype(float)
        loss = np.log1p(np.exp(z[:, 0])) - t * z[:, 0]
    else:
        z = z - z.max(axis=1, keepdims=True)
        loss = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), np.searchsorted(classes, y)]
    return (weight @ loss + 0.5 * (coef ** 2).sum() / C) / weight.sum()


@pytest.mark.parametrize("task", ["multiclass", "binary", "balanced"])
def test_minimum_is_scikit_learns(digits, task):
    x, y = digits
    weight = None
    if task != "multiclass":
        y = (y == 3).astype(int)   # 10 % positives
    if task == "balanced":
        weight = compute_sample_weight("balanced", y)
    classes, index = np.unique(y, return_inverse=True)
    C = 0.5
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000,
                             class_weight="balanced" if task == "balanced" else None).fit(x, y)
    fit = fit_logistic(x, index, classes.size, C, tol=1e-9, max_iter=5000, sample_weight=weight,
                       **SKLEARN_RULE)
    assert fit.converged and fit.coef.shape == ref.coef_.shape
    np.testing.assert_allclose(fit.coef, ref.coef_, atol=2e-4)
    np.testing.assert_allclose(fit.intercept, ref.intercept_, atol=2e-4)
    # the objective it minimised is the documented one (independent numpy formula), at both points
    obj = _Objective(x, index, classes.size, weight, C)
    for coef, intercept in [(fit.coef, fit.intercept), (ref.coef_, ref.intercept_)]:
        v = np.concatenate([coef.ravel(), intercept])
        assert obj.value(v, obj.logits(v))[0] == pytest.approx(
            _numpy_objective(x, y, coef, intercept, C, weight), rel=1e-12)


def test_gradient_matches_finite_differences(digits):
    x, y = digits
    obj = _Objective(x, y, 10, None, 0.3)
    rng = np.random.default_rng(0)
    v = rng.normal(size=obj.n_coef + obj.outputs) * 0.1
    f, proba = obj.value(v, obj.logits(v))
    g = obj.data_gradient(proba) + obj.penalty_gradient(v)
    for _ in range(3):
        e = rng.normal(size=v.size)
        h = 1e-6
        fd = (obj.value(v + h * e, obj.logits(v + h * e))[0] - obj.value(v - h * e, obj.logits(v - h * e))[0]) / (2 * h)
        assert g @ e == pytest.approx(fd, rel=1e-6)


def test_float32_features_reach_the_float64_minimum(digits):
    """Logits kept in float64 let lbfgs resolve decreases that float32 logits would hide: a float32
    fit reaches max |gradient| 1e-8 and the float64 minimum (scikit-learn on float32 stops far
    earlier, which is why the probe's references are float64)."""
    x, y = digits
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000).fit(x, y)
    fit = fit_logistic(x.astype(np.float32), y, 10, 1.0, tol=1e-8, max_iter=5000, **SKLEARN_RULE)
    assert fit.stop == "gradient" and fit.max_gradient <= 1e-8
    np.testing.assert_allclose(fit.coef, ref.coef_, atol=1e-3)


def test_a_warm_start_from_a_fit_reuses_its_logits_and_lands_where_coefficients_do(digits):
    x, y = digits
    first = fit_logistic(x, y, 10, 0.01, tol=1e-6, max_iter=1000)
    from_fit = fit_logistic(x, y, 10, 0.1, tol=1e-6, max_iter=1000, init=first)
    from_coef = fit_logistic(x, y, 10, 0.1, tol=1e-6, max_iter=1000, init=(first.coef, first.intercept))
    assert from_fit.n_iter == from_coef.n_iter > 0
    assert from_fit.matmuls == from_coef.matmuls - 2   # no pass over X before the first step
    np.testing.assert_allclose(from_fit.coef, from_coef.coef, atol=1e-8)


def test_at_large_C_a_start_point_that_meets_tol_is_not_taken_as_converged(digits):
    """scikit-learn's rule alone accepts the C = 100 optimum at C = 1e4 without a step (its
    gradient there is below 1e-4); the probe's rule moves on to the C = 1e4 model."""
    x, y = digits
    at_100 = fit_logistic(x, y, 10, 100.0, tol=1e-8, max_iter=5000, **SKLEARN_RULE)
    lazy = fit_logistic(x, y, 10, 1e4, tol=1e-4, max_iter=5000, init=at_100, **SKLEARN_RULE)
    assert lazy.n_iter == 0
    honest = fit_logistic(x, y, 10, 1e4, tol=1e-4, max_iter=5000, init=at_100)
    assert honest.n_iter > 0 and honest.converged
    ref = LogisticRegression(C=1e4, tol=1e-8, max_iter=50000).fit(x, y)
    obj = _Objective(x, y, 10, None, 1e4)
    value = lambda f: obj.value(np.r_[f.coef.ravel(), f.intercept], obj.logits(np.r_[f.coef.ravel(), f.intercept]))[0]  # noqa: E731
    v_ref = obj.value(np.r_[ref.coef_.ravel(), ref.intercept_], obj.logits(np.r_[ref.coef_.ravel(), ref.intercept_]))[0]
    assert value(honest) - v_ref < 0.1 * (value(lazy) - v_ref)


def test_errors_and_unconverged_fits_are_reported(digits):
    x, y = digits
    with pytest.raises(ValueError, match="at least two classes"):
        fit_logistic(x, np.zeros(len(x), dtype=int), 1, 1.0)
    with pytest.raises(ValueError, match="parameters"):
        fit_logistic(x, y, 10, 1.0, init=(np.zeros((2, 3)), np.zeros(2)))
    short = fit_logistic(x, y, 10, 1.0, tol=1e-8, max_iter=3)
    # max_iter holds per fit; a cold fit at C = 1 climbs through the rungs 1e-2 and 0.1 first, and
    # reports the steps of all three
    assert cold_ladder(1.0) == pytest.approx([1e-2, 0.1])
    assert short.stop == "max_iter" and not short.converged and short.n_iter == 3 * 3
    # the probe says when the model it returns is not converged, and which C's were not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = LogisticProbe(Cs=[1.0, 100.0], max_iter=2).fit(x[:1000], y[:1000], x[1000:], y[1000:])
    assert not all(probe.converged_.values()) and not probe.converged_refit_
    assert any("did not converge" in str(w.message) and "max_iter" in str(w.message) for w in caught)


def test_probe_command_marks_unconverged_C_in_its_table_json_and_report(digits_feature_file, tmp_path):
    import json

    from click.testing import CliRunner

    from featcache_cli.main import cli

    run = tmp_path / "probe-run"
    result = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", "0.01,100", "--max-iter", "3",
                                      "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "converged" in result.output and "NO" in result.output
    assert "did not converge at C = " in result.output and "--max-iter" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["converged"]["100"] is False and metrics["n_iter"]["100"] == 3
    # the report shows the per-C column and the run's note
    report = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| converged |" in md and "| NO |" in md and "### Notes" in md and "did not converge" in md
    assert "did not converge" in (tmp_path / "report" / "report.html").read_text()
    ok = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", "0.01,1", "--json", "-", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "did not converge" not in ok.output
    assert all(json.loads(ok.output[ok.output.index("{"):])["converged"].values())


def test_a_fit_of_other_rows_is_a_start_point_not_a_source_of_logits(digits):
    x, y = digits
    first = fit_logistic(x[:800], y[:800], 10, 0.1, tol=1e-6)
    other = x[800:1600]   # same shape, other rows: the stored logits are not theirs
    got = fit_logistic(other, y[800:1600], 10, 0.1, tol=1e-6, init=first)
    ref = fit_logistic(other, y[800:1600], 10, 0.1, tol=1e-6, init=(first.coef, first.intercept))
    assert got.matmuls == ref.matmuls
    np.testing.assert_allclose(got.coef, ref.coef, atol=1e-10)


def test_a_fitted_probe_keeps_no_copy_of_the_data(digits):
    x, y = digits
    probe = LogisticProbe(Cs=[0.1, 1.0]).fit(x[:1000], y[:1000], x[1000:], y[1000:])
    assert probe.model_._x is None and probe.model_.fits == [] and probe.model_._gram is None
    assert probe.predict_proba(x[:5]).shape == (5, 10)


# ------------------------------------------------------------------------------------------------
# regressions found in review: cold fits at large C, refits on other data, CV with patience, float64
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_split(digits_arrays):
    """conftest's 60/20/20 digits split in float64 (the float64 test needs it)."""
    return tuple((x.astype(np.float64), y) for x, y in (digits_arrays[k] for k in ("train", "val", "test")))


def test_a_cold_fit_at_large_C_climbs_there_and_is_converged(digits):
    """From W = 0 at C = 1e4 lbfgs takes small steps in the flat directions long before the
    minimum (the objective was 25 % above it when the 'settled' test stopped it): a cold fit now
    climbs from logistic.COLD_START_C, and lands at scikit-learn's converged minimum."""
    x, y = digits
    C = 1e4
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=50000).fit(x, y)
    fit = fit_logistic(x.astype(np.float32), y, 10, C)
    f_ref = _numpy_objective(x, y, ref.coef_, ref.intercept_, C)
    assert fit.converged
    assert _numpy_objective(x, y, fit.coef, fit.intercept, C) - f_ref < 1e-3 * f_ref


def test_cv_final_model_and_refit_on_train_val_are_converged_at_large_C(digits_split):
    (x, y), (vx, vy), _ = digits_split
    sc = StandardScaler().fit(x)
    C = 1e4
    # CV selection: the final model is fitted on all of train (a cold fit)
    probe = LogisticProbe(Cs=[C], cv=3).fit(x, y)
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=50000).fit(sc.transform(x), y)
    f_ref = _numpy_objective(sc.transform(x), y, ref.coef_, ref.intercept_, C)
    m = probe.model_.models[0]
    assert probe.converged_refit_
    assert _numpy_objective(sc.transform(x), y, m.coef_, m.intercept_, C) - f_ref < 1e-3 * f_ref
    # val selection, refit on train + val (other data than the sweep's: not warm-started from it)
    probe = LogisticProbe(Cs=[C]).fit(x, y, vx, vy)
    xa, ya = sc.transform(np.concatenate([x, vx])), np.concatenate([y, vy])
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=50000).fit(xa, ya)
    f_ref = _numpy_objective(xa, ya, ref.coef_, ref.intercept_, C)
    m = probe.model_.models[0]
    assert _numpy_objective(xa, ya, m.coef_, m.intercept_, C) - f_ref < 1e-3 * f_ref


def test_cv_scores_are_means_over_every_fold_even_with_patience(digits_split):
    (x, y), _, _ = digits_split
    cs = np.logspace(-3, 3, 13)
    full = LogisticProbe(Cs=cs, cv=5).fit(x[:600], y[:600])
    short = LogisticProbe(Cs=cs, cv=5, patience=1).fit(x[:600], y[:600])
    # every C that patience scored is the all-fold mean the full grid gives for it; C's some fold
    # skipped are not scored (a mean over fewer folds would compare unlike numbers)
    assert 0 < len(short.scores_) < len(full.scores_)
    for c, s in short.scores_.items():
        assert s == pytest.approx(full.scores_[c], abs=1e-12)
    assert short.best_score_ == pytest.approx(max(short.scores_.values()))


def test_float64_features_are_centred_before_the_float32_cast(digits_split):
    """1e4 + 1e-3 * digits: in float32 the offset swamps the signal before centring (test accuracy
    fell from 0.975 to 0.908); standardising in float64 first keeps the probe's answer."""
    (x, y), (vx, vy), (sx, sy) = digits_split
    plain = LogisticProbe(Cs=[0.1, 1.0]).fit(x, y, vx, vy)
    shift = lambda a: 1e4 + 1e-3 * a  # noqa: E731
    shifted = LogisticProbe(Cs=[0.1, 1.0]).fit(shift(x), y, shift(vx), vy)
    assert shifted.best_C_ == plain.best_C_
    assert shifted.score(shift(sx), sy) == pytest.approx(plain.score(sx, sy), abs=0.005)
