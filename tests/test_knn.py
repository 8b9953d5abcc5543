"""k-NN against an independent plain-numpy DINO vote, scikit-learn, and the awkward cases."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import featcache as fc
from featcache_cli.main import cli
from tests.conftest import assert_png


def numpy_dino_knn(train_x, train_y, test_x, test_y, k, t, c):
    """DINO eval_knn written out plainly: cosine top-k, exp(sim / T) weighted one-hot votes."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b.astype(np.float64) @ a.T.astype(np.float64)
    k = min(k, len(train_y))
    top1 = top5 = 0
    for i in range(len(test_y)):
        nn = np.argsort(-sim[i], kind="stable")[:k]
        votes = np.zeros(c)
        for j in nn:
            votes[train_y[j]] += np.exp(sim[i, j] / t)
        # top-1: argmax (lowest class among ties); top-5: a class some neighbour voted for, among the
        # five highest, ties ordered as scikit-learn's top_k_accuracy_score orders them (stable
        # ascending sort, reversed); a class without a vote is never a hit (at k = 1, top-5 = top-1)
        order = np.argsort(votes, kind="mergesort")[::-1]
        top1 += np.argmax(votes) == test_y[i]
        top5 += votes[test_y[i]] > 0 and test_y[i] in order[:5]
    return top1 / len(test_y), top5 / len(test_y)


def _check(train_x, train_y, test_x, test_y, ks, t=0.07, backend="torch"):
    c = int(max(train_y.max(), test_y.max()) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fc.knn_eval(train_x, train_y, test_x, test_y, ks=ks, temperature=t, backend=backend)
    for k in ks:
        top1, top5 = numpy_dino_knn(train_x, train_y, test_x, test_y, k, t, c)
        assert got[k]["top1"] == pytest.approx(top1), k
        if c > 5:
            assert got[k]["top5"] == pytest.approx(top5), k
        else:
            assert got[k]["top5"] is None
    return got


def test_equals_numpy_dino_on_digits(digits_arrays):
    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    got = _check(x, y, tx, ty, ks=(10, 20, 100, 200))
    assert got[10]["top1"] > 0.9  # real digits are easy for k-NN even on raw pixels


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_equals_numpy_dino_on_random_data_with_37_rows_and_k_above_n_train(backend):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(150, 16)).astype(np.float32), rng.integers(0, 7, 150)
    tx, ty = rng.normal(size=(37, 16)).astype(np.float32), rng.integers(0, 7, 37)
    with pytest.warns(UserWarning, match="capped at 150"):
        fc.knn_eval(x, y, tx, ty, ks=(10, 200))
    got = _check(x, y, tx, ty, ks=(1, 10, 200), backend=backend)
    assert got[200]["k_used"] == 150 and got[200]["n_eval"] == 37


def test_binary_reports_no_top5_and_gives_auroc():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, (60, 8)), rng.normal(0.8, 1, (60, 8))].astype(np.float32)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    got = _check(x[::2], y[::2], x[1::2], y[1::2], ks=(5, 20))
    assert got[5]["top5"] is None and 0.5 < got[5]["auroc"] <= 1


def test_class_absent_from_eval_split_and_several_temperatures(digits_arrays):
    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    keep = ty != 3
    res = fc.knn_eval(x, y, tx[keep], ty[keep], ks=(10,), temperature=(0.02, 0.07, 0.5))
    assert set(res) == {0.02, 0.07, 0.5}
    for t, per_k in res.items():
        top1, _ = numpy_dino_knn(x, y, tx[keep], ty[keep], 10, t, 10)
        assert per_k[10]["top1"] == pytest.approx(top1)


def test_uniform_weighting_equals_scikit_learn(digits_arrays):
    from sklearn.neighbors import KNeighborsClassifier

    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    rng = np.random.default_rng(0)  # jitter so no two training rows tie in distance
    x = x + rng.normal(0, 1e-3, x.shape).astype(np.float32)
    res = fc.knn_eval(x, y, tx, ty, ks=(1, 5), weighting="uniform")
    for k in (1, 5):
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y)
        assert res[k]["top1"] == pytest.approx(sk.score(tx, ty), abs=2 / len(ty))  # vote ties may break differently


def test_multilabel_vote_is_the_weighted_share_of_positive_neighbours():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 6)).astype(np.float32)
    y = (x[:, :2] > 0).astype(np.uint8)  # two labels that the features predict
    res = fc.knn_eval(x[:60], y[:60], x[60:], y[60:], ks=(5,), return_proba=True)
    proba = res[5]["proba"]
    a = x[:60] / np.linalg.norm(x[:60], axis=1, keepdims=True)
    b = x[60:] / np.linalg.norm(x[60:], axis=1, keepdims=True)
    sim = b @ a.T
    for i in range(20):
        nn = np.argsort(-sim[i])[:5]
        w = np.exp(sim[i, nn] / 0.07)
        np.testing.assert_allclose(proba[i], (w[:, None] * y[:60][nn]).sum(0) / w.sum(), rtol=1e-5)
    assert res[5]["auroc"] > 0.7


def test_bad_input_errors():
    with pytest.raises(ValueError, match="one label per row"):
        fc.knn_eval(np.ones((3, 2)), [0, 1], np.ones((1, 2)), [0])
    with pytest.raises(ValueError, match="weighting"):
        fc.knn_eval(np.ones((3, 2)), [0, 1, 0], np.ones((1, 2)), [0], weighting="rank")


def test_cli_knn_table_json_and_run_dir(digits_feature_file, digits_arrays, tmp_path):
    runner = CliRunner()
    out = tmp_path / "knn.json"
    result = runner.invoke(cli, ["knn", str(digits_feature_file), "--train-split", "train", "--eval-split", "test",
                                 "--k", "10,20", "--json", str(out), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    top1, _ = numpy_dino_knn(x, y, tx, ty, 10, 0.07, 10)
    row = next(r for r in data["results"] if r["k"] == 10)
    assert row["top1"] == pytest.approx(top1)
    assert f"{row['top1']:.4f}" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["kind"] == "knn" and metrics["test"]["top1"] == pytest.approx(row["top1"])  # headline = first k, never the best on test
    assert_png(tmp_path / "run" / "figures" / "knn_curve.png")
    assert_png(tmp_path / "run" / "figures" / "confusion_matrix.png")  # of the headline k
    assert not (tmp_path / "run" / "figures" / "calibration.png").exists()  # vote shares are no probabilities
    bad = runner.invoke(cli, ["knn", str(digits_feature_file), "--eval-split", "holdout"])
    assert bad.exit_code != 0 and "it has: test, train, val" in bad.output


def test_knn_and_probe_take_a_seed_and_uniform_votes_show_no_temperature(digits_feature_file, tmp_path):
    """The README said few-shot draws are 'seeded by seed', but knn and probe had no --seed; a uniform
    vote printed a temperature column of 0.07 it does not use; equal few-shot tries had std 1e-17."""
    from featcache.evaluation import few_shot
    from featcache.store import FeatureStore

    outs = {}
    for seed in (0, 0, 5):
        r = CliRunner().invoke(cli, ["knn", str(digits_feature_file), "--k", "5", "--shots", "1", "--tries", "2",
                                     "--bootstrap", "30", "--seed", str(seed), "--json", "-", "-q"])
        assert r.exit_code == 0, r.output
        outs.setdefault(seed, []).append(r.output)
    assert outs[0][0] == outs[0][1] and outs[0][0] != outs[5][0]
    r = CliRunner().invoke(cli, ["probe", str(digits_feature_file), "--Cs", "1", "--no-refit", "--seed", "3", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["knn", str(digits_feature_file), "--k", "5", "--weighting", "uniform", "-q"])
    assert r.exit_code == 0 and "temperature" not in r.output.splitlines()[0]
    with FeatureStore(digits_feature_file) as store:  # every try draws all rows: equal values, std exactly 0
        fs = few_shot(store, method="knn", shots=(10_000,), tries=3, k=5)
        assert fs.summary[0]["top1_std"] == 0.0
        from featcache.evaluation import run_knn, run_probe

        assert run_knn(store, ks=(5,), seed=4).config["seed"] == 4  # recorded: CIs and draws depend on it
        assert run_probe(store, Cs=[1.0], refit=False, seed=4).config["seed"] == 4
