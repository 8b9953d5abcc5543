"""Classifier heads on cached features, in a small registry (timm-style: name -> builder).

Vector heads (linear, mlp) read cls, pooled or both concatenated; token heads (mixer, attn)
read the full token sequence (B, T, D). Each is built from the file's shapes alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from featcache.names import HEAD_NAMES


@dataclass(frozen=True)
class HeadSpec:
    """Everything needed to rebuild a head (stored in every checkpoint)."""

    kind: str                       # linear | mlp | mixer | attn
    in_dim: int                     # D of the input vectors or tokens
    num_classes: int                # C outputs (logits)
    num_tokens: int | None = None   # T, token heads only
    hidden: int = 512               # mlp hidden width
    mix_dim: int = 256              # mixer: tokens are mixed down to this many (the seeds' 256)
    dropout: float = 0.1            # mlp / attn dropout

    def as_dict(self) -> dict:
        return asdict(self)


class Dropout(nn.Dropout):
    """nn.Dropout with its mask drawn as `bernoulli_(1 - p)` of the input's shape from the device's
    global RNG, on every device (CUDA's fused dropout kernel draws otherwise).

    Why: a fused sweep trains K heads of one seed under `torch.func.vmap(randomness="same")`, which
    draws one mask of the unbatched shape for all K; with this rule that mask is bit for bit the one
    each head draws when trained alone, so fused and one-by-one training stay identical. On CPU this
    is exactly what nn.Dropout already does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0.0
        return x * torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)


class MixerHead(nn.Module):
    """The seeds' token-mixing head: (B, T, D) -> (B, D, T) -> Linear(T, 256) -> ReLU -> flatten
    -> Linear(D * 256, C). 443,906 parameters at T=197, D=768, C=2 (Model2); T=257 is Model3."""

    def __init__(self, num_tokens: int, dim: int, num_classes: int, mix_dim: int = 256):
        super().__init__()
        self.mix = nn.Linear(num_tokens, mix_dim)
        self.act = nn.ReLU()
        self.out = nn.Linear(dim * mix_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.mix(tokens.permute(0, 2, 1))).flatten(1))


class AttentionPoolHead(nn.Module):
    """A learned query attends over the tokens; the attention-weighted mean feeds a linear layer."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.key = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        scores = self.key(x) @ self.query / math.sqrt(x.shape[-1])       # (B, T)
        pooled = (scores.softmax(dim=1).unsqueeze(-1) * x).sum(dim=1)    # (B, D)
        return self.out(self.drop(pooled))


def _linear(spec: HeadSpec) -> nn.Module:
    return nn.Linear(spec.in_dim, spec.num_classes)


def _mlp(spec: HeadSpec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.in_dim, spec.hidden), nn.GELU(), Dropout(spec.dropout),
                         nn.Linear(spec.hidden, spec.num_classes))


def _mixer(spec: HeadSpec) -> nn.Module:
    return MixerHead(spec.num_tokens, spec.in_dim, spec.num_classes, spec.mix_dim)


def _attn(spec: HeadSpec) -> nn.Module:
    return AttentionPoolHead(spec.in_dim, spec.num_classes, spec.dropout)


# name -> (builder, reads tokens)
HEADS: dict[str, tuple[Callable[[HeadSpec], nn.Module], bool]] = {
    "linear": (_linear, False),
    "mlp": (_mlp, False),
    "mixer": (_mixer, True),
    "attn": (_attn, True),
}


if tuple(HEADS) != HEAD_NAMES:  # names.py lists what the registry holds, for the CLI's choices
    raise ImportError(f"featcache.names.HEAD_NAMES {HEAD_NAMES} does not match the head registry {tuple(HEADS)}.")


def uses_tokens(kind: str) -> bool:
    """True for heads that read the full token sequence rather than cls/pooled vectors."""
    _check(kind)
    return HEADS[kind][1]


def build_head(spec: HeadSpec) -> nn.Module:
    """A freshly initialised head for a spec."""
    _check(spec.kind)
    if spec.kind == "mixer" and not spec.num_tokens:
        raise ValueError("head 'mixer' mixes a fixed number of tokens and needs num_tokens; the feature file "
                         "has no tokens (extract with --tokens full).")
    return HEADS[spec.kind][0](spec)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check(kind: str) -> None:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}.")
