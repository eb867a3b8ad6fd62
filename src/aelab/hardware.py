"""How fast this machine multiplies matrices: shared by the benchmark and the training run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(
    size: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
    now: Callable[[], float] = time.perf_counter,
    repeats: int = 3,
) -> float:
    """The best time of a few products of two `size` x `size` matrices of `dtype`."""
    device = device or torch.device("cpu")
    a = torch.rand(size, size, device=device, dtype=dtype)
    b = torch.rand(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = now()
        a @ b
        synchronize(device)
        best = min(best, now() - start)
    return best


def bfloat16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """Time of a bfloat16 matrix product on the CPU over that of the same fp32 product."""
    bfloat16 = matmul_seconds(size, torch.bfloat16, repeats=repeats)
    return bfloat16 / matmul_seconds(size, torch.float32, repeats=repeats)
