"""Token modes: turn a backbone's token sequence into the token count a user asks for.

- ``resize``: the seed's recipe. The (D, T) token matrix is resized along the token axis,
  linear, align_corners=False, prefix tokens included; identical to torchvision's
  ``Resize((D, T_out))`` on ``hidden.permute(0, 2, 1)``. Token 0 stays the CLS token exactly
  (its source coordinate clamps to 0), the rest lose their spatial meaning.
- ``grid``: prefix tokens kept as they are; the patch grid resized bicubically to a square grid,
  so 1 + 14x14 becomes 1 + 16x16 with spatial meaning kept.
- ``native``: the backbone itself runs at the resolution that yields the token count (see
  ``native_input_size``); tokens pass through unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOKEN_MODES = ("resize", "grid", "native")


@dataclass(frozen=True)
class TokenPlan:
    """What the stored tokens will look like after the mode."""

    mode: str                          # none | resize | grid | native
    num_tokens: int                    # T stored
    n_prefix: int                      # prefix tokens at the start of the stored sequence
    grid: tuple[int, int] | None       # patch grid of the stored tokens; None when resize drops it
    source_num_tokens: int             # the backbone's own T
    source_grid: tuple[int, int]       # the backbone's own patch grid (h, w)


def plan_tokens(n_prefix: int, grid: tuple[int, int], num_tokens: int | None, mode: str) -> TokenPlan:
    """Check a requested token count against a layout and describe the result."""
    source = n_prefix + grid[0] * grid[1]
    if num_tokens is None or num_tokens == source:
        return TokenPlan("none", source, n_prefix, grid, source, grid)
    if mode not in TOKEN_MODES:
        raise ValueError(f"token mode must be one of {', '.join(TOKEN_MODES)}; got {mode!r}.")
    if num_tokens <= n_prefix:
        raise ValueError(f"--num-tokens {num_tokens} leaves no patch tokens after {n_prefix} prefix tokens.")
    if mode == "resize":
        return TokenPlan("resize", num_tokens, n_prefix, None, source, grid)
    side = math.isqrt(num_tokens - n_prefix)
    if side * side != num_tokens - n_prefix:
        raise ValueError(
            f"--token-mode {mode} keeps {n_prefix} prefix token(s) and needs a square patch grid, so "
            f"--num-tokens must be {n_prefix} + a square (e.g. {n_prefix + (side + 1) ** 2}); got "
            f"{num_tokens}. Use --token-mode resize for any count.")
    return TokenPlan(mode, num_tokens, n_prefix, (side, side), source, grid)


def native_input_size(plan: TokenPlan, patch_size: int) -> tuple[int, int]:
    """Input pixels at which a ViT yields plan.grid patches (e.g. 16x16 patches of 16 px -> 256 px)."""
    if plan.grid is None:
        raise ValueError("native mode needs a square patch grid.")
    return plan.grid[0] * patch_size, plan.grid[1] * patch_size


def apply_token_mode(hidden: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """(B, T, D) backbone tokens -> (B, plan.num_tokens, D) stored tokens."""
    if plan.mode in ("none", "native"):
        if hidden.shape[1] != plan.num_tokens:
            raise ValueError(f"the backbone gave {hidden.shape[1]} tokens, expected {plan.num_tokens}.")
        return hidden
    if plan.mode == "resize":
        resized = F.interpolate(hidden.permute(0, 2, 1), size=plan.num_tokens, mode="linear",
                                align_corners=False)
        return resized.permute(0, 2, 1)
    if plan.mode == "grid":
        b, t, d = hidden.shape
        p = plan.n_prefix
        h, w = plan.source_grid
        patches = hidden[:, p:].transpose(1, 2).reshape(b, d, h, w)
        patches = F.interpolate(patches, size=plan.grid, mode="bicubic", align_corners=False)
        return torch.cat([hidden[:, :p], patches.flatten(2).transpose(1, 2)], dim=1)
    raise ValueError(f"unknown token mode {plan.mode!r}")
