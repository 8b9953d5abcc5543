"""The model's image processor split in two: uint8 steps in the loader workers, float steps on the device.

transformers' PIL image processors (ViT, DeiT, BiT/DINOv2, ConvNeXT/ResNet) run on each image:
convert to RGB -> resize (PIL, on the 8-bit image) -> centre crop (slicing) -> rescale (float64
multiply, cast to float32) -> normalise (float32 subtract and divide). Everything up to the crop
stays uint8, so the loader workers can do exactly that and ship 8-bit pixels (4x fewer bytes
across processes and over PCIe than float32). Rescale + normalise map each of the 256 values of
each channel to one float32; ``normalize_batch`` looks those values up in a table computed once
with the processor's own arithmetic, so the device output is bit-identical to the processor's.

A processor whose steps featcache does not know (another class, padding, a torchvision
"Fast" backend, anything its self-check disagrees with) gets no plan: it then runs whole in the
workers, as before.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("featcache")

UINT8_PATH = "uint8+device-normalize"
PROCESSOR_PATH = "processor-in-workers"

# The PIL-backend processors whose every step featcache reproduces (class names, transformers >= 5;
# the names without "Pil" are those of transformers 4, where these classes were PIL-only; in
# transformers 5 they name the torchvision backend, which `backend != "pil"` turns away).
KNOWN_PROCESSORS = ("ViTImageProcessorPil", "DeiTImageProcessorPil", "BitImageProcessorPil",
                    "ConvNextImageProcessorPil", "ViTImageProcessor", "DeiTImageProcessor",
                    "BitImageProcessor", "ConvNextImageProcessor")


@dataclass(frozen=True)
class PixelPlan:
    """The steps of one image processor: the uint8 part (workers) and the float part (device)."""

    processor: str                              # class name, for messages
    convert_rgb: bool                           # composite alpha onto white, like transformers' convert_to_rgb
    resize: tuple[str, int, int] | None         # ("fixed", h, w) | ("shortest_edge", s, 0) | None
    resample: int                               # PIL resample filter
    crops: tuple[tuple[int, int], ...]          # centre crops (h, w), applied in order
    rescale: float | None                       # rescale factor; None = no rescale
    mean: tuple[float, ...] | None              # per channel; None = no normalisation
    std: tuple[float, ...] | None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step, computed with transformers' own integer arithmetic."""
        if self.resize is None:
            return height, width
        kind, a, b = self.resize
        if kind == "fixed":
            return a, b
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = a, int(a * long / short)          # get_resize_output_image_size
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def table(self) -> np.ndarray:
        """(3, 256) float32: the processor's rescale + normalise of every uint8 value, per channel.

        Same operations, dtypes and order as transformers' numpy rescale (float64 multiply, cast to
        float32) and normalise (float32 subtract, float32 divide), so a lookup is bit-exact.
        """
        values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
        x = values.astype(np.float64) * self.rescale if self.rescale is not None else values
        x = x.astype(np.float32)
        if self.mean is not None and self.std is not None:
            mean = np.array(self.mean, dtype=np.float32)[:, None]
            std = np.array(self.std, dtype=np.float32)[:, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# building a plan
# ----------------------------------------------------------------------------------------------

def plan_from_processor(processor: Any) -> PixelPlan | None:
    """The plan of a known image processor, or None when its steps are not all known.

    A plan is only returned after it reproduced the processor's own output exactly on two probe
    images, so a processor that changed under featcache's feet falls back instead of drifting.
    """
    plan, reason = _read_plan(processor)
    if plan is not None:
        reason = _self_check(processor, plan)
    if reason:
        log.info("image processor %s runs whole in the loader workers: %s", type(processor).__name__, reason)
        return None
    return plan


def _read_plan(processor: Any) -> tuple[PixelPlan | None, str]:
    """Read the processor's settings into a plan; (None, why) when a step is unknown."""
    from transformers.image_processing_utils import get_size_dict

    name = type(processor).__name__
    if name not in KNOWN_PROCESSORS:
        return None, f"{name} is not one of the processors featcache splits ({', '.join(KNOWN_PROCESSORS[:4])})"
    if getattr(processor, "backend", "pil") != "pil":
        return None, f"{name} uses the {processor.backend!r} backend, not PIL"
    if getattr(processor, "do_pad", None):
        return None, "it pads images"

    def get(key: str) -> Any:
        return getattr(processor, key, None)

    resample = get("resample")
    resample = 2 if resample is None else resample  # PilBackend.resize: BILINEAR when unset
    if not isinstance(resample, int):
        return None, f"resample {resample!r} is not a PIL filter"
    crops: list[tuple[int, int]] = []
    resize = None
    if get("do_resize"):
        if get("size") is None:
            return None, "do_resize is on but size is None"
        size = get_size_dict(get("size"), default_to_square=bool(get("default_to_square")))
        size = {k: v for k, v in dict(size).items() if v is not None}
        if name.startswith("ConvNext"):
            if "shortest_edge" not in size:
                return None, f"ConvNeXT size {size} has no shortest_edge"
            edge = int(size["shortest_edge"])
            if edge < 384:  # resize the short side to edge / crop_pct, then crop edge x edge
                resize = ("shortest_edge", int(edge / float(get("crop_pct") or 224 / 256)), 0)
                crops.append((edge, edge))
            else:           # warp to edge x edge
                resize = ("fixed", edge, edge)
        elif set(size) == {"height", "width"}:
            resize = ("fixed", int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            resize = ("shortest_edge", int(size["shortest_edge"]), 0)
        else:
            return None, f"size {size} (featcache splits height+width or shortest_edge only)"
    if get("do_center_crop"):
        if get("crop_size") is None:
            return None, "do_center_crop is on but crop_size is None"
        crop = {k: v for k, v in dict(get_size_dict(get("crop_size"), param_name="crop_size")).items()
                if v is not None}
        if set(crop) != {"height", "width"}:
            return None, f"crop_size {crop} is not height+width"
        crops.append((int(crop["height"]), int(crop["width"])))
    mean = std = None
    if get("do_normalize"):
        mean, std = _per_channel(get("image_mean")), _per_channel(get("image_std"))
        if mean is None or std is None:
            return None, f"image_mean/std {get('image_mean')!r}/{get('image_std')!r} are not a scalar or 3 values"
    rescale = float(get("rescale_factor")) if get("do_rescale") else None
    return PixelPlan(name, bool(get("do_convert_rgb")), resize, int(resample), tuple(crops), rescale,
                     mean, std), ""


def _per_channel(value: Any) -> tuple[float, ...] | None:
    """A mean/std as three floats (a scalar applies to every channel, as in transformers)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    try:
        values = tuple(float(v) for v in value)
    except TypeError:
        return None
    return values if len(values) == 3 else None


def _probe_images() -> list["Image.Image"]:
    """Two small smooth RGB images of odd, transposed sizes (portrait and landscape)."""
    from PIL import Image

    out = []
    for h, w in ((53, 37), (37, 61)):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 7 + yy * 3) % 256, (xx * 2 + yy * 11) % 256, (xx * yy) % 256], -1)
        out.append(Image.fromarray(rgb.astype(np.uint8), "RGB"))
    return out


def _self_check(processor: Any, plan: PixelPlan) -> str:
    """'' when the plan reproduces the processor on the probe images, else what differed."""
    for image in _probe_images():
        try:
            want = processor(images=image, return_tensors="np")["pixel_values"][0]
            got = normalize_array(to_uint8(image, plan)[None], plan)[0]
        except Exception as exc:  # a processor that cannot run the probe is not one featcache knows
            return f"self-check failed on a {image.width}x{image.height} probe: {type(exc).__name__}: {exc}"
        if want.shape != got.shape:
            return f"self-check: shape {got.shape} instead of the processor's {want.shape}"
        diff = float(np.max(np.abs(want.astype(np.float64) - got)))
        if diff > 1e-6:
            return f"self-check: pixels differ from the processor's by up to {diff:.3g}"
    return ""


# ----------------------------------------------------------------------------------------------
# worker side: uint8
# ----------------------------------------------------------------------------------------------

def to_uint8(image: "Image.Image", plan: PixelPlan) -> np.ndarray:
    """The processor's 8-bit steps on one decoded image -> (3, H, W) uint8, contiguous, channels first.

    Resize is PIL's, on the 8-bit image, as transformers does it; the centre crop starts at
    ((H - h) // 2, (W - w) // 2) and fills with zeros where the crop is larger than the image.
    """
    if image.mode != "RGB":
        if not plan.convert_rgb:
            raise ValueError(f"{plan.processor} expects an RGB image; got mode {image.mode} "
                             f"(featcache.sources.load_image converts every input to RGB).")
        image = _convert_rgb(image)
    h, w = plan.resized_size(image.height, image.width)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=plan.resample)
    for ch, cw in plan.crops:
        top, left = (image.height - ch) // 2, (image.width - cw) // 2
        if (top, left, ch, cw) != (0, 0, image.height, image.width):
            image = image.crop((left, top, left + cw, top + ch))
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))  # one copy, writable


def _convert_rgb(image: "Image.Image") -> "Image.Image":
    """transformers' convert_to_rgb: alpha composited onto white, everything else .convert('RGB')."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# device side: float
# ----------------------------------------------------------------------------------------------

def normalize_array(pixels: np.ndarray, plan: PixelPlan, out: np.ndarray | None = None) -> np.ndarray:
    """(B, 3, H, W) uint8 numpy -> float32 by table lookup (numpy; the CPU path and the self-check).

    `out` (float32, same shape) is filled instead of a new array: a fresh 38 MB batch costs
    thousands of page faults, more than the lookup itself.
    """
    table = _cpu_table(plan)
    if out is None or out.shape != pixels.shape or out.dtype != np.float32:
        out = np.empty(pixels.shape, dtype=np.float32)
    for i in range(pixels.shape[0]):  # per image and channel: take's intp copy of the indices stays in cache
        for c in range(3):
            np.take(table[c], pixels[i, c], out=out[i, c])
    return out


def normalize_batch(pixels: torch.Tensor, plan: PixelPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 tensor on any device -> the processor's float32 pixels on that device.

    A 256-entry lookup per channel: exact, and on a GPU one gather over the batch. On the CPU
    numpy's take with uint8 indices is several times faster than any torch indexing op, and
    `out` (a float32 CPU tensor of the same shape, reused across batches) saves the allocation.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"normalize_batch expects (B, 3, H, W) uint8 pixels; got {tuple(pixels.shape)} "
                         f"{pixels.dtype}.")
    if pixels.device.type == "cpu":
        reuse = out is not None and out.device.type == "cpu" and out.is_contiguous()
        return torch.from_numpy(normalize_array(pixels.numpy(), plan, out.numpy() if reuse else None))
    return normalize_tensor(pixels, plan)


def normalize_tensor(pixels: torch.Tensor, plan: PixelPlan) -> torch.Tensor:
    """The same lookup in torch ops on pixels' own device (the GPU path; runs on the CPU too)."""
    table = _device_table(plan, str(pixels.device))
    offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(1, 3, 1, 1)
    return table.take(pixels.long() + offsets)


@lru_cache(maxsize=8)
def _cpu_table(plan: PixelPlan) -> np.ndarray:
    return plan.table()


@lru_cache(maxsize=8)
def _device_table(plan: PixelPlan, device: str) -> torch.Tensor:
    return torch.from_numpy(plan.table().reshape(-1)).to(device)
