"""RWKV-7 state recurrence: `naive` (token-by-token reference) and `torch_chunked` (fast on CPU)."""

from .naive import wkv7_naive, wkv7_step
from .torch_chunked import wkv7_torch_chunked

__all__ = ["wkv7_naive", "wkv7_step", "wkv7_torch_chunked"]
