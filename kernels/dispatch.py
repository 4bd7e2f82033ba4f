"""Shared by the ops' entry points: when the Triton kernels can run, and a warning once per reason when not."""

from __future__ import annotations

import os
import warnings

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_warned: set[tuple[str, str]] = set()


def triton_unavailable(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take `x` here, or None when they can."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e})"
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} (the Triton kernels take bf16/fp16/fp32)"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors on {x.device.type} and TRITON_INTERPRET != 1"
    return None


def warn_fallback(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"rwkvx_kernels.{op}: using the PyTorch reference (slow): {reason}", stacklevel=3)
