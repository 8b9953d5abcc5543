"""Which torch device a command runs on: one rule for extraction, heads, k-NN and bench."""
from __future__ import annotations

import os

import torch


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; refuse cuda on a machine without a GPU.

    Under torchrun each rank takes the GPU of its LOCAL_RANK.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', local_rank)) % max(1, torch.cuda.device_count())}"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for a GPU, but torch sees none on this machine; "
                         f"use --device cpu or auto.")
    return dev
