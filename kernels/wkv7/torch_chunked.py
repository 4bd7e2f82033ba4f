"""Chunked RWKV-7 recurrence in plain PyTorch: the fast path on CPU (autograd does the backward).

Same function as `naive.wkv7_naive`, computed a chunk of L tokens at a time. Inside a chunk the
state update S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T is a diagonal-decay
recurrence driven by two rank-1 inputs, (v_t, k_t) and (sa_t, b_t) with sa_t = S_{t-1} a_t.
Writing G_t = prod_{j<=t} d_j:

    sa_t = S_0 (G_{t-1} a_t) + sum_{i<t} [ (a_t . k_i G_{t-1}/G_i) v_i + (a_t . b_i G_{t-1}/G_i) sa_i ]

is a unit lower-triangular L x L system for all sa_t of the chunk (forward substitution = the
sequential recurrence, so it is as stable), after which the outputs and the chunk's final state
are matrix products. Decay ratios are formed as exp(differences of cumulative log decays), never
as a quotient of two small products. Only the chunk-to-chunk state passing is sequential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16


def _chunk_terms(r, w, k, a, b):
    """Per-chunk quantities that do not depend on the incoming state ([B, H, C, L, ...])."""
    L = r.shape[-2]
    cl = torch.cumsum(w, dim=-2)  # inclusive cumulative log decay
    cl_ex = cl - w  # exclusive
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = strict | torch.eye(L, dtype=torch.bool, device=r.device)
    # pairwise decay from token i to token t: [.., t, i, N]
    diff_ex = (cl_ex.unsqueeze(-2) - cl.unsqueeze(-3)).masked_fill(~strict[..., None], float("-inf"))
    diff_in = (cl.unsqueeze(-2) - cl.unsqueeze(-3)).masked_fill(~incl[..., None], float("-inf"))
    e_ex, e_in = torch.exp(diff_ex), torch.exp(diff_in)
    ae, re = a.unsqueeze(-2) * e_ex, r.unsqueeze(-2) * e_in  # [.., t, i, N]
    m_k = (ae * k.unsqueeze(-3)).sum(-1)  # [.., t, i]
    m_b = (ae * b.unsqueeze(-3)).sum(-1)
    q_k = (re * k.unsqueeze(-3)).sum(-1)
    q_b = (re * b.unsqueeze(-3)).sum(-1)
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    end = torch.exp(cl[..., -1:, :] - cl)  # decay from token i to the chunk end
    return dict(
        system=eye - m_b, m_k=m_k, q_k=q_k, q_b=q_b,
        a_dec=a * torch.exp(cl_ex), r_dec=r * torch.exp(cl),
        k_end=k * end, b_end=b * end, chunk_decay=torch.exp(cl[..., -1, :]),
    )


def wkv7_torch_chunked(r, w, k, v, a, b, initial_state=None, output_final_state=False, chunk: int = CHUNK):
    """[B, T, H, N] inputs -> (y [B, T, H, N] in the input dtype, final state [B, H, N, N] or None)."""
    B, T, H, N = r.shape
    cdt = torch.float64 if r.dtype == torch.float64 else torch.float32
    pad = (-T) % chunk
    # padding tokens have d = 1 and zero inputs: they leave the state unchanged
    to_chunks = lambda x: F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)).view(B, (T + pad) // chunk, chunk, H, N).permute(0, 3, 1, 2, 4)  # noqa: E731
    r_, w_, k_, v_, a_, b_ = (to_chunks(x) for x in (r, w, k, v, a, b))
    terms = _chunk_terms(r_, w_, k_, a_, b_)
    state = torch.zeros(B, H, N, N, dtype=cdt, device=r.device) if initial_state is None else initial_state.to(cdt)
    ys = []
    for c in range(r_.shape[2]):
        t = {name: x[:, :, c] for name, x in terms.items()}
        v_c = v_[:, :, c]
        rhs = t["a_dec"] @ state.transpose(-1, -2) + t["m_k"] @ v_c  # [B, H, L, N_value]
        sa = torch.linalg.solve_triangular(t["system"], rhs, upper=False, unitriangular=True)
        ys.append(t["r_dec"] @ state.transpose(-1, -2) + t["q_k"] @ v_c + t["q_b"] @ sa)
        state = (state * t["chunk_decay"].unsqueeze(-2)
                 + v_c.transpose(-1, -2) @ t["k_end"] + sa.transpose(-1, -2) @ t["b_end"])
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, N)[:, :T]
    return y.to(r.dtype), (state if output_final_state else None)
