"""MoBA top-k chunk sparse attention (SPEC section 3): `naive` is the plain-PyTorch reference and CPU path.

`sparse_attention_naive(q, k, v, chunk_size, topk, cu_seqlens=None)` on [B, T, H, D] inputs;
`chunk_selection` exposes which past chunks each query picks; `sparse_attention_dense_mask` is the
O(T^2) test oracle.
"""

from .naive import chunk_selection, sparse_attention_dense_mask, sparse_attention_naive

__all__ = ["chunk_selection", "sparse_attention_naive", "sparse_attention_dense_mask"]
