"""Plain-PyTorch RWKV-7 recurrence: the reference every fast kernel is tested against.

Per head, with state S (value x key, N x N) kept in fp32 (float64 if the inputs are float64):

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t

`w` is the log decay (<= 0). The model passes a = -kk and b = kk * iclr (SPEC section 2).
"""

from __future__ import annotations

import torch


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def wkv7_step(state, r, w, k, v, a, b):
    """One token for every (batch, head): inputs [B, H, N], state [B, H, N, N] -> (y [B, H, N], new state)."""
    dt = state.dtype
    r, w, k, v, a, b = (t.to(dt) for t in (r, w, k, v, a, b))
    sa = torch.einsum("bhij,bhj->bhi", state, a)
    state = state * torch.exp(w).unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = torch.einsum("bhij,bhj->bhi", state, r)
    return y, state


def _wkv7_sequence(r, w, k, v, a, b, state):
    ys = []
    for t in range(r.shape[1]):
        y, state = wkv7_step(state, r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def wkv7_naive(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False):
    """Token-by-token recurrence over [B, T, H, N] inputs; returns (y in the input dtype, final state or None).

    `initial_state` is [B, H, N, N] (or [n_docs, H, N, N] with `cu_seqlens`). With `cu_seqlens`
    (B == 1, int offsets of packed documents) the state restarts at every document start and the
    final state has one entry per document.
    """
    B, T, H, N = r.shape
    sdt = _state_dtype(r)
    if cu_seqlens is None:
        s0 = torch.zeros(B, H, N, N, dtype=sdt, device=r.device) if initial_state is None else initial_state.to(sdt)
        y, s = _wkv7_sequence(r, w, k, v, a, b, s0) if T > 0 else (r.new_zeros(B, 0, H, N, dtype=sdt), s0)
        return y.to(r.dtype), (s if output_final_state else None)
    if B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (packed documents), got B={B}")
    bounds = [int(x) for x in cu_seqlens]
    if bounds[0] != 0 or bounds[-1] != T or any(e < s for s, e in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        s0 = torch.zeros(1, H, N, N, dtype=sdt, device=r.device) if initial_state is None else initial_state[i : i + 1].to(sdt)
        if e > s:
            y, st = _wkv7_sequence(*(t[:, s:e] for t in (r, w, k, v, a, b)), s0)
            ys.append(y)
        else:
            st = s0
        finals.append(st)
    y = torch.cat(ys, dim=1) if ys else r.new_zeros(1, 0, H, N, dtype=sdt)
    return y.to(r.dtype), (torch.cat(finals, 0) if output_final_state else None)
