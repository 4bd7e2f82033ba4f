"""Sequential (token-by-token) Triton kernels for the RWKV-7 recurrence, forward and backward.

Per head, state S is N x N (value x key), fp32:

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t

Layout: inputs [B, T, H, N] (contiguous), N = 64. One program per (value-row block, sequence, head):
the rows of S are independent in the forward (`sa = S a` and `y = S r` are row-wise dot products),
and in the backward the state gradient is row-local too
(dS_{t-1} = dS_t diag(d_t) + (dS_t b_t) a_t^T), so a program keeps a [BV, N] block of S and of dS
in registers. The per-key gradients (r, w, k, a, b) are sums over all rows: with BV < N each row
block writes a partial sum that the wrapper adds up.

Saved for backward: the inputs, plus fp32 state checkpoints S_{16c-1} (the state before the first
token of every SEG = 16-token segment of every sequence), [n_segments, H, N, N] fp32, i.e.
N*N/SEG = 256 floats per (token, head), the same as BlinkDL's CUDA kernel. The backward walks the
segments in reverse; for each it recomputes the SEG states forward from the checkpoint into a
per-program scratch buffer (no step inversion, so no division by the decay: exact up to fp32
rounding whatever the decay), then walks the segment's tokens in reverse.

Numerics: everything is fp32; nothing here divides by the decay, so any w <= 0 works (the model's
w = -exp(-0.5) * sigmoid(.) keeps exp(w) in (0.545, 1), which only matters for the chunked kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import prepare_inputs

SEG = 16  # tokens between state checkpoints

# Launch parameters (the benchmark may tune these). BV = value rows per program (16, 32 or 64).
CONFIG = {"fwd_bv": 16, "fwd_warps": 2, "bwd_bv": 16, "bwd_warps": 4}


@triton.jit
def _seq_segments(i_n, cu_seqlens, seg_offsets, T, SEG: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence i_n's first and end token, its first checkpoint segment, its length and number of segments."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        seg0 = tl.load(seg_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        seg0 = i_n.to(tl.int64) * tl.cdiv(T, SEG)
    L = eos - bos
    return bos, eos, seg0, L, tl.cdiv(L, SEG)


@triton.jit
def _wkv7_fwd_kernel(
    r, w, k, v, a, b, y, h0, ht, ckpt, cu_seqlens, seg_offsets,
    T,
    H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_h = i_nh % H
    bos, eos, seg0, L, n_seg = _seq_segments(i_nh // H, cu_seqlens, seg_offsets, T, SEG, IS_VARLEN)

    o_v = i_v * BV + tl.arange(0, BV)
    o_k = tl.arange(0, N)
    o_s = o_v[:, None] * N + o_k[None, :]  # offsets of this row block inside one N x N state

    S = tl.zeros([BV, N], dtype=tl.float32)
    if USE_H0:
        S = tl.load(h0 + i_nh.to(tl.int64) * N * N + o_s).to(tl.float32)

    for c in range(0, n_seg):
        tl.store(ckpt + ((seg0 + c) * H + i_h) * N * N + o_s, S)
        t0 = bos + c * SEG
        t1 = tl.minimum(t0 + SEG, eos)
        for t in range(t0, t1):
            p = (t * H + i_h) * N
            w_t = tl.load(w + p + o_k).to(tl.float32)
            k_t = tl.load(k + p + o_k).to(tl.float32)
            a_t = tl.load(a + p + o_k).to(tl.float32)
            b_t = tl.load(b + p + o_k).to(tl.float32)
            r_t = tl.load(r + p + o_k).to(tl.float32)
            v_t = tl.load(v + p + o_v).to(tl.float32)
            sa = tl.sum(S * a_t[None, :], axis=1)
            S = S * tl.exp(w_t)[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
            y_t = tl.sum(S * r_t[None, :], axis=1)
            tl.store(y + p + o_v, y_t.to(y.dtype.element_ty))
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * N * N + o_s, S)


@triton.jit
def _wkv7_bwd_kernel(
    r, w, k, v, a, b, dy, dht, ckpt, scratch, dh0,
    dr, dw, dk, da, db, dv,
    cu_seqlens, seg_offsets,
    T, NH, PART,
    H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_h = i_nh % H
    bos, eos, seg0, L, n_seg = _seq_segments(i_nh // H, cu_seqlens, seg_offsets, T, SEG, IS_VARLEN)

    o_v = i_v * BV + tl.arange(0, BV)
    o_k = tl.arange(0, N)
    o_s = o_v[:, None] * N + o_k[None, :]
    o_b = tl.arange(0, BV)[:, None] * N + o_k[None, :]  # offsets inside one scratch slot [BV, N]
    sc = scratch + (i_v.to(tl.int64) * NH + i_nh) * SEG * BV * N
    part = i_v.to(tl.int64) * PART  # this row block's slice of the per-key partial-sum buffers

    dS = tl.zeros([BV, N], dtype=tl.float32)
    if USE_DHT:
        dS = tl.load(dht + i_nh.to(tl.int64) * N * N + o_s).to(tl.float32)

    for ci in range(0, n_seg):
        c = n_seg - 1 - ci
        t0 = bos + c * SEG
        t1 = tl.minimum(t0 + SEG, eos)
        # recompute the segment's states; slot j holds S_{t0 + j - 1}
        S = tl.load(ckpt + ((seg0 + c) * H + i_h) * N * N + o_s)
        for t in range(t0, t1):
            tl.store(sc + (t - t0) * BV * N + o_b, S)
            p = (t * H + i_h) * N
            w_t = tl.load(w + p + o_k).to(tl.float32)
            k_t = tl.load(k + p + o_k).to(tl.float32)
            a_t = tl.load(a + p + o_k).to(tl.float32)
            b_t = tl.load(b + p + o_k).to(tl.float32)
            v_t = tl.load(v + p + o_v).to(tl.float32)
            sa = tl.sum(S * a_t[None, :], axis=1)
            S = S * tl.exp(w_t)[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
        tl.debug_barrier()
        # S = S_{t1-1}; walk the segment backwards
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            Sp = tl.load(sc + (t - t0) * BV * N + o_b)
            p = (t * H + i_h) * N
            w_t = tl.load(w + p + o_k).to(tl.float32)
            k_t = tl.load(k + p + o_k).to(tl.float32)
            a_t = tl.load(a + p + o_k).to(tl.float32)
            b_t = tl.load(b + p + o_k).to(tl.float32)
            r_t = tl.load(r + p + o_k).to(tl.float32)
            v_t = tl.load(v + p + o_v).to(tl.float32)
            dy_t = tl.load(dy + p + o_v).to(tl.float32)
            d_t = tl.exp(w_t)

            dr_t = tl.sum(S * dy_t[:, None], axis=0)
            dS += dy_t[:, None] * r_t[None, :]
            dv_t = tl.sum(dS * k_t[None, :], axis=1)
            dk_t = tl.sum(dS * v_t[:, None], axis=0)
            sa = tl.sum(Sp * a_t[None, :], axis=1)
            db_t = tl.sum(dS * sa[:, None], axis=0)
            dsa = tl.sum(dS * b_t[None, :], axis=1)
            dw_t = tl.sum(dS * Sp, axis=0) * d_t
            da_t = tl.sum(Sp * dsa[:, None], axis=0)
            dS = dS * d_t[None, :] + dsa[:, None] * a_t[None, :]

            tl.store(dr + part + p + o_k, dr_t)
            tl.store(dw + part + p + o_k, dw_t)
            tl.store(dk + part + p + o_k, dk_t)
            tl.store(da + part + p + o_k, da_t)
            tl.store(db + part + p + o_k, db_t)
            tl.store(dv + p + o_v, dv_t.to(dv.dtype.element_ty))
            S = Sp
        tl.debug_barrier()
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * N * N + o_s, dS)


def _segments(T: int, B: int, cu_seqlens, device):
    """Number of checkpoint segments and, with cu_seqlens, each sequence's first segment index."""
    if cu_seqlens is None:
        return B * triton.cdiv(T, SEG), None
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = (lens + SEG - 1) // SEG
    offsets = torch.zeros(len(n) + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(n, 0)
    return int(offsets[-1].item()), offsets


def wkv7_fwd(r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state, bv=None, num_warps=None):
    B, T, H, N = r.shape
    NS = B if cu_seqlens is None else len(cu_seqlens) - 1
    bv = bv or CONFIG["fwd_bv"]
    n_seg, seg_offsets = _segments(T, B, cu_seqlens, r.device)
    y = torch.empty_like(r)
    ckpt = torch.empty(max(n_seg, 1), H, N, N, dtype=torch.float32, device=r.device)
    ht = torch.empty(NS, H, N, N, dtype=torch.float32, device=r.device) if output_final_state else None
    grid = (N // bv, NS * H)
    _wkv7_fwd_kernel[grid](
        r, w, k, v, a, b, y, initial_state, ht, ckpt, cu_seqlens, seg_offsets,
        T, H=H, N=N, BV=bv, SEG=SEG,
        USE_H0=initial_state is not None, STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None,
        num_warps=num_warps or CONFIG["fwd_warps"],
    )
    return y, ht, ckpt, seg_offsets


def wkv7_bwd(r, w, k, v, a, b, dy, dht, ckpt, seg_offsets, cu_seqlens, need_dh0, bv=None, num_warps=None):
    B, T, H, N = r.shape
    NS = B if cu_seqlens is None else len(cu_seqlens) - 1
    bv = bv or CONFIG["bwd_bv"]
    NV = N // bv
    dev = r.device
    scratch = torch.empty(NV * NS * H * SEG * bv * N, dtype=torch.float32, device=dev)
    parts = [torch.empty(NV, B, T, H, N, dtype=torch.float32, device=dev) for _ in range(5)]
    dv = torch.empty_like(v)
    dh0 = torch.empty(NS, H, N, N, dtype=torch.float32, device=dev) if need_dh0 else None
    _wkv7_bwd_kernel[(NV, NS * H)](
        r, w, k, v, a, b, dy, dht, ckpt, scratch, dh0,
        *parts, dv,
        cu_seqlens, seg_offsets,
        T, NS * H, B * T * H * N,
        H=H, N=N, BV=bv, SEG=SEG,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=cu_seqlens is not None,
        num_warps=num_warps or CONFIG["bwd_warps"],
    )
    dr, dw, dk, da, db = (p[0] if NV == 1 else p.sum(0) for p in parts)
    return dr, dw, dk, dv, da, db, dh0


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state):
        y, ht, ckpt, seg_offsets = wkv7_fwd(r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, seg_offsets, cu_seqlens)
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        r, w, k, v, a, b, ckpt, seg_offsets, cu_seqlens = ctx.saved_tensors
        dr, dw, dk, dv, da, db, dh0 = wkv7_bwd(
            r, w, k, v, a, b, dy.contiguous(), None if dht is None else dht.contiguous(),
            ckpt, seg_offsets, cu_seqlens, need_dh0=ctx.h0_dtype is not None and ctx.needs_input_grad[6],
        )
        grads = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b))]
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return (*grads, dh0, None, None)


def fused_recurrent_wkv7(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False):
    """Sequential Triton RWKV-7 recurrence. Inputs [B, T, H, 64]; returns (y, final_state or None).

    `initial_state` [B, H, 64, 64] (or [n_docs, H, 64, 64] with `cu_seqlens`), fp32 state math;
    y comes back in v's dtype, the final state in fp32. Differentiable in every tensor input.
    """
    r, w, k, v, a, b, initial_state, cu_seqlens = prepare_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    return _WKV7Function.apply(r, w, k, v, a, b, initial_state, cu_seqlens, bool(output_final_state))
