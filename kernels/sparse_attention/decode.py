"""Decoding with MoBA top-k chunk sparse attention: one new query at a time against a chunked KV cache
(SPEC section 5). Same rule as training (`naive.sparse_attention_naive`): the query attends causally
to its own (current, partial) chunk, i.e. every token since the last chunk boundary including the one
just appended, plus the `topk - 1` completed chunks whose mean key scores highest against it (ties
to the earlier chunk).

The cache keeps, per batch row and head, the keys and values and the mean key of every completed
chunk (computed once, when the chunk completes). A step costs O(n_chunks * D) to score the chunk
means plus O(topk * chunk_size * D) for the attention, so it is flat in the context length apart
from the (cheap) scoring. Plain PyTorch; no host synchronisation per step.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ChunkedKVCache"]


class ChunkedKVCache:
    """KV cache for one sparse-attention layer.

    cache = ChunkedKVCache(n_heads, head_dim, chunk_size, topk, device, dtype, batch_size=1)
    cache.extend(k, v)        # prompt: [B, T, H, D] (the model's layout)
    cache.append(k, v)        # one token: [B, H, D]
    y = cache.attend(q)       # [B, H, D] -> [B, H, D]: attention of q for the newest token

    Keys and values are stored in `dtype`; chunk means and the attention math run in fp32
    (float64 when dtype is float64). Buffers grow by doubling (pass `max_len` to preallocate).
    """

    def __init__(self, n_heads: int, head_dim: int, chunk_size: int, topk: int, device=None, dtype=torch.float32,
                 batch_size: int = 1, max_len: int | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1 (the own chunk counts as one), got {topk}")
        self.n_heads, self.head_dim, self.chunk_size, self.topk = n_heads, head_dim, chunk_size, topk
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.length = 0
        capacity = max(chunk_size, max_len or 0)
        capacity = -(-capacity // chunk_size) * chunk_size
        self._k = torch.empty(batch_size, n_heads, capacity, head_dim, device=self.device, dtype=dtype)
        self._v = torch.empty_like(self._k)
        self._means = torch.empty(batch_size, n_heads, capacity // chunk_size, head_dim, device=self.device,
                                  dtype=self.compute_dtype)
        self._offsets = torch.arange(chunk_size, device=self.device)

    # ---------------------------------------------------------------- storage
    @property
    def n_complete_chunks(self) -> int:
        return self.length // self.chunk_size

    def _reserve(self, new_length: int) -> None:
        capacity = self._k.shape[2]
        if new_length <= capacity:
            return
        while capacity < new_length:
            capacity *= 2
        capacity = -(-capacity // self.chunk_size) * self.chunk_size
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        old = self._means
        new = old.new_empty(old.shape[0], old.shape[1], capacity // self.chunk_size, old.shape[3])
        new[:, :, : self.n_complete_chunks] = old[:, :, : self.n_complete_chunks]
        self._means = new

    def _complete_chunks(self, old_length: int) -> None:
        """Chunk means of the chunks that became complete, computed from the stored keys."""
        first, last = old_length // self.chunk_size, self.length // self.chunk_size
        cs = self.chunk_size
        step = max(1, 65536 // cs)  # bound the compute-dtype temporary of a long prompt
        for lo in range(first, last, step):
            hi = min(lo + step, last)
            keys = self._k[:, :, lo * cs : hi * cs].to(self.compute_dtype)
            B, H, _, D = keys.shape
            self._means[:, :, lo:hi] = keys.reshape(B, H, hi - lo, cs, D).mean(-2)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a block of tokens, [B, T, H, D] each (the prompt)."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"extend expects k, v of shape [B, T, H, D], got {tuple(k.shape)}, {tuple(v.shape)}")
        n = k.shape[1]
        old = self.length
        self._reserve(old + n)
        self._k[:, :, old : old + n] = k.transpose(1, 2).to(self.dtype)
        self._v[:, :, old : old + n] = v.transpose(1, 2).to(self.dtype)
        self.length = old + n
        self._complete_chunks(old)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one token, [B, H, D] each."""
        if k.dim() != 3 or k.shape != v.shape:
            raise ValueError(f"append expects k, v of shape [B, H, D], got {tuple(k.shape)}, {tuple(v.shape)}")
        old = self.length
        self._reserve(old + 1)
        self._k[:, :, old] = k.to(self.dtype)
        self._v[:, :, old] = v.to(self.dtype)
        self.length = old + 1
        self._complete_chunks(old)

    # ---------------------------------------------------------------- attention
    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Completed chunks the newest token attends to besides its own: [B, H, min(topk-1, n)], best first.

        The newest token (position length-1) sits in chunk (length-1) // cs; its eligible chunks are
        the ones before that (a chunk that the newest token just completed is its own chunk).
        """
        n_eligible = (self.length - 1) // self.chunk_size if self.length else 0
        n_pick = min(self.topk - 1, n_eligible)
        if n_pick == 0:
            return torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.long, device=q.device)
        means = self._means[:, :, :n_eligible]
        scores = (q.to(self.compute_dtype).unsqueeze(-2) * means).sum(-1)
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_pick]

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention output of the newest token for query q [B, H, D] -> [B, H, D] (q's dtype)."""
        if self.length == 0:
            raise RuntimeError("attend() needs at least one appended token")
        cs, cd = self.chunk_size, self.compute_dtype
        own_start = ((self.length - 1) // cs) * cs
        qc = q.to(cd).unsqueeze(-1) / math.sqrt(self.head_dim)  # [B, H, D, 1]
        keys = [self._k[:, :, own_start : self.length]]
        values = [self._v[:, :, own_start : self.length]]
        chosen = self.select(q)
        if chosen.shape[-1]:
            B, H, n = chosen.shape
            shape = (B, H, self._k.shape[2] // cs, cs, self.head_dim)
            b_idx = torch.arange(B, device=chosen.device)[:, None, None]
            h_idx = torch.arange(H, device=chosen.device)[None, :, None]
            # whole chunks by index: [B, H, n, cs, D] -> [B, H, n * cs, D]
            keys.append(self._k.view(shape)[b_idx, h_idx, chosen].flatten(2, 3))
            values.append(self._v.view(shape)[b_idx, h_idx, chosen].flatten(2, 3))
        logits = torch.cat([(kk.to(cd) @ qc).squeeze(-1) for kk in keys], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        out, start = 0, 0
        for vv in values:
            width = vv.shape[2]
            out = out + (probs[..., None, start : start + width] @ vv.to(cd)).squeeze(-2)
            start += width
        return out.to(q.dtype)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """append(k, v) then attend(q): one decoding step, [B, H, D] each."""
        self.append(k, v)
        return self.attend(q)
