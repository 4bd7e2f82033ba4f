"""MoBA top-k chunk sparse attention (SPEC section 3).

- `sparse_attention(q, k, v, chunk_size, topk, cu_seqlens=None)`: the entry point, [B, T, H, D].
  Runs the Triton kernels (`triton_topk.sparse_attention_triton`) for CUDA tensors, or for CPU
  tensors when TRITON_INTERPRET=1 is set before the kernels are first imported; otherwise (and for
  float64 inputs, head size > 128, or no importable Triton) it falls back to `sparse_attention_naive`
  and warns once with the reason. `backend="naive"` / `"triton"` forces one.
- `sparse_attention_naive` is the plain-PyTorch reference and CPU path; `chunk_selection` exposes
  which past chunks each query picks; `sparse_attention_dense_mask` is the O(T^2) test oracle.
- `ChunkedKVCache`: decoding one token at a time with the same selection rule.
"""

from __future__ import annotations

from ..dispatch import triton_unavailable, warn_fallback
from .decode import ChunkedKVCache
from .naive import chunk_selection, sparse_attention_dense_mask, sparse_attention_naive

__all__ = [
    "sparse_attention",
    "chunk_selection",
    "sparse_attention_naive",
    "sparse_attention_dense_mask",
    "ChunkedKVCache",
    "last_backend",
]

_last = {"backend": None}


def last_backend():
    """Which implementation the most recent `sparse_attention` call used ("triton" or "naive")."""
    return _last["backend"]


def _fallback_reason(q) -> str | None:
    if q.dim() == 4 and q.shape[-1] > 128:
        return f"head size {q.shape[-1]} > 128"
    return triton_unavailable(q)


def sparse_attention(q, k, v, chunk_size: int, topk: int, cu_seqlens=None, *, backend: str | None = None,
                     config: dict | None = None):
    """MoBA sparse attention [B, T, H, D] -> [B, T, H, D] (input dtype), differentiable in q, k, v.

    Per query: its own chunk (causal) plus the `topk - 1` strictly past chunks with the highest
    q . mean(k) score (ties to the earlier chunk), one softmax with scale 1/sqrt(D). With
    `cu_seqlens` (B == 1) packed documents are independent sequences. `config` passes launch
    parameters to the Triton kernels (keys of `triton_topk.CONFIG_GPU`; the reference ignores them).
    """
    if backend not in (None, "triton", "naive"):
        raise ValueError(f"unknown sparse attention backend {backend!r} (triton, naive)")
    if config:  # checked even when the reference runs, so a bad option fails on every machine with Triton
        try:
            from .triton_topk import resolve_config
        except ImportError:  # no Triton: the options cannot apply; the reference runs below
            pass
        else:
            resolve_config(config, q.device)
    if backend is None:
        reason = _fallback_reason(q)
        if reason is not None:
            warn_fallback("sparse_attention", reason)
            backend = "naive"
        else:
            backend = "triton"
    _last["backend"] = backend
    if backend == "naive":
        return sparse_attention_naive(q, k, v, chunk_size, topk, cu_seqlens=cu_seqlens)
    from .triton_topk import sparse_attention_triton

    return sparse_attention_triton(q, k, v, chunk_size, topk, cu_seqlens=cu_seqlens, config=config)
