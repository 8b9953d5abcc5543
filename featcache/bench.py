"""Backbone cost: parameters, GFLOPs per image, latency, throughput and peak memory.

Used by `featcache bench` to compare backbones (efficient transformers vs CNNs) side by side
before committing to a long extraction.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from featcache.backbones import Backbone, interpolation_kwargs, load_backbone, use_eager_attention


@dataclass
class BenchResult:
    """One backbone's measured cost."""

    model: str                     # hub id or directory
    device: str                    # where it ran
    amp: bool                      # bf16 autocast on
    input_size: tuple[int, int]    # pixels (h, w)
    params_m: float                # parameters, millions
    gflops: float                  # forward FLOPs per image / 1e9 (torch's flop counter, 2 per MAC)
    latency_ms_p50: float          # batch 1, after warm-up
    latency_ms_p90: float
    batch_size: int                # batch of the throughput measurement
    images_per_s: float            # throughput at batch_size
    peak_mem_mb: float             # GPU: max allocated; CPU: process peak RSS
    peak_mem_kind: str             # "cuda max allocated" | "process peak RSS"

    def as_dict(self) -> dict:
        return asdict(self)


def count_gflops(backbone: Backbone, pixels: torch.Tensor) -> float:
    """FLOPs of one forward on `pixels` per image, in GFLOPs (2 per multiply-add).

    Counted with attention switched to eager: torch's FLOP counter does not see inside the fused
    CPU scaled-dot-product kernel, which would drop the attention matmuls (QK^T and AV) from the
    count; eager runs them as plain matmuls. The model's own implementation is restored after."""
    from torch.utils.flop_counter import FlopCounterMode

    previous = None if backbone.family.cnn else use_eager_attention(backbone.model)
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            backbone.model(pixel_values=pixels, **interpolation_kwargs(backbone, pixels))
    finally:
        if previous is not None:
            use_eager_attention(backbone.model, previous)
    return counter.get_total_flops() / pixels.shape[0] / 1e9


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: /proc/self/clear_refs "5"), so a
    model's peak is its own and not the largest of the models benched before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """VmHWM of this process in MiB (the peak since the last reset)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(model: str, device: torch.device, runs: int = 50, batch_size: int = 32, amp: bool = False,
                image_size: int | None = None, warmup: int = 5, batches: int = 5) -> BenchResult:
    """Measure one backbone on random pixels at its processor's input size. `amp` (bf16 autocast)
    applies on a GPU only, as in extraction: a CPU figure is of what extract runs there."""
    amp = amp and device.type == "cuda"
    own_peak = device.type != "cuda" and _reset_peak_rss()
    # strict: GFLOPs of a size the model does not see whole would be mislabelled
    backbone = load_backbone(model, image_size=image_size, strict_image_size=True).to(device)
    h, w = backbone.input_size()
    params = sum(p.numel() for p in backbone.model.parameters())
    one = torch.randn(1, 3, h, w, device=device)
    gflops = count_gflops(backbone, one)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    size_kwargs = interpolation_kwargs(backbone, one)

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            backbone.model(pixel_values=x, **size_kwargs)

    for _ in range(warmup):
        forward(one)
    _sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        forward(one)
        _sync(device)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    batch = torch.randn(batch_size, 3, h, w, device=device)
    forward(batch)
    _sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        forward(batch)
    _sync(device)
    rate = batches * batch_size / (time.perf_counter() - t)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    elif own_peak:
        peak, kind = _peak_rss_mb(), "peak RSS of the process while benching each model"
    else:  # no per-model reset here: the lifetime peak, which includes models benched before
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS so far"
    p90 = times[max(0, math.ceil(0.9 * len(times)) - 1)]  # nearest rank
    return BenchResult(model, str(device), amp, (h, w), params / 1e6, gflops, statistics.median(times),
                       p90, batch_size, rate, peak, kind)
