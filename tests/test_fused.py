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
