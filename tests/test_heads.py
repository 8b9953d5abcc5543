"""Heads: the seeds' parameter counts, shapes, and clear errors."""
from __future__ import annotations

import pytest
import torch

from featcache.heads import HEADS, HeadSpec, build_head, num_params


def test_seed_model1_linear_on_cls():
    head = build_head(HeadSpec("linear", 768, 2))
    assert num_params(head) == 768 * 2 + 2


@pytest.mark.parametrize("tokens,expected", [(197, 443_906), (257, 257 * 256 + 256 + 768 * 256 * 2 + 2)])
def test_seed_mixer_heads_model2_and_model3(tokens, expected):
    head = build_head(HeadSpec("mixer", 768, 2, num_tokens=tokens))
    assert num_params(head) == expected
    out = head(torch.randn(3, tokens, 768))
    assert out.shape == (3, 2)


def test_mixer_matches_the_seed_recipe():
    """permute -> Linear(T, 256) -> ReLU -> Flatten -> Linear(D*256, C), written out by hand."""
    torch.manual_seed(0)
    head = build_head(HeadSpec("mixer", 8, 3, num_tokens=5, mix_dim=4))
    x = torch.randn(2, 5, 8)
    ref = torch.relu(x.permute(0, 2, 1) @ head.mix.weight.T + head.mix.bias).flatten(1) @ head.out.weight.T + head.out.bias
    torch.testing.assert_close(head(x), ref)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_gives_logits(kind):
    head = build_head(HeadSpec(kind, 16, 4, num_tokens=9, hidden=8))
    x = torch.randn(5, 9, 16) if kind in ("mixer", "attn") else torch.randn(5, 16)
    assert head(x).shape == (5, 4)


def test_attention_pool_weights_sum_to_one_over_tokens():
    head = build_head(HeadSpec("attn", 16, 3))
    x = torch.randn(2, 7, 16)
    scores = head.key(head.norm(x)) @ head.query
    assert torch.allclose(scores.softmax(1).sum(1), torch.ones(2))


def test_errors():
    with pytest.raises(ValueError, match="unknown head 'gru'"):
        build_head(HeadSpec("gru", 4, 2))
    with pytest.raises(ValueError, match="--tokens full"):
        build_head(HeadSpec("mixer", 4, 2))
