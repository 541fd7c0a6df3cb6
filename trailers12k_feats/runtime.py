"""Where and at what precision models run: the device and precision checks every stage shares."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from trailers12k_feats.utils import T12kError

# Autocast precisions by name. "fp32" means autocast off; each command allows a subset.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Stop unless `device` is "cpu" or "cuda[:N]" and, for CUDA, that device is visible."""
    if not _DEVICE.fullmatch(device):
        raise T12kError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise T12kError(f"device {device!r} was asked for but CUDA is not available; use --device cpu.")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise T12kError(f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                            f"device(s) are visible; use --device cuda:0 or another visible index.")


def check_precision(precision: str, device: str, allowed: Sequence[str] = tuple(PRECISIONS)) -> None:
    """Stop unless `precision` is one of `allowed` and can run on `device` (fp16 autocast needs CUDA)."""
    if precision not in allowed or precision not in PRECISIONS:
        raise T12kError(f"unknown precision {precision!r}; valid: {', '.join(allowed)}.")
    if precision == "fp16" and not device.startswith("cuda"):
        raise T12kError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on the CPU.")


def autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device_type` ("cpu" or "cuda"); float32 turns it off."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
