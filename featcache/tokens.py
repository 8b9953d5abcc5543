"""Token modes: turn a backbone's token sequence into the token count a user asks for.

- ``resize``: the seed's recipe. The (D, T) token matrix is resized along the token axis,
  linear, align_corners=False, prefix tokens included. Growing the count (197 -> 257) it is
  identical to torchvision's ``Resize((D, T_out))`` on ``hidden.permute(0, 2, 1)`` and token 0
  stays the CLS token exactly (its source coordinate clamps to 0); shrinking it (257 -> 197),
  token 0 blends CLS with token 1 and torchvision's default antialias differs (this is
  ``Resize(..., antialias=False)``), which plan_tokens warns about. The rest lose their spatial
  meaning.
- ``grid``: prefix tokens kept as they are; the patch grid resized bicubically to a square grid,
  so 1 + 14x14 becomes 1 + 16x16 with spatial meaning kept.
- ``native``: the backbone itself runs at the resolution that yields the token count (see
  ``native_input_size``); tokens pass through unchanged.
"""
from __future__ import annotations

import warnings

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featcache.names import TOKEN_MODES



@dataclass(frozen=True)
class TokenLayout:
    """A token sequence: the backbone's own (mode "none"), or what the token mode made of it.

    The one description of tokens everywhere: a backbone measures its layout, the token mode
    turns it into the stored one, and the store writes it as the attributes of ``tokens``.
    """

    n_prefix: int                              # tokens before the patches (CLS, distillation, registers; 0 for a CNN)
    grid: tuple[int, int] | None               # patch grid (h, w) of these tokens; None when resize dropped it
    dim: int                                   # D
    num_tokens: int                            # T
    mode: str = "none"                         # none | resize | grid | native: how these came from the backbone's
    source_num_tokens: int | None = None       # the backbone's own T (None: these are the backbone's own)
    source_grid: tuple[int, int] | None = None  # the backbone's own patch grid

    @classmethod
    def of_backbone(cls, n_prefix: int, grid: tuple[int, int], dim: int) -> "TokenLayout":
        return cls(n_prefix, tuple(grid), int(dim), n_prefix + grid[0] * grid[1])

    @property
    def source(self) -> tuple[int, tuple[int, int] | None]:
        """(token count, grid) of the backbone output these tokens came from."""
        return (self.source_num_tokens or self.num_tokens), (self.source_grid or self.grid)

    def attrs(self) -> dict[str, object]:
        """The HDF5 attributes of a stored ``tokens`` dataset."""
        return {"n_prefix": self.n_prefix, "grid": list(self.grid) if self.grid else [], "mode": self.mode,
                "source_num_tokens": self.source[0]}

    def config(self) -> dict[str, object]:
        """The token facts recorded in (and hashed into) a feature file's config."""
        return {"n_prefix": self.n_prefix, "grid": list(self.grid) if self.grid else None,
                "source_num_tokens": self.source[0], "token_mode": self.mode}


def plan_tokens(source: TokenLayout, num_tokens: int | None, mode: str) -> TokenLayout:
    """Check a requested token count against a backbone's layout and describe the result."""
    if num_tokens is None or num_tokens == source.num_tokens:
        return source
    n_prefix = source.n_prefix
    if mode not in TOKEN_MODES:
        raise ValueError(f"token mode must be one of {', '.join(TOKEN_MODES)}; got {mode!r}.")
    if num_tokens <= n_prefix:
        raise ValueError(f"--num-tokens {num_tokens} leaves no patch tokens after {n_prefix} prefix tokens.")
    kept = dict(dim=source.dim, num_tokens=num_tokens, mode=mode, source_num_tokens=source.num_tokens,
                source_grid=source.grid)
    if mode == "resize":
        if num_tokens < source.num_tokens and n_prefix:
            warnings.warn(f"--token-mode resize from {source.num_tokens} down to {num_tokens} tokens: token 0 is then "
                          f"a blend of CLS and the next token, not the CLS token (only growing the count keeps it "
                          f"exact). --token-mode grid keeps the prefix tokens exactly.", UserWarning, stacklevel=2)
        return TokenLayout(n_prefix, None, **kept)
    side = math.isqrt(num_tokens - n_prefix)
    if side * side != num_tokens - n_prefix:
        raise ValueError(
            f"--token-mode {mode} keeps {n_prefix} prefix token(s) and needs a square patch grid, so "
            f"--num-tokens must be {n_prefix} + a square (e.g. {n_prefix + (side + 1) ** 2}); got "
            f"{num_tokens}. Use --token-mode resize for any count.")
    return TokenLayout(n_prefix, (side, side), **kept)


def native_input_size(plan: TokenLayout, patch_size: int) -> tuple[int, int]:
    """Input pixels at which a ViT yields plan.grid patches (e.g. 16x16 patches of 16 px -> 256 px)."""
    if plan.grid is None:
        raise ValueError("native mode needs a square patch grid.")
    return plan.grid[0] * patch_size, plan.grid[1] * patch_size


def apply_token_mode(hidden: torch.Tensor, plan: TokenLayout) -> torch.Tensor:
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
        h, w = plan.source[1]
        patches = hidden[:, p:].transpose(1, 2).reshape(b, d, h, w)
        patches = F.interpolate(patches, size=plan.grid, mode="bicubic", align_corners=False)
        return torch.cat([hidden[:, :p], patches.flatten(2).transpose(1, 2)], dim=1)
    raise ValueError(f"unknown token mode {plan.mode!r}")
