"""Frozen backbones: load a model and its image processor, and describe its tokens.

A backbone family is one entry in a small registry keyed by transformers' ``model_type``: it
says how many prefix tokens (CLS, distillation, registers) precede the patch tokens and whether
the model is a CNN whose feature map stands in for tokens. ``Backbone.features`` turns one batch
of pixels into the three things a feature file stores: cls, pooled and tokens.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from featcache.tokens import TokenLayout


@dataclass(frozen=True)
class Family:
    """How one model_type lays out its output."""

    name: str                                  # short family name recorded in the file
    n_prefix: Callable[[Any], int]             # config -> number of prefix tokens
    cnn: bool = False                          # feature map (B, C, h, w) instead of tokens
    interpolates_pos: bool = False             # forward() takes interpolate_pos_encoding


# model_type -> family. ViT also covers DINO (facebook/dino-*) and plain DeiT checkpoints,
# which transformers loads as ViTModel; "deit" is the distilled DeiT (CLS + distillation token).
FAMILIES: dict[str, Family] = {
    "vit": Family("vit", lambda c: 1, interpolates_pos=True),
    "deit": Family("deit", lambda c: 2, interpolates_pos=True),
    "dinov2": Family("dinov2", lambda c: 1),
    "dinov2_with_registers": Family("dinov2_with_registers", lambda c: 1 + int(getattr(c, "num_register_tokens", 0))),
    "resnet": Family("resnet", lambda c: 0, cnn=True),
    "convnext": Family("convnext", lambda c: 0, cnn=True),
    "convnextv2": Family("convnextv2", lambda c: 0, cnn=True),
}


class BackboneError(ValueError):
    """A model that cannot be loaded or used as a featcache backbone."""


class Backbone:
    """A frozen model plus its image processor; ``features`` gives (cls, pooled, tokens)."""

    def __init__(self, model: torch.nn.Module, processor: Any, family: Family, name: str,
                 revision: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.family = family
        self.name = name
        self.revision = revision
        self.weights_id: str | None = None  # content hash of a local folder's weights (load_backbone)
        self.config = model.config

    @property
    def n_prefix(self) -> int:
        return self.family.n_prefix(self.config)

    @property
    def patch_size(self) -> int | None:
        p = getattr(self.config, "patch_size", None)
        return int(p[0] if isinstance(p, (list, tuple)) else p) if p else None

    def input_size(self) -> tuple[int, int]:
        """(height, width) of the processor's output pixels."""
        return processor_output_size(self.processor)

    def layout(self, input_size: tuple[int, int] | None = None, native: bool = False) -> TokenLayout:
        """Token layout at an input size (default: the processor's), read off one dummy forward
        so that any stride, patch size or register count is measured rather than assumed."""
        h, w = input_size or self.input_size()
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            _, _, tokens = self.features(torch.zeros(1, 3, h, w, device=device), native=native)
        n_patches, dim = tokens.shape[1] - self.n_prefix, tokens.shape[2]
        if self.family.cnn:
            stride = (h * w / n_patches) ** 0.5
            grid = (round(h / stride), round(w / stride))
        else:
            p = self.patch_size
            grid = (h // p, w // p)
        if grid[0] * grid[1] != n_patches:
            raise BackboneError(f"{self.name}: {n_patches} patch tokens do not form a grid at "
                                f"{h}x{w} px (expected {grid[0]}x{grid[1]}).")
        return TokenLayout.of_backbone(self.n_prefix, grid, int(dim))

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

    def check_blocks(self, n_blocks: int) -> None:
        """Refuse --blocks on a model without ViT-style blocks and a final norm (DINOv2's
        get_intermediate_layers(n, norm=True) needs both)."""
        depth = getattr(self.config, "num_hidden_layers", None)
        if self.family.cnn or depth is None or not isinstance(getattr(self.model, "layernorm", None), torch.nn.Module):
            raise BackboneError(f"--blocks reads the CLS token of the last blocks after the model's final norm, as "
                                f"DINOv2's linear evaluation does; {self.name} ({self.family.name}) has no such "
                                f"structure. Drop --blocks (ViT, DeiT and DINOv2 models support it).")
        if not 1 <= n_blocks <= depth:
            raise BackboneError(f"--blocks {n_blocks}: {self.name} has {depth} blocks; use 1..{depth}.")

    def features(self, pixel_values: torch.Tensor, native: bool = False, blocks: int | None = None
                 ) -> tuple[torch.Tensor, ...]:
        """One forward pass -> (cls (B, D), pooled (B, D), tokens (B, T, D)) in float32, and with
        `blocks` also (blocks_cls (B, N, D), blocks_pooled (B, N, D)).

        cls is the first prefix token (a CNN's pooled output); pooled is the mean of the patch
        tokens (DINOv2's "avgpool"); tokens is the whole last_hidden_state (a CNN's flattened map).
        blocks_* are the CLS token and mean patch token of each of the last N blocks after the
        model's final norm, oldest first (DINOv2's get_intermediate_layers(N, norm=True)), so
        blocks_cls[:, -1] is cls.
        """
        kwargs = {}
        if native and self.family.interpolates_pos:
            kwargs["interpolate_pos_encoding"] = True
        if blocks:
            kwargs["output_hidden_states"] = True
        out = self.model(pixel_values=pixel_values, **kwargs)
        hidden = out.last_hidden_state
        if blocks:
            normed = torch.stack([self.model.layernorm(h) for h in out.hidden_states[-blocks:]], dim=1).float()
            hidden = hidden.float()
            return (hidden[:, 0], hidden[:, self.n_prefix:].mean(dim=1), hidden,
                    normed[:, :, 0], normed[:, :, self.n_prefix:].mean(dim=2))
        if self.family.cnn:
            tokens = hidden.flatten(2).transpose(1, 2).float()        # (B, h*w, C)
            cls = out.pooler_output.flatten(1).float()
            return cls, tokens.mean(dim=1), tokens
        hidden = hidden.float()
        return hidden[:, 0], hidden[:, self.n_prefix:].mean(dim=1), hidden


def use_eager_attention(model: torch.nn.Module, implementation: str = "eager") -> str:
    """Switch a transformers model's attention implementation (eager: its forward returns attention
    weights, and every matmul is visible to torch's FLOP counter); returns the previous one."""
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers
        model.config._attn_implementation = implementation
    return previous


def processor_output_size(processor: Any) -> tuple[int, int]:
    """(height, width) an image processor produces: its crop size when it crops, else its size."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        size = processor.crop_size
    else:
        size = getattr(processor, "size", None) or {}
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise BackboneError(f"cannot tell the output size of image processor {type(processor).__name__} "
                        f"(size={size!r}); pass --image-size.")


def set_processor_size(processor: Any, height: int, width: int) -> None:
    """Make a processor emit (height, width) pixels, keeping its resize-then-crop ratio (a
    processor saved with do_resize off is turned on: a size it would not apply is no size)."""
    if getattr(processor, "do_resize", None) is False:
        processor.do_resize = True
    size = dict(processor.size or {}) if getattr(processor, "size", None) is not None else {}
    if getattr(processor, "crop_pct", None) is not None and "shortest_edge" in size:
        # ConvNeXT: shortest_edge S gives S x S (a resize to S / crop_pct then a centre crop below 384)
        if height != width:
            raise ValueError(f"{type(processor).__name__} makes square images (size shortest_edge); --image-size "
                             f"needs one side, e.g. --image-size {height}; got {height}x{width}.")
        processor.size = {"shortest_edge": height}
        return
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        old_h, _ = processor_output_size(processor)
        size = processor.size or {}
        if "shortest_edge" in size:
            processor.size = {"shortest_edge": int(round(size["shortest_edge"] * height / old_h))}
        else:
            processor.size = {"height": int(round(size.get("height", old_h) * height / old_h)),
                              "width": int(round(size.get("width", old_h) * width / old_h))}
        processor.crop_size = {"height": height, "width": width}
    else:
        processor.size = {"height": height, "width": width}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def local_weights_id(folder: str | os.PathLike) -> str:
    """sha256 over the names and contents of a local model folder's weight and config files.

    A hub id is identified by its resolved commit; a local folder has none, and saving new weights
    into the same folder must not let an interrupted extraction resume with the other model (the
    file would mix two models). Contents, not mtimes, so a copied folder keeps its identity."""
    h = hashlib.sha256()
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def interpolation_kwargs(backbone: "Backbone", pixels: "torch.Tensor") -> dict[str, bool]:
    """interpolate_pos_encoding=True for a ViT/DeiT input of another size than its config's (DINOv2
    interpolates by itself); at its own size nothing, since transformers' ViT interpolation
    assumes a square trained grid and a model trained at 32x48 would fail."""
    other = tuple(pixels.shape[-2:]) != trained_size(backbone)
    return {"interpolate_pos_encoding": True} if backbone.family.interpolates_pos and other else {}


def trained_size(backbone: "Backbone") -> tuple[int, int] | None:
    """(height, width) the model's config was trained at, or None when it does not say."""
    trained = getattr(backbone.model.config, "image_size", None)
    return (trained, trained) if isinstance(trained, int) else tuple(trained) if trained else None


def check_image_size(backbone: "Backbone", image_size: int, strict: bool = True) -> None:
    """Refuse an input size that is not positive; for a transformer, one that is not a multiple of
    its patch size (the patch embedding drops the last image_size % patch pixels) is refused when
    `strict` (attention maps, bench), else warned about (extraction: files made at such a size
    before this check must still resume)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"--image-size must be a positive number of pixels; got {image_size!r}.")
    p = backbone.patch_size
    if not backbone.family.cnn and p and image_size % p:
        text = (f"--image-size {image_size} is not a multiple of {backbone.name}'s patch size {p} (the model "
                f"would see {image_size // p * p} px); use {image_size // p * p} or {(image_size // p + 1) * p}.")
        if strict:
            raise ValueError(text)
        warnings.warn(text.replace(" would see ", " sees ").replace("); use", "; the last pixels of each side are "
                                                                          "dropped); use"), UserWarning, stacklevel=3)


def load_backbone(model: str, revision: str | None = None, cache_dir: str | None = None,
                  image_size: int | None = None, quiet: bool = True, strict_image_size: bool = False) -> Backbone:
    """Load a frozen backbone and its image processor from a local directory or a hub id.

    The hub's own cache and offline mode (HF_HUB_OFFLINE=1) are honoured by transformers. With
    `quiet`, transformers' own notices and weight-loading bars are hidden. `strict_image_size` refuses an
    `image_size` that is not a multiple of the patch size (else a warning: check_image_size).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.utils import logging as hf_logging

    local = os.path.isdir(model)
    if not local and (model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
                      or os.path.exists(model)):
        # a path, not a hub id (org/name): say so instead of the hub's repo-id rules
        what = "is a file, not a model directory" if os.path.exists(model) else "does not exist"
        raise BackboneError(f"--model {model!r} {what}; pass a directory made with save_pretrained "
                            f"(config.json, the weights and preprocessor_config.json) or a hub id such as "
                            f"facebook/dino-vits16.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hint = ("" if local else
            " This machine is offline (HF_HUB_OFFLINE is set): the model must be in the hub cache, or pass a "
            "local directory made with save_pretrained." if offline else
            " If this machine is offline, set HF_HUB_OFFLINE=1 and make sure the model is in the "
            "hub cache, or pass a local directory made with save_pretrained.")
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        reason = str(exc).rstrip(". ")
        raise BackboneError(f"could not load model {model!r}"
                            f"{f' at revision {revision}' if revision else ''}: {reason}.{hint}") from exc
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise BackboneError(f"model {model!r} is a {config.model_type!r} model; featcache supports "
                            f"{', '.join(sorted(FAMILIES))}.")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # silence "requires torchvision, falling back to PIL" notices
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        processor = AutoImageProcessor.from_pretrained(model, revision=revision, cache_dir=cache_dir)
        net = AutoModel.from_pretrained(model, revision=revision, cache_dir=cache_dir)
        # a checkpoint saved in float16/bfloat16 loads in it (transformers 5: dtype "auto"); features
        # are computed in float32 unless --amp asks otherwise, whatever precision the weights were saved in
        net = net.to(torch.float32)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"could not load the weights or image processor of {model!r}: {exc}.{hint}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    commit = getattr(config, "_commit_hash", None) or revision
    backbone = Backbone(net, processor, family, model, commit)
    if image_size is not None:
        check_image_size(backbone, image_size, strict=strict_image_size)
        set_processor_size(processor, image_size, image_size)
    backbone.weights_id = local_weights_id(model) if local else None
    return backbone
