"""Trainer, sweep and predict on cached features, against scikit-learn and each other."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache as fc
from featcache.store import write_arrays
from featcache_cli.main import cli
from tests.conftest import assert_png


def test_linear_head_reaches_logistic_regression(digits_feature_file, digits_arrays):
    from sklearn.linear_model import LogisticRegression

    t = fc.train_head(digits_feature_file, head="linear", lr=1e-2, epochs=200, patience=20)
    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    sk = LogisticRegression(max_iter=2000).fit(x, y).score(tx, ty)
    assert t.test_metrics_["top1"] >= sk - 0.02
    assert t.num_params_ == 64 * 10 + 10 and t.val_source_ == "split 'val'"


def test_sweep_matches_each_config_trained_alone(digits_feature_file):
    grid = dict(lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-2), features=("cls", "cls+pooled"))
    result = fc.sweep(digits_feature_file, epochs=40, patience=5, **grid)
    assert result.fused and len(result.leaderboard) == 8
    for row in result.leaderboard:
        alone = fc.train_head(digits_feature_file, lr=row["lr"], weight_decay=row["weight_decay"],
                              features=row["features"], epochs=40, patience=5)
        assert abs(alone.best_score_ - row["val_accuracy"]) <= 0.005
        assert alone.best_epoch_ == row["best_epoch"]
        # every configuration's history is the one it has alone (float32 sums in another order)
        fused = result.histories[row["config"]]
        assert [h["epoch"] for h in fused] == [h["epoch"] for h in alone.history_], row
        np.testing.assert_allclose([h["train_loss"] for h in fused], [h["train_loss"] for h in alone.history_],
                                   rtol=1e-4)
        np.testing.assert_allclose([h["val_accuracy"] for h in fused], [h["val_accuracy"] for h in alone.history_],
                                   atol=0.005)
    assert result.trainer.history_ == result.histories[result.best["config"]] and result.trainer.seconds_ > 0
    scores = [r["val_accuracy"] for r in result.leaderboard]
    assert scores == sorted(scores, reverse=True) and result.best is result.leaderboard[0]


def test_sweep_picks_by_validation_never_by_test(tmp_path):
    """Two feature choices: cls predicts val and pooled predicts test; the pick must follow val."""
    rng = np.random.default_rng(0)

    def split(n, cls_informative):
        y = rng.integers(0, 2, n)
        signal = (y * 2 - 1)[:, None] * 2.0 + rng.normal(size=(n, 4))
        noise = rng.normal(size=(n, 4))
        cls, pooled = (signal, noise) if cls_informative else (noise, signal)
        return {"cls": cls.astype(np.float32), "pooled": pooled.astype(np.float32), "labels": y}

    path = tmp_path / "trap.h5"
    write_arrays(path, {"train": {**split(200, True), "pooled": rng.normal(size=(200, 4)).astype(np.float32)},
                        "val": split(100, True), "test": split(100, False)}, ["a", "b"], {"model": "trap"})
    result = fc.sweep(path, lrs=(1e-2,), weight_decays=(0.0,), features=("cls", "pooled"), epochs=30)
    assert result.best["features"] == "cls"
    assert result.trainer.test_metrics_["top1"] < 0.7  # test would have preferred pooled: it was not asked


def test_standardize_helps_badly_scaled_features(digits_arrays, tmp_path):
    (x, y), (vx, vy), (tx, ty) = (digits_arrays[k] for k in ("train", "val", "test"))
    scale = np.logspace(-3, 2, x.shape[1]).astype(np.float32)  # features on wildly different scales
    path = tmp_path / "scaled.h5"
    write_arrays(path, {k: {"cls": a * scale, "labels": b} for k, (a, b) in
                        {"train": (x, y), "val": (vx, vy), "test": (tx, ty)}.items()}, [str(i) for i in range(10)],
                 {"model": "scaled"})
    raw = fc.train_head(path, lr=1e-2, epochs=20, standardize=False)
    std = fc.train_head(path, lr=1e-2, epochs=20)
    assert std.test_metrics_["top1"] > raw.test_metrics_["top1"] + 0.05 and std.test_metrics_["top1"] > 0.9
    mean = x.mean(0) * scale
    np.testing.assert_allclose(std.feature_mean_.numpy(), mean, rtol=1e-4, atol=1e-6)


def test_early_stopping_keeps_the_best_epoch(digits_feature_file):
    t = fc.train_head(digits_feature_file, lr=3e-2, epochs=60, patience=3)
    scores = [h["val_accuracy"] for h in t.history_]
    assert t.best_epoch_ == int(np.argmax(scores))
    assert len(scores) <= t.best_epoch_ + 1 + 3
    assert t.val_metrics_["top1"] == pytest.approx(max(scores))


def test_no_val_split_holds_out_from_train(digits_arrays, tmp_path):
    (x, y), (tx, ty) = digits_arrays["train"], digits_arrays["test"]
    path = tmp_path / "noval.h5"
    write_arrays(path, {"train": {"cls": x, "labels": y, "groups": [f"p{i // 3}" for i in range(len(y))]},
                        "test": {"cls": tx, "labels": ty}}, [str(i) for i in range(10)], {"model": "d"})
    t = fc.train_head(path, lr=1e-2, epochs=20)
    assert "held out from 'train' by group" in t.val_source_
    assert t.val_metrics_["n"] == pytest.approx(0.1 * len(y), abs=6)


@pytest.mark.parametrize("head", ["mixer", "attn"])
def test_token_heads_learn_and_streaming_equals_in_memory(token_file, head):
    kw = dict(head=head, lr=3e-3, epochs=8, patience=8, batch_size=32, dropout=0.0)
    in_memory = fc.train_head(token_file, **kw)
    streamed = fc.train_head(token_file, max_memory_gb=1e-9, **kw)
    again = fc.train_head(token_file, max_memory_gb=1e-9, **kw)
    assert streamed.streamed_ and not in_memory.streamed_
    # streamed batches come in another (block-shuffled) order, so not the same numbers as in
    # memory; but both learn the planted signal, and streaming is deterministic for a seed
    assert in_memory.test_metrics_["top1"] > 0.6 and streamed.test_metrics_["top1"] > 0.5   # chance: 1/3
    np.testing.assert_array_equal(streamed.test_proba_, again.test_proba_)
    # both standardise with the same train statistics (streamed: accumulated block by block)
    np.testing.assert_allclose(streamed.feature_mean_.numpy(), in_memory.feature_mean_.numpy(), atol=1e-5)


def _imbalanced_file(tmp_path) -> tuple:
    """8 % positives ("pos" vs "neg"), 6 features shifted by 1.2 for positives; 1200/400/400 rows."""
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.08).astype(int)
    x = (rng.normal(size=(2000, 6)) + y[:, None] * 1.2).astype(np.float32)
    path = tmp_path / "imb.h5"
    write_arrays(path, {"train": {"cls": x[:1200], "labels": y[:1200]}, "val": {"cls": x[1200:1600], "labels": y[1200:1600]},
                        "test": {"cls": x[1600:], "labels": y[1600:]}}, ["neg", "pos"], {"model": "imb"})
    return path, y


def test_balanced_sampler_and_weights_on_imbalanced_data(tmp_path):
    """8 % positives: unbalanced training at threshold 0.5 misses positives; class weights and
    balanced batches find strictly more of them, on val and on test (selection by loss, so the
    comparison is not decided by which epoch early stopping keeps)."""
    path, y = _imbalanced_file(tmp_path)
    plain = fc.train_head(path, lr=1e-2, epochs=30, balance="none", metric="loss")
    for balance in ("weights", "sampler"):
        t = fc.train_head(path, lr=1e-2, epochs=30, balance=balance, metric="loss")
        assert t.val_metrics_["sensitivity"] > plain.val_metrics_["sensitivity"] + 0.1
        assert t.test_metrics_["balanced_accuracy"] > plain.test_metrics_["balanced_accuracy"]


def test_cli_train_sweep_predict_and_refusal(digits_feature_file, tmp_path, digits_arrays):
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(cli, ["train", str(digits_feature_file), "--head", "mlp", "--epochs", "5", "--hidden", "32",
                            "--out", str(run), "--json", str(tmp_path / "t.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_params"] == 64 * 32 + 32 + 32 * 10 + 10 and {"val", "test"} <= set(metrics)
    assert len(json.loads((run / "history.json").read_text())) >= 1 and (run / "head.safetensors").exists()
    s = runner.invoke(cli, ["sweep", str(digits_feature_file), "--lr", "1e-3,1e-2", "--wd", "0", "--features",
                            "cls,pooled", "--epochs", "5", "--out", str(tmp_path / "sweep"), "--quiet"])
    assert s.exit_code == 0, s.output
    assert "4 linear heads" in s.output and "one batched model" in s.output
    assert (tmp_path / "sweep" / "figures" / "sweep_cls.png").exists()
    sweep_metrics = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    best = json.loads((tmp_path / "sweep" / "history.json").read_text())
    every = json.loads((tmp_path / "sweep" / "sweep_history.json").read_text())
    assert len(best) == 5 and [h["epoch"] for h in best] == list(range(5))  # the fused linear sweep's was []
    assert sorted(r["rank"] for r in every) == [1, 2, 3, 4] and all(len(r["history"]) == 5 for r in every)
    assert next(r["history"] for r in every if r["rank"] == 1) == best
    assert sweep_metrics["seconds"] > 0
    p = runner.invoke(cli, ["predict", str(run), str(digits_feature_file), "--split", "test",
                            "--out", str(tmp_path / "preds.csv")])
    assert p.exit_code == 0, p.output
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert len(rows) == len(digits_arrays["test"][1])
    assert list(rows[0]) == ["image_path"] + [f"prob_{i}" for i in range(10)] + ["label", "prediction"]
    probs = np.array([[float(r[f"prob_{i}"]) for i in range(10)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert [r["prediction"] for r in rows] == [str(i) for i in probs.argmax(1)]
    # the checkpoint's feature standardisation is applied: predict reproduces the trainer's test accuracy
    accuracy = np.mean([r["prediction"] == r["label"] for r in rows])
    assert accuracy == pytest.approx(metrics["test"]["top1"])
    other = tmp_path / "other.h5"
    x, y = digits_arrays["test"]
    write_arrays(other, {"test": {"cls": x, "pooled": x, "labels": y}}, [str(i) for i in range(10)], {"model": "another-vit"})
    refused = runner.invoke(cli, ["predict", str(run), str(other), "--out", str(tmp_path / "x.csv")])
    assert refused.exit_code != 0 and "another-vit" in refused.output and "digits-pixels" in refused.output
    # the same model with one other setting: the refusal says which (read from the training file)
    same = tmp_path / "same_model.h5"
    with fc.open(digits_feature_file) as original:
        config = {k: v for k, v in original.config.items() if k not in ("versions", "created", "host")}
    write_arrays(same, {"test": {"cls": x, "pooled": x, "labels": y}}, [str(i) for i in range(10)],
                 {**config, "dtype": "float16"})
    refused = runner.invoke(cli, ["predict", str(run), str(same), "--out", str(tmp_path / "y.csv")])
    assert refused.exit_code != 0 and "they differ in: dtype (" in refused.output and "-> \"float16\")" in refused.output


def test_binary_predictions_csv(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 120)
    x = (rng.normal(size=(120, 4)) + y[:, None]).astype(np.float32)
    path = tmp_path / "bin.h5"
    write_arrays(path, {"train": {"cls": x[:80], "labels": y[:80]}, "val": {"cls": x[80:100], "labels": y[80:100]},
                        "test": {"cls": x[100:], "labels": y[100:], "paths": [f"img{i}.png" for i in range(20)]}},
                 ["normal", "pneumonia"], {"model": "b"})
    fc.train_head(path, epochs=10, out=tmp_path / "run", positive_class="pneumonia")
    for fig in ("confusion_matrix", "roc_pr", "calibration"):
        assert_png(tmp_path / "run" / "figures" / f"{fig}.png")
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run"), str(path), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["image_path", "probability", "label", "prediction"]
    assert rows[0]["image_path"] == "img0.png" and rows[0]["label"] in ("normal", "pneumonia")
    assert all((float(r["probability"]) >= 0.5) == (r["prediction"] == "pneumonia") for r in rows)


def test_cli_train_repeats_and_bootstrap(digits_feature_file, tmp_path):
    out = tmp_path / "rep.json"
    r = CliRunner().invoke(cli, ["train", str(digits_feature_file), "--head", "mlp", "--hidden", "16", "--epochs", "4",
                                 "--repeats", "3", "--seed", "5", "--bootstrap", "200", "--json", str(out),
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "test over 3 seeds (5..7): median ± std" in r.output and "test 95% CI" in r.output
    data = json.loads(out.read_text())
    alone = [fc.train_head(digits_feature_file, head="mlp", hidden=16, epochs=4, seed=s).test_metrics_["top1"]
             for s in (5, 6, 7)]
    assert data["repeats"]["test"]["top1"]["values"] == pytest.approx(alone)
    assert data["repeats"]["test"]["top1"]["median"] == pytest.approx(np.median(alone))
    assert data["repeats"]["test"]["top1"]["std"] == pytest.approx(np.std(alone))
    low, high = data["test"]["ci"]["top1"]
    assert low <= data["test"]["top1"] <= high
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["repeats"]["seeds"] == [5, 6, 7] and "ci" in saved["test"]


def test_threshold_chosen_on_validation_is_applied_to_test(tmp_path):
    from featcache.metrics import choose_threshold, classification_metrics

    rng = np.random.default_rng(3)
    y = (rng.random(600) < 0.2).astype(int)
    x = (rng.normal(size=(600, 5)) + y[:, None] * 0.8).astype(np.float32)
    path = tmp_path / "thr.h5"
    write_arrays(path, {"train": {"cls": x[:400], "labels": y[:400]}, "val": {"cls": x[400:500], "labels": y[400:500]},
                        "test": {"cls": x[500:], "labels": y[500:]}}, ["normal", "disease"], {"model": "t"})
    t = fc.train_head(path, lr=1e-2, epochs=10)
    chosen = t.apply_threshold("sensitivity:0.9")
    assert chosen == pytest.approx(choose_threshold(t.val_y_, t.val_proba_[:, 1], "sensitivity", 0.9))
    assert t.val_metrics_["sensitivity"] >= 0.9 and t.test_metrics_["threshold"] == chosen
    ref = classification_metrics(t.test_y_, t.test_proba_, threshold=chosen)
    assert t.test_metrics_["specificity"] == pytest.approx(ref["specificity"])
    r = CliRunner().invoke(cli, ["train", str(path), "--epochs", "10", "--lr", "1e-2", "--threshold", "youden", "--quiet"])
    assert r.exit_code == 0 and "threshold (youden, chosen on validation): " in r.output


def test_arrays_in_equal_the_same_arrays_imported_into_a_file(digits_arrays, tmp_path):
    """fc.train_head and fc.sweep take {"train": (X, y), ...} as they take a file: same numbers."""
    arrays = {k: (x, y) for k, (x, y) in digits_arrays.items()}
    path = tmp_path / "same.h5"
    write_arrays(path, {k: {"cls": x, "labels": y} for k, (x, y) in arrays.items()}, [str(i) for i in range(10)],
                 {"model": "arrays"})
    from_arrays = fc.train_head(arrays, lr=1e-2, epochs=8)
    from_file = fc.train_head(path, lr=1e-2, epochs=8)
    assert from_arrays.best_epoch_ == from_file.best_epoch_
    assert from_arrays.test_metrics_["top1"] == from_file.test_metrics_["top1"]
    np.testing.assert_array_equal(from_arrays.test_proba_, from_file.test_proba_)
    with fc.open(path) as store:  # an open FeatureStore works too
        s_store = fc.sweep(store, lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=5)
    s_arrays = fc.sweep(arrays, lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=5)
    assert [r["val_accuracy"] for r in s_arrays.leaderboard] == [r["val_accuracy"] for r in s_store.leaderboard]
    with pytest.raises(ValueError, match="expected"):
        fc.train_head({"train": "not arrays", "val": (arrays["val"])})


def test_a_head_that_did_not_learn_is_flagged(tmp_path):
    """Validation flat from the first epoch (a far too small lr), and accuracy below always
    predicting the majority class (class weights on 8 % positives, chosen by plain accuracy):
    both are said, not left as a plausible-looking number."""
    path, y = _imbalanced_file(tmp_path)
    majority = 1 - y[1200:1600].mean()
    stuck = fc.train_head(path, lr=1e-9, epochs=6, patience=3, balance="weights", metric="accuracy")
    assert stuck.best_epoch_ == 0 and stuck.best_score_ < majority
    assert any("never improved after the first epoch" in n and "raise --lr" in n for n in stuck.notes_)
    assert any(f"below the {majority:.4f} of always predicting 'neg'" in n and "--metric balanced_accuracy" in n
               for n in stuck.notes_)
    good = fc.train_head(path, lr=1e-2, epochs=20, balance="none", metric="accuracy")
    assert good.best_score_ >= majority
    assert not any("never improved" in n or "always predicting" in n for n in good.notes_)


def test_a_feature_of_tiny_scale_is_standardised_not_taken_for_constant(tmp_path):
    """Any train std at or below an absolute 1e-6 was 'constant' (std 1): the one informative feature of a
    small-norm backbone (std 2e-7) stayed at 1e-7 and the head scored AUROC 0.47, where StandardScaler
    + logistic regression reach 0.95; a relative rule then took two values 1000.000 / 1000.001 for
    constant. Constant now means every train value equal."""
    from featcache.cached_splits import unit_where_constant

    std = unit_where_constant(torch.tensor([2.2e-7, 0.0, 1e-9, 3.0]), torch.tensor([False, False, True, False]))
    assert std.tolist() == [pytest.approx(2.2e-7), 1.0, 1.0, 3.0]
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 200), ("val", 60), ("test", 60)):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] = (rng.normal(size=n) + 4 * y) * 1e-7
        x[:, 1] = np.where(y == 1, np.float32(1000.001), np.float32(1000.0))  # two values on a large offset
        x[:, 2] = -7.77  # truly constant: std 1
        splits[name] = {"cls": x, "labels": y}
    write_arrays(tmp_path / "tiny.h5", splits, ["n", "p"], {"model": "m"}).close()
    t = fc.train_head(tmp_path / "tiny.h5", lr=1e-2, epochs=40, batch_size=32)
    train_x = splits["train"]["cls"]
    for j in (0, 1):  # as StandardScaler (ddof 1 here), not taken for constant
        assert float(t.feature_std_[j]) == pytest.approx(np.std(train_x[:, j].astype(np.float64), ddof=1), rel=1e-3)
    assert float(t.feature_std_[2]) == 1.0
    assert t.test_metrics_["auroc"] > 0.9


def test_a_feature_constant_on_train_is_not_blown_up_at_test_time(tmp_path):
    """A dead unit (0 on every train row, 0.01 on some test rows) is standardised with std 1, as
    scikit-learn's StandardScaler does, not divided by a clamped 1e-6 into z-scores of 1e4 that
    an untrained weight then turns into the prediction."""
    rng = np.random.default_rng(0)
    n = 900
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 7)) + y[:, None] * 1.0).astype(np.float32)
    dead = np.zeros((n, 1), np.float32)
    dead[600:][rng.random(300) < 0.3] = 0.01
    x = np.hstack([x, dead])
    path = tmp_path / "dead.h5"
    write_arrays(path, {"train": {"cls": x[:450], "labels": y[:450]}, "val": {"cls": x[450:600], "labels": y[450:600]},
                        "test": {"cls": x[600:], "labels": y[600:]}}, ["a", "b"], {"model": "m"})
    t = fc.train_head(path, epochs=30, lr=1e-2)
    assert float(t.feature_std_[-1]) == 1.0 and float(t.feature_std_[0]) != 1.0
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[:450])
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x[:450]), y[:450])
    ref_acc = ref.score(scaler.transform(x[600:]), y[600:])
    assert t.test_metrics_["top1"] > ref_acc - 0.03, (t.test_metrics_["top1"], ref_acc)


def test_balanced_sampler_on_streamed_tokens_is_refused(token_file):
    with pytest.raises(ValueError, match="--balance sampler .* streamed from disk .* --balance weights"):
        fc.train_head(token_file, head="mixer", epochs=1, balance="sampler", max_memory_gb=1e-9)


def test_held_out_validation_of_a_multilabel_file_keeps_rare_findings(tmp_path):
    """Without a val split, rows are held out stratified by each row's rarest finding (as
    `featcache split` does), not by its first positive column: a 1 % finding still has positives
    in the held-out validation rows."""
    rng = np.random.default_rng(0)
    n = 2000
    y = (rng.random((n, 4)) < [0.4, 0.2, 0.05, 0.01]).astype(np.uint8)
    x = (rng.normal(size=(n, 6)) + y @ rng.normal(size=(4, 6))).astype(np.float32)
    path = tmp_path / "ml.h5"
    write_arrays(path, {"train": {"cls": x, "labels": y}}, ["f0", "f1", "f2", "f3"], {"model": "m"})
    for seed in range(12):
        t = fc.train_head(path, epochs=1, seed=seed)
        held = np.asarray(t.val_y_)
        expected = y.sum(axis=0) * len(held) / n
        deviation = np.abs(held.sum(axis=0) - expected)
        # by the first positive column, the rare findings drifted by up to 2 (f3) and 5 (f2) rows
        assert deviation[3] <= 1.0 and deviation[2] <= 1.5 and held[:, 3].sum() >= 1, (seed, deviation)


def test_a_sweeps_best_head_is_flagged_like_a_head_trained_alone(tmp_path):
    path, y = _imbalanced_file(tmp_path)
    for head in ("mlp", "linear"):
        result = fc.sweep(path, head=head, lrs=(1e-9, 2e-9), weight_decays=(0.0,), epochs=6, patience=3)
        notes = result.trainer.notes_
        assert any("always predicting 'neg'" in n for n in notes), (head, notes)
        if head == "mlp":  # the fused mlp sweep keeps the best configuration's history
            assert any("never improved after the first epoch" in n for n in notes), notes


def test_weighted_train_loss_is_the_epochs_weighted_loss(tmp_path):
    """With class weights each batch's mean loss divides by its rows' weights; the epoch's train_loss
    averaged those means by row count, which is neither the weighted nor the plain epoch loss."""
    from torch import nn

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(np.int64)
    x = (rng.normal(size=(300, 5)) + y[:, None]).astype(np.float32)
    write_arrays(tmp_path / "w.h5", {"train": {"cls": x[:200], "labels": y[:200]}, "val": {"cls": x[200:], "labels": y[200:]}},
                 ["a", "b"], {"model": "m"}).close()
    t = fc.train_head(tmp_path / "w.h5", lr=1e-12, epochs=1, batch_size=32)  # weights do not move in one epoch
    xs = torch.from_numpy(x[:200])
    z = (xs - xs.mean(0)) / xs.std(0)
    torch.manual_seed(0)
    head = nn.Linear(5, 2)
    counts = np.bincount(y[:200], minlength=2)
    weight = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32)
    ref = nn.CrossEntropyLoss(weight=weight)(head(z), torch.from_numpy(y[:200])).item()
    assert t.history_[0]["train_loss"] == pytest.approx(ref, rel=1e-5)
    res = fc.sweep(tmp_path / "w.h5", lrs=1e-12, weight_decays=0.0, epochs=1, batch_size=32)  # the fused path alike
    assert res.histories[0][0]["train_loss"] == pytest.approx(ref, rel=1e-5)


def test_a_perfect_first_epoch_is_not_called_a_head_that_does_not_learn(tmp_path):
    """Validation accuracy 1.0 at epoch 0 cannot be bettered, yet the note said 'may not be learning; raise --lr'."""
    rng = np.random.default_rng(1)
    y = np.arange(200) % 2
    x = (rng.normal(size=(200, 4)) * 0.1 + 5 * y[:, None]).astype(np.float32)
    write_arrays(tmp_path / "easy.h5", {"train": {"cls": x[:150], "labels": y[:150]}, "val": {"cls": x[150:], "labels": y[150:]}},
                 ["a", "b"], {"model": "m"}).close()
    t = fc.train_head(tmp_path / "easy.h5", lr=1e-2, epochs=5, patience=2)
    assert t.best_epoch_ == 0 and t.best_score_ == 1.0
    assert not any("never improved" in n for n in t.notes_), t.notes_


def test_early_stopping_after_a_handful_of_steps_is_said(tmp_path):
    """179 train rows at the default batch 256 are one optimizer step per epoch: early stopping
    ended a head after ~30 steps (test AUROC 0.49 where a probe reached 0.94) with no word of it."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 260)
    x = rng.normal(size=(260, 8)).astype(np.float32)
    x[:, 0] += 2.0 * y
    cut = {"train": slice(0, 180), "val": slice(180, 220), "test": slice(220, 260)}
    path = tmp_path / "small.h5"
    write_arrays(path, {k: {"cls": x[s], "labels": y[s]} for k, s in cut.items()}, ["a", "b"], {"model": "m"}).close()
    t = fc.train_head(path, lr=1e-4, epochs=200, patience=5)
    steps = len(t.history_)  # one step per epoch
    assert steps < 100 and steps < 200
    assert any(f"early stopping ended training after {steps} optimizer step(s)" in n and "--batch-size 256" in n
               for n in t.notes_), t.notes_
    many = fc.train_head(path, lr=1e-4, epochs=200, patience=5, batch_size=8)  # 23 steps per epoch
    assert not any("optimizer step(s) in all" in n for n in many.notes_)
    from featcache.train import learning_notes

    history = [{"epoch": e} for e in range(15)]  # a perfect validation score stops early rightly
    assert not any("optimizer step(s)" in n for n in learning_notes(history, 5, 1.0, "auroc", np.array([0, 1]),
                                                                     ["a", "b"], 2, 256, 200))
    for head in ("linear", "mlp"):  # the analytic linear path and the vmapped one
        res = fc.sweep(path, head=head, hidden=8, lrs=(1e-5, 1e-4), weight_decays=(0.0,), epochs=200, patience=5)
        assert any("configurations were stopped early after fewer than 100 optimizer steps (1 per epoch at "
                   "--batch-size 256" in n for n in res.notes), res.notes


def test_a_threshold_tuned_on_few_validation_positives_is_said_to_be_uncertain(tmp_path):
    """Youden's threshold chosen on 6 validation positives from 2 patients gave a test sensitivity
    of 0.18 at AUROC 0.94, with no word that the threshold itself rests on so few."""
    rng = np.random.default_rng(1)
    splits = {}
    for name, n, n_pos in (("train", 200, 40), ("val", 60, 6), ("test", 60, 12)):
        y = np.r_[np.ones(n_pos, np.int64), np.zeros(n - n_pos, np.int64)]
        x = rng.normal(size=(n, 6)).astype(np.float32)
        x[:, 0] += 1.5 * y
        groups = [f"{name}-p{i // 3}" for i in range(n)]  # 3 images per patient: 6 positives = 2 patients
        splits[name] = {"cls": x, "labels": y, "groups": groups}
    path = tmp_path / "f.h5"
    write_arrays(path, splits, ["normal", "nodule"], {"model": "m"}).close()
    for argv in (["train", str(path), "--threshold", "youden", "--epochs", "5", "--batch-size", "32"],
                 ["probe", str(path), "--threshold", "sensitivity:0.9", "--no-refit", "--Cs", "0.1,1"]):
        r = CliRunner().invoke(cli, [*argv, "--json", str(tmp_path / "r.json"), "-q"])
        assert r.exit_code == 0, r.output
        notes = json.loads((tmp_path / "r.json").read_text())["notes"]
        assert any("was tuned on few validation cases (positive class nodule: 2 positive patients" in n
                   for n in notes), notes
        assert "chosen on validation)" in r.output  # the console says where the threshold came from (probe did not)
    fixed = CliRunner().invoke(cli, ["train", str(path), "--threshold", "0.3", "--epochs", "2", "--json", "-", "-q"])
    assert "tuned on few" not in fixed.output  # a number given is no tuning


def test_the_few_cases_note_of_many_findings_stays_one_readable_line():
    from featcache.metrics import choose_threshold_rule

    rng = np.random.default_rng(0)
    y = (rng.random((40, 8)) < 0.1).astype(np.uint8)
    y[0] = 1  # every finding has a positive (and negatives): each is tuned, on a handful of positives
    notes: list[str] = []
    choose_threshold_rule("youden", y, rng.random((40, 8)), None, notes, [f"f{j}" for j in range(8)])
    few = [n for n in notes if "tuned on few validation cases" in n]
    assert len(few) == 1 and "label f0:" in few[0] and "; and 3 more;" in few[0] and "label f7" not in few[0]


def test_repeats_keep_the_notes_of_every_seed(monkeypatch):
    """Only the first seed's notes were printed and saved: 'best epoch is the last' in seeds 1 and 2
    of three said nothing."""
    from types import SimpleNamespace

    import featcache.train as train_module

    notes = {0: ["shared"], 1: ["shared", "best epoch is the last one"], 2: ["best epoch is the last one", "other"]}

    def fake(features_file, head="linear", seed=0, progress=False, **options):
        return SimpleNamespace(notes_=list(notes[seed]), val_metrics_={"top1": 0.5 + seed / 10}, test_metrics_=None)

    monkeypatch.setattr(train_module, "train_head", fake)
    trainers, summary = train_module.train_repeats("f.h5", 3)
    assert trainers[0].notes_ == ["shared", "seeds 1, 2: best epoch is the last one", "seed 2: other"]
    assert summary["seeds"] == [0, 1, 2]


def test_streamed_token_statistics_keep_the_precision_of_features_far_from_zero(tmp_path):
    """Streamed std was mean of squares minus squared mean: 1000 +- 0.001 came out 1e-4 off (in
    memory 4e-8), and full-batch probabilities moved by 0.03 between the two paths."""
    from featcache.cached_splits import feature_stats, load_cached_splits
    from featcache.store import FeatureStore, write_arrays

    rng = np.random.default_rng(0)
    n, t, d = 3000, 5, 4
    tokens = (rng.normal(size=(n, t, d)) * [1e-3, 1.0, 0.05, 10.0] + [1000.0, 0.0, 3e4, -5.0]).astype(np.float32)
    y = np.arange(n) % 2
    write_arrays(tmp_path / "t.h5", {"train": {"cls": tokens[:, 0], "tokens": tokens, "labels": y},
                                     "val": {"cls": tokens[:50, 0], "tokens": tokens[:50], "labels": y[:50]}},
                 ["a", "b"], {"model": "m"}).close()
    flat = tokens.reshape(-1, d).astype(np.float64)
    with FeatureStore(tmp_path / "t.h5") as store:
        from featcache.cached_splits import SplitChoice

        cached = load_cached_splits(store, features="cls", tokens=True, choice=SplitChoice(), max_memory_gb=1e-9,
                                    standardize=True, device=torch.device("cpu"))
        assert cached.train.x is None   # streamed
        mean, std = feature_stats(cached, torch.device("cpu"))
    np.testing.assert_allclose(mean.numpy(), flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), flat.std(0, ddof=1), rtol=1e-5)
