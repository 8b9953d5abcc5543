"""Fused sweeps of every head kind: per configuration exactly the head trained alone; streamed
token caches read once per epoch for all heads."""
from __future__ import annotations

import json

import numpy as np
import pytest

import featcache as fc
from featcache.fused import fused_sweep
from featcache.store import write_arrays
from featcache.prediction import predict
from featcache.train import TrainConfig

# vmap runs batched matmuls where the head alone runs plain ones: float sums may be ordered
# differently, so weights agree to float32 rounding amplified by a few Adam steps (~1e-6 seen),
# not bit for bit. 1e-5 is an order of magnitude above that and far below any real difference.
ATOL = 1e-5


def _assert_same_weights(alone, fused, skip: tuple[str, ...] = ()) -> None:
    for (name, a), b in zip(alone.model_.state_dict().items(), fused.model_.state_dict().values()):
        if name not in skip:
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL, err_msg=name)


def _assert_matches_alone(path, result, skip: tuple[str, ...] = (), **kw) -> None:
    """Every row equals its config trained alone; the best trainer has the alone weights."""
    assert result.fused
    for row in result.leaderboard:
        alone = fc.train_head(path, lr=row["lr"], weight_decay=row["weight_decay"], features=row["features"], **kw)
        assert alone.best_epoch_ == row["best_epoch"], row
        assert alone.best_score_ == row["val_accuracy"], row
        fused = result.histories[row["config"]]  # every configuration's epochs, as alone
        assert [h["val_accuracy"] for h in fused] == [h["val_accuracy"] for h in alone.history_], row
        np.testing.assert_allclose([h["train_loss"] for h in fused], [h["train_loss"] for h in alone.history_],
                                   rtol=1e-5)
        if row["rank"] == 1:
            _assert_same_weights(alone, result.trainer, skip)
            np.testing.assert_allclose(alone.val_proba_, result.trainer.val_proba_, atol=ATOL)
            assert alone.test_metrics_["top1"] == result.trainer.test_metrics_["top1"]
            assert [h["epoch"] for h in alone.history_] == [h["epoch"] for h in result.trainer.history_]


@pytest.mark.parametrize("dropout,optimizer", [(0.0, "adamw"), (0.3, "adamw"), (0.3, "adam")])
def test_fused_mlp_sweep_equals_each_config_alone(digits_feature_file, dropout, optimizer):
    kw = dict(head="mlp", hidden=32, epochs=12, patience=3, dropout=dropout, optimizer=optimizer)
    result = fc.sweep(digits_feature_file, lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-1),
                      features=("cls", "cls+pooled"), **kw)
    assert len(result.leaderboard) == 8 and result.bytes_read is None
    assert len({r["best_epoch"] for r in result.leaderboard}) > 1  # heads stopped at different epochs
    _assert_matches_alone(digits_feature_file, result, **kw)


@pytest.mark.parametrize("budget", [1, 16 * 2**20])
def test_heads_split_over_several_stacks_still_equal_each_config_alone(digits_feature_file, monkeypatch, budget):
    """Large heads are spread over several stacks (bounded activations); every batch still serves all
    of them and each stack replays the same dropout draw, so configs still equal themselves alone."""
    from featcache import fused
    from featcache.heads import HeadSpec

    monkeypatch.setattr(fused, "STACK_ACTIVATION_BYTES", budget)
    assert fused.heads_per_stack(HeadSpec("mlp", 64, 10, hidden=32), 256) == max(1, budget // (16 * 256 * 32))
    kw = dict(head="mlp", hidden=32, epochs=8, patience=3, dropout=0.3)
    result = fc.sweep(digits_feature_file, lrs=(1e-3, 1e-2), weight_decays=(0.0,), features=("cls",), **kw)
    _assert_matches_alone(digits_feature_file, result, **kw)


def test_fused_linear_adam_sweep_equals_each_config_alone(digits_feature_file):
    kw = dict(head="linear", epochs=10, patience=3, optimizer="adam")
    result = fc.sweep(digits_feature_file, lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-2), **kw)
    _assert_matches_alone(digits_feature_file, result, **kw)


@pytest.mark.parametrize("head", ["mixer", "attn"])
@pytest.mark.parametrize("max_memory_gb", [4.0, 1e-9])
def test_fused_token_sweep_equals_each_config_alone(token_file, head, max_memory_gb):
    kw = dict(head=head, epochs=6, patience=2, batch_size=32, dropout=0.2, max_memory_gb=max_memory_gb)
    result = fc.sweep(token_file, lrs=(1e-3, 1e-2), weight_decays=(0.0, 1e-1), **kw)
    assert result.trainer.streamed_ == (max_memory_gb < 1)
    # attn: key.bias shifts every token's score alike, which softmax ignores; its true gradient is
    # zero and Adam turns the rounding noise it gets into lr-sized steps either way. It changes no
    # output (the probabilities are compared), so it is left out of the weight comparison.
    _assert_matches_alone(token_file, result, skip=("key.bias",) if head == "attn" else (), **kw)


def test_streamed_cache_read_once_per_epoch_for_all_heads(tmp_path):
    """A token file 4x larger than the memory budget: each epoch reads the train and val tokens once,
    whatever the number of heads."""
    rng = np.random.default_rng(1)
    n, t, d = 300, 5, 16
    y = rng.integers(0, 2, n)
    tokens = (rng.normal(size=(n, t, d)) + y[:, None, None] * 0.5).astype(np.float32)
    path = tmp_path / "big.h5"
    cut = {"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, 300)}
    write_arrays(path, {k: {"cls": tokens[s, 0], "pooled": tokens[s].mean(1), "tokens": tokens[s], "labels": y[s]}
                        for k, s in cut.items()}, ["a", "b"], {"model": "big"})
    total = tokens.nbytes
    cfg = TrainConfig(head="mixer", epochs=3, patience=3, batch_size=32, max_memory_gb=total / 4 / 2**30)
    grid = [dict(lr=lr, weight_decay=wd, features="cls") for lr in (1e-3, 3e-3, 1e-2) for wd in (0.0, 1e-2)]
    run = fused_sweep(path, cfg, grid)
    train_bytes, val_bytes = 200 * t * d * 4, 50 * t * d * 4
    assert run.groups["tokens"].cached.streamed
    assert run.bytes_per_epoch == [train_bytes + val_bytes] * 3       # not 6x that
    assert run.bytes_read == train_bytes + 3 * (train_bytes + val_bytes)  # + one pass for the train mean/std


def test_fused_sweep_saves_a_usable_run(digits_feature_file, tmp_path):
    result = fc.sweep(digits_feature_file, head="mlp", hidden=16, lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=3,
                      out=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fused"] is True and metrics["kind"] == "sweep" and len(metrics["leaderboard"]) == 2
    pred = predict(tmp_path / "run", digits_feature_file, split="test")
    accuracy = np.mean(pred.decisions() == pred.labels)
    assert accuracy == pytest.approx(result.trainer.test_metrics_["top1"])


def _three_classes(tmp_path, name: str = "f.h5", majority: float = 0.8):
    """300/100/100 rows of 16 features in 3 classes, class 0 the majority."""
    rng = np.random.default_rng(0)
    y = rng.choice(3, 500, p=[majority, (1 - majority) / 2, (1 - majority) / 2])
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x[np.arange(500), y] += 1.0
    cut = {"train": slice(0, 300), "val": slice(300, 400), "test": slice(400, 500)}
    write_arrays(tmp_path / name, {k: {"cls": x[s], "pooled": np.abs(x[s]), "labels": y[s]} for k, s in cut.items()},
                 ["a", "b", "c"], {"model": "m"}).close()
    return tmp_path / name


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])  # the analytic linear path and the vmapped one
def test_a_diverged_configuration_is_never_chosen(tmp_path, optimizer, monkeypatch):
    """An lr whose train loss was inf (finite one-hot probabilities) won the sweep, with a note to raise
    --lr further; one whose weights went NaN scored the share of class 0 (argmax of NaN) on the linear
    path, ranked first and then crashed the sweep. train_head refuses both as diverged."""
    from featcache import sweeping

    path = _three_classes(tmp_path)
    steps = []
    real_step = sweeping._adamw_step
    monkeypatch.setattr(sweeping, "_adamw_step", lambda g, step: (steps.append(len(g.members)), real_step(g, step)))
    res = fc.sweep(path, lrs=(1e-2, 1e37, 3e38), weight_decays=(0.0,), epochs=6, patience=3, batch_size=64,
                   optimizer=optimizer)
    by_lr = {r["lr"]: r for r in res.leaderboard}
    assert res.best["lr"] == 1e-2 and res.best["diverged_at"] is None
    for lr in (1e37, 3e38):
        with pytest.raises(ValueError, match="the head diverged"):
            fc.train_head(path, lr=lr, weight_decay=0.0, epochs=6, patience=3, batch_size=64, optimizer=optimizer)
        assert by_lr[lr]["diverged_at"] == 0 and np.isnan(by_lr[lr]["val_accuracy"]) and by_lr[lr]["rank"] > 1
        assert np.isnan(res.histories[by_lr[lr]["config"]][0]["val_accuracy"])
    assert any("2 of 3 configurations diverged" in n for n in res.notes)
    assert not any("extend --lr above" in n for n in res.notes)
    alone = fc.train_head(path, lr=1e-2, weight_decay=0.0, epochs=6, patience=3, batch_size=64, optimizer=optimizer)
    assert res.trainer.best_epoch_ == alone.best_epoch_ and res.trainer.best_score_ == alone.best_score_
    if optimizer == "adamw":  # the diverged heads left the stack after epoch 0 (README: stopped heads are dropped)
        assert steps[0] == 3 and steps[-1] == 1
    with pytest.raises(ValueError, match="for every configuration .*the heads diverged"):
        fc.sweep(path, lrs=(1e37,), weight_decays=(0.0,), epochs=2, batch_size=64, optimizer=optimizer)


def test_sweep_api_refuses_single_values_it_would_ignore(tmp_path):
    """sweep(lr=0.5) swept the default grid without a word; features='cls+pooled' was split into letters."""
    path = _three_classes(tmp_path, majority=0.34)
    with pytest.raises(ValueError, match=r"sweep\(\) grids lr over lrs=\[...\]; got lr=0.5. Pass lrs=\[0.5\]"):
        fc.sweep(path, lr=0.5)
    with pytest.raises(ValueError, match="grids weight_decay over weight_decays"):
        fc.sweep(path, weight_decay=0.1)
    res = fc.sweep(path, lrs=1e-2, weight_decays=0.0, features="cls+pooled", epochs=2, batch_size=64)
    assert [(r["lr"], r["weight_decay"], r["features"]) for r in res.leaderboard] == [(1e-2, 0.0, "cls+pooled")]


def test_sweep_cli_takes_optimizer_and_seeds_must_be_non_negative(tmp_path):
    """README documents `sweep --optimizer adam`, which the CLI refused; --seed -1 trained in memory
    and crashed in numpy once tokens were streamed."""
    from click.testing import CliRunner

    from featcache_cli.main import cli

    path = _three_classes(tmp_path, majority=0.34)
    r = CliRunner().invoke(cli, ["sweep", str(path), "--lr", "1e-2", "--wd", "0", "--epochs", "2", "--optimizer", "adam",
                                 "--out", str(tmp_path / "s"), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["optimizer"] == "adam"
    for cmd in (["train", str(path)], ["sweep", str(path)]):
        r = CliRunner().invoke(cli, cmd + ["--seed", "-1", "-q"])
        assert r.exit_code == 2 and "--seed" in r.output
    with pytest.raises(ValueError, match="seed must be a non-negative integer; got -1"):
        TrainConfig(seed=-1).check()


def test_sweep_cli_bootstrap_gives_the_best_head_intervals(tmp_path):
    """sweep --bootstrap: the best head's test metrics get the intervals train gives (sweep had no
    way to ask for them); top-1's is the Wilson interval of its own test decisions."""
    from click.testing import CliRunner

    from featcache_cli.main import cli
    from tests.conftest import wilson_by_patient

    path = _three_classes(tmp_path)
    r = CliRunner().invoke(cli, ["sweep", str(path), "--lr", "1e-3,1e-2", "--wd", "0", "--epochs", "3",
                                 "--bootstrap", "200", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "s.json").read_text())
    pred = predict(tmp_path / "run", path, split="test")
    hits = (pred.decisions() == pred.labels).astype(float)
    for record in (metrics, summary):
        ci = record["test"]["ci"]
        assert ci["top1"] == pytest.approx(wilson_by_patient(hits), abs=1e-9)
        assert ci["auroc"][0] < record["test"]["auroc"] < ci["auroc"][1]
        assert record["test"]["bootstrap"]["n_boot"] == 200
    assert metrics["test"]["bootstrap"]["describe"] in r.output
