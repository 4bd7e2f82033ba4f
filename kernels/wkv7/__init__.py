"""RWKV-7 state recurrence: `naive` (token-by-token reference), `torch_chunked` (fast on CPU),
`fused_recurrent` (sequential Triton), `chunk` (chunked Triton, tensor cores), and the `wkv7`
entry point that picks one of the Triton kernels.

`wkv7(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False)` -> (y, final_state)
Inputs [B, T, H, 64] (bf16/fp16/fp32), w = log decay (<= 0), state [B, H, 64, 64] fp32 (one per
document with `cu_seqlens`, B == 1). Differentiable in every tensor input. Like fla, the `chunk`
kernel keeps only its inputs (and `initial_state`) for backward: do not write into them in place
before backward (autograd raises). Decoding one token:
`wkv7_step` (plain PyTorch, [B, H, N] inputs).

Backend choice: the `backend` argument (`chunk`, `fused_recurrent`, `naive`);
default `chunk` on CUDA, `fused_recurrent` under the CPU interpreter. The Triton kernels
need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before this package's kernels are
first imported; otherwise (and for float64 inputs, head size != 64 or T == 0) `wkv7` falls back
to `wkv7_naive` and warns once with the reason. `config` sets options of the `chunk` kernel for
one call (keys of `chunk.CONFIG`, e.g. {"checkpoint_chunks": 1}; checked by `chunk.resolve_config`).
"""

from __future__ import annotations

from ..dispatch import triton_unavailable, warn_fallback
from .naive import wkv7_naive, wkv7_step
from .torch_chunked import wkv7_torch_chunked

__all__ = ["wkv7", "wkv7_naive", "wkv7_step", "wkv7_torch_chunked", "last_backend"]

_last = {"backend": None}


def last_backend():
    """Which implementation the most recent `wkv7` call used (for tests and logging)."""
    return _last["backend"]


def _fallback_reason(r):
    if r.shape[-1] != 64:
        return f"head size {r.shape[-1]} (the Triton kernels support 64 only)"
    if r.shape[1] == 0:
        return "empty sequence"
    return triton_unavailable(r)


def wkv7(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False, backend=None, config=None):
    """The recurrence through `backend` (module docstring); `config`: options of the `chunk` kernel for this
    call (keys of `chunk.CONFIG`, checked even when another backend runs), ignored by the others."""
    if config:
        try:
            from .chunk import resolve_config
        except ImportError:  # no Triton: the options cannot apply; the reference runs below
            pass
        else:
            resolve_config(config)
    if backend != "naive":
        reason = _fallback_reason(r)
        if reason is not None:
            warn_fallback("wkv7", reason)
            backend = "naive"
    if backend is None:
        backend = "chunk" if r.is_cuda else "fused_recurrent"
    _last["backend"] = backend
    if backend == "naive":
        return wkv7_naive(r, w, k, v, a, b, initial_state=initial_state, cu_seqlens=cu_seqlens,
                          output_final_state=output_final_state)
    if backend == "chunk":
        from .chunk import chunk_wkv7

        return chunk_wkv7(r, w, k, v, a, b, initial_state=initial_state, cu_seqlens=cu_seqlens,
                          output_final_state=output_final_state, config=config)
    if backend == "fused_recurrent":
        from .fused_recurrent import fused_recurrent_wkv7

        return fused_recurrent_wkv7(r, w, k, v, a, b, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                    output_final_state=output_final_state)
    raise ValueError(f"unknown wkv7 backend {backend!r} (chunk, fused_recurrent, naive)")
