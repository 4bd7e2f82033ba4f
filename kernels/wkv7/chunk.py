"""Chunked Triton kernels for the RWKV-7 recurrence (tensor cores), forward and backward.

Per head, S is N x N (value x key), fp32:  S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T,  y_t = S_t r_t,
D_t = diag(exp(w_t)). Cut time into chunks of BT = 16 tokens (CONFIG["chunk_len"]). Inside a chunk (t, s = 1..BT), with
G_t = w_1 + ... + w_t (cumulative log decay, per key), S_0 the state entering the chunk and
u_t = S_{t-1} a_t (the "sa" vectors), unrolling the recurrence gives

    S_t = S_0 diag(e^{G_t}) + sum_{s<=t} u_s (b_s e^{G_t-G_s})^T + v_s (k_s e^{G_t-G_s})^T.

With  at_t = a_t e^{G_{t-1}},  rt_t = r_t e^{G_t},  bh_s = b_s e^{-G_s},  kh_s = k_s e^{-G_s}  (rows of
[BT, K] tiles) and the BT x BT matrices  Aab = strict_lower(at bh^T), Aak = strict_lower(at kh^T),
Arb = lower(rt bh^T), Ark = lower(rt kh^T):

    U  = (I - Aab)^{-1} (at S_0^T + Aak V) = W S_0^T + Q V,     W = M at, Q = M Aak, M = (I - Aab)^{-1}
    Y  = rt S_0^T + Arb U + Ark V
    S_BT = S_0 diag(e^{G_BT}) + U^T (bh e^{G_BT}) + V^T (kh e^{G_BT})

M is the UT/WY form of the product of the BT (D + a b^T) factors; (I - Aab) is unit lower
triangular and is inverted by repeated squaring, (I + A)(I + A^2)(I + A^4)(I + A^8), in exact fp32
(CONFIG["exact_precision"]).

Numerics: e^{-G_s} grows like exp(0.6065 * 16) ~ 1.6e4 over a chunk when the decay sits at its
model floor exp(w) = 0.545 (w = -exp(-0.5) sigmoid(.) >= -0.6065); all of that is well inside fp32
range and every A entry is a product of factors, never a difference, so no precision is lost.
The kernels rely on the bounded decay: with much smaller w (below about -5 per token) e^{-G}
would overflow fp32. Everything is fp32; the matrix products use tf32 tensor cores for bf16/fp16
inputs and exact fp32 for fp32 inputs (CONFIG["dot_precision"]); the inverse is always exact fp32.

Kernels (grid):
  forward   _prep (chunks x H)                W, Q per chunk -> HBM (fp32)
            _fwd_state (V blocks x seqs*H [x groups], sequential over chunks): the state entering
                every chunk -> HBM (fp32, or bf16 for bf16 inputs); optionally y too (fuse_out)
            _fwd_out (chunks x H)             y
  backward  _prep again (recomputed, not saved)
            _fwd_state again (checkpoint_chunks 0, the default: the chunk states, not saved), or
                _restore_states (checkpoint_chunks c > 1: the states between saved checkpoints)
            _bwd_state (V blocks x seqs*H [x groups], reverse over chunks): dL/dS at every chunk
                end -> HBM, dh0
            _bwd_grads (chunks x H)           dr, dw, dk, dv, da, db (recomputes M and U per chunk);
                at 64-token chunks (one would not fit shared memory) or with grad_kernels 3, three kernels
                instead, passing fp32 per-chunk terms through HBM: _bwd_grads_u (U, dU -> dv, dW, dQ),
                _bwd_grads_s (Arb, Ark, rt, bh, kh terms -> dr), _bwd_grads_wy (back through the WY inverse
                -> dw, dk, da, db)
  When sequences x heads are too few to fill the GPU (long single sequences), the sequential
  passes become a two-level scan: groups of chunks are walked in parallel from state 0 and from
  the identity (rows N..2N of an "augmented" state) to get each group's affine map S -> S P + X,
  _scan_kernel walks the groups (S <- S P + X, a 64x64 product per group), and the per-chunk walk
  restarts in parallel from every group's entering state.
Saved for backward: by default (CONFIG["checkpoint_chunks"] = 0) the inputs and the initial state
only, as fla does; backward runs the forward state pass again. With checkpoint_chunks = c > 0 also
every c-th chunk state ([n_chunks / c, H, 64, 64], fp32 for fp32 inputs, bf16 for bf16/fp16 inputs;
c = 1: four bf16 inputs' worth), the others restored in backward (_restore_states: short walks from
every checkpoint, in parallel). Everything else is recomputed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .inputs import prepare_inputs

# Launch parameters (the benchmark sweeps them). dot_precision: "tf32" or "ieee" (exact fp32, slower)
# for the matrix products, "bf16" (operands rounded to bf16: 14.2 -> 12.0 ms at 8x4096x64 on an H100,
# but twice the error of tf32: gradients 6.4e-3 vs 3.1e-3, fla 4.0e-3), "auto" = ieee for fp32 inputs
# and tf32 for bf16/fp16.
CONFIG = {
    # tokens per chunk, BT: 16, 32 or 64 (needs w >= about -88 / BT). 32 halves the sequential steps and the
    # saved states but its tiles spill (Triton 3.6: _bwd_grads 756 B even with 8 warps) and it is twice
    # as slow (32.5 vs 15.6 ms at 8x4096x64 on an H200). 64 (experimental: exact on the GPU too, but 2.4x
    # slower, 37.5 vs 15.4 ms there: _prep and _bwd_grads_wy, which form the 64 x 64 WY inverse by repeated
    # squaring, cost 20 ms, and the state passes are no faster) uses warpgroup-sized tiles, with _bwd_grads
    # split in three kernels (its one-kernel form needs 278 KB of shared memory) and its own warp defaults
    # (CHUNK64_WARPS); fp32 inputs are slow there (exact fp32 products on 64 x 64 tiles spill heavily).
    "chunk_len": 16,
    "dot_precision": "auto",  # auto: ieee for fp32 inputs, else tf32
    # The products that must stay fp32-exact (the WY inverse, the group scan): "ieee" (FMA loops),
    # "tf32x3" (three tf32 tensor-core products, near-fp32 accuracy: 15.8 -> 14.2 ms at 8x4096x64 on
    # an H100 with unchanged error), or "auto" = ieee for fp32 inputs, tf32x3 for bf16/fp16.
    "exact_precision": "auto",
    # Defaults from the H100 sweep in docs/benchmarks.md (2026-11-28).
    "state_bv": 64,  # value rows per program in the two sequential state passes
    "state_warps": 2,
    # load pipeline stages of the two sequential state passes (Triton's default 3). At 64-token chunks
    # they set the shared memory: 65 / 131 / 201 KB for 1 / 2 / 3 (compile-only, sm_90), i.e. how many
    # programs share an SM with 4 warps (8 warps use every register of an SM anyway).
    "state_stages": 3,
    # How a sequential pass steps the state over a chunk. "direct": U = W S^T + Q V, then S <- S e^{gC} +
    # U^T be + V^T ke (two dependent products and a transpose per chunk). "affine" (untimed): the same
    # step as S <- S e^{gC} + S P + V^T Z with P [64, 64] and Z formed from the chunk's inputs alone, so
    # only S P waits on the previous chunk (more products per step, a shorter dependent chain); likewise
    # backward. Cannot fuse the output (fuse_out needs U).
    "state_step": "direct",
    "chunk_warps": 1,  # the per-chunk parallel kernels (_prep, _fwd_out)
    # _bwd_grads: 2 warps. They spill 696 B, but by registers and shared memory four programs fit an SM
    # instead of two (not checked with ncu): 7.18 -> 5.78 ms at 8x4096x64 on an H200 (docs/benchmarks.md,
    # session 6). 4 was the H100 sweep's choice; 1 spills 3.5 KB.
    "grad_warps": 2,
    # _bwd_grads works through the [64, 64] state and its gradient in blocks of grad_bv value rows. 64
    # (one block; v, dy loaded late) cut its spills from 348 to 196 B under Triton 3.6 and its time from
    # 7.37 to 7.10 ms at 8x4096x64 on an H100; 32 keeps more accumulators live across the loop and
    # spills 1.6 KB (39.5 ms in all, against 13.9).
    "grad_bv": 64,
    # _bwd_grads as one kernel (1) or three (3: _bwd_grads_u, _bwd_grads_s, _bwd_grads_wy, fp32 per-chunk terms
    # through HBM, fewer registers each); "auto": 3 at 64-token chunks (where one kernel needs 278 KB of shared
    # memory and is refused), 1 otherwise. At 16-token chunks three kernels are slower: 20.5 vs 15.4 ms at
    # 8x4096x64 on an H200 (with 4 grad warps).
    "grad_kernels": "auto",
    "scan_bv": 32,  # the group scan of the two-level pass (a 64x64 fp32 product per group)
    "scan_warps": 4,
    "fuse_out": False,  # compute y inside the forward state pass (else a separate parallel kernel)
    # per-chunk states kept for backward: "fp32", "bf16" (half the memory traffic, like fla), or
    # "auto" = bf16 for bf16/fp16 inputs, fp32 for fp32 inputs
    "state_dtype": "auto",
    # Chunk states saved for backward. 0 (default): none, only the inputs (and initial state) are kept,
    # as fla does; backward runs the forward state pass again (+1.9 ms at 8x4096x64 on an H200, still
    # 1.53x fla; docs/benchmarks.md). The initial state is then saved: writing into it in place before
    # backward makes autograd raise. c > 0: every c-th chunk state (bf16 for bf16 inputs). 1: all of
    # them, four inputs' worth of memory, fastest (13.7 vs 15.6 ms). 4: one state per 64 tokens (one
    # input's worth); backward restores the others (_restore_states), 16.2 ms.
    "checkpoint_chunks": 0,
    # Keep the forward's W, Q factors for backward (fp32: 2.5 bf16 inputs' worth more memory) instead of
    # recomputing them with _prep: 14.19 -> 13.23 ms at 8x4096x64 on an H100 (docs/benchmarks.md).
    "save_wy": False,
    # The sequential passes over chunks can be split into groups of chunks (two-level scan: each
    # group's affine map S -> S P + X in parallel, a short scan over groups, then the chunks again
    # in parallel), which pays off when sequences x heads cannot fill the GPU. "auto" picks the
    # group size (or none) from a simple cost model with `programs_per_sm` resident programs per
    # SM; an int forces that many chunks per group (0: never split).
    "group_chunks": "auto",
    "programs_per_sm": 2,
}


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token of the chunk, end of its sequence) as int64 flat token indices."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_b = (i_c // NT).to(tl.int64)
        i_t = (i_c % NT).to(tl.int64)
        bos = i_b * T
        eos = bos + T
    return bos + i_t * BT, eos


@triton.jit
def _load_rows(ptr, t0, eos, i_h, cols, H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr):
    """[BT, len(cols)] tile of a [*, H, N] tensor starting at token t0, rows past eos read as 0, in fp32."""
    o_t = t0 + tl.arange(0, BT)
    m = o_t < eos
    return tl.load(ptr + (o_t[:, None] * H + i_h) * N + cols[None, :], mask=m[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, val, t0, eos, i_h, cols, H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    m = o_t < eos
    tl.store(ptr + (o_t[:, None] * H + i_h) * N + cols[None, :], val.to(ptr.dtype.element_ty), mask=m[:, None])


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation: operands as tf32 or exact fp32 (PREC "tf32" / "ieee"), or rounded
    to bf16 first (PREC "bf16": the tensor cores' fastest input, for the benchmark to weigh against
    its error)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _inv_unit_lower(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, EXACT: tl.constexpr):
    """(I - A)^{-1} for strictly lower-triangular A [BT, BT]: (I+A)(I+A^2)(I+A^4)... in exact fp32."""
    o = tl.arange(0, BT)
    M = (o[:, None] == o[None, :]).to(tl.float32) + A
    P = A
    for _ in tl.static_range(LOG2_BT - 1):
        P = tl.dot(P, P, input_precision=EXACT)
        M = M + tl.dot(M, P, input_precision=EXACT)
    return M


# ----------------------------------------------------------------------------- forward


@triton.jit
def _wy(w_c, k_c, a_c, b_c, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr):
    """One chunk's cumulative log decay G, decayed rows at, bh, kh, the strictly lower Aak,
    M = (I - Aab)^{-1} and the WY factors W = M at, Q = M Aak (module docstring)."""
    o_t = tl.arange(0, BT)
    G = tl.cumsum(w_c, axis=0)
    at = a_c * tl.exp(G - w_c)
    eGi = tl.exp(-G)
    bh = b_c * eGi
    kh = k_c * eGi
    strict = o_t[:, None] > o_t[None, :]
    Aab = tl.where(strict, tl.dot(at, tl.trans(bh), input_precision=EXACT), 0.0)
    Aak = tl.where(strict, _dot(at, tl.trans(kh), PREC), 0.0)
    M = _inv_unit_lower(Aab, BT, LOG2_BT, EXACT)
    return G, at, bh, kh, Aak, M, _dot(M, at, PREC), _dot(M, Aak, PREC)


@triton.jit
def _prep_kernel(
    w, k, a, b, Wbuf, Qbuf, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0, eos = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    o_k = tl.arange(0, N)
    o_t = tl.arange(0, BT)
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    k_c = _load_rows(k, t0, eos, i_h, o_k, H, N, BT)
    a_c = _load_rows(a, t0, eos, i_h, o_k, H, N, BT)
    b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
    G, at, bh, kh, Aak, M, Wm, Qm = _wy(w_c, k_c, a_c, b_c, BT, LOG2_BT, PREC, EXACT)
    base = i_c.to(tl.int64) * H + i_h
    tl.store(Wbuf + base * BT * N + o_t[:, None] * N + o_k[None, :], Wm)
    tl.store(Qbuf + base * BT * BT + o_t[:, None] * BT + o_t[None, :], Qm)


@triton.jit
def _seq_bounds(i_n, cu_seqlens, chunk_offsets, group_offsets, T, NT, NG,
                IS_VARLEN: tl.constexpr, GROUPED: tl.constexpr):
    """(first token, end token, first chunk, first group) of sequence i_n, int64."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
        if GROUPED:
            g0 = tl.load(group_offsets + i_n).to(tl.int64)
        else:
            g0 = c0 * 0
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        c0 = i_n.to(tl.int64) * NT
        g0 = i_n.to(tl.int64) * NG
    return bos, eos, c0, g0


@triton.jit
def _walk_span(cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC,
               H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
               IS_VARLEN: tl.constexpr, GROUPED: tl.constexpr):
    """What one program of a sequential pass (grid: row blocks x seqs*H x groups) walks: its sequence
    and head, its chunks [c_lo, c_hi), its rows of the state (o_v, offsets o_s), whether it has
    chunks at all (active) and its group's row in group-indexed buffers (gbase)."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_g = tl.program_id(2)
    i_h = i_nh % H
    bos, eos, c0, g0 = _seq_bounds(i_nh // H, cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, IS_VARLEN,
                                   GROUPED)
    n_chunks = tl.cdiv(eos - bos, BT)
    c_lo = i_g * GC
    c_hi = tl.minimum(c_lo + GC, n_chunks)
    o_v = i_v * BV + tl.arange(0, BV)
    o_s = o_v[:, None] * N + tl.arange(0, N)[None, :]
    active = o_s < (n_chunks - c_lo) * (2 * N * N)  # [BV, N], all true iff this program has chunks to walk
    gbase = (g0 + i_g) * H + i_h
    return i_nh, i_h, bos, eos, c0, c_lo, c_hi, o_v, o_s, active, gbase


@triton.jit
def _walk_start(init, group_init, i_nh, gbase, o_v, o_s, active, N: tl.constexpr, BV: tl.constexpr,
                USE_INIT: tl.constexpr, GROUPED: tl.constexpr, AUG: tl.constexpr):
    """The carried [BV, N] rows at the start of a walk: the identity in rows N..2N (AUG), the group's
    entering value (GROUPED), the sequence's initial value (USE_INIT), or zero; in fp32."""
    if AUG:
        S = ((o_v[:, None] - N) == tl.arange(0, N)[None, :]).to(tl.float32)
    elif GROUPED:
        S = tl.load(group_init + gbase * N * N + o_s, mask=active, other=0.0).to(tl.float32)
    elif USE_INIT:
        S = tl.load(init + i_nh.to(tl.int64) * N * N + o_s).to(tl.float32)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    return S


@triton.jit
def _fwd_state_kernel(
    r, w, k, v, b, y, Wbuf, Qbuf, h0, ht, states, gstates, Xbuf,
    cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_STATES: tl.constexpr, FUSE_OUT: tl.constexpr,
    GROUPED: tl.constexpr, AUG: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
    AFFINE: tl.constexpr = False,
):
    """Walk the chunks of group i_g (all chunks when not GROUPED) carrying a [BV, N] block of rows of S.

    AUG: rows 0..N-1 start at 0 and see the values, rows N..2N-1 start at the identity and see zero
    values; at the end they hold X and P of the group's affine map S_end = S_start P + X (-> Xbuf).
    Otherwise the walk starts from h0 (not GROUPED) or from the group's state gstates[g] and
    stores each chunk's entering state (STORE_STATES) and the chunk's output rows (FUSE_OUT).
    """
    i_nh, i_h, bos, eos, c0, c_lo, c_hi, o_v, o_s, active, gbase = _walk_span(
        cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC, H, N, BT, BV, IS_VARLEN, GROUPED)
    o_k = tl.arange(0, N)
    o_t = tl.arange(0, BT)
    vmask = o_v < N
    lower = o_t[:, None] >= o_t[None, :]
    S = _walk_start(h0, gstates, i_nh, gbase, o_v, o_s, active, N, BV, USE_H0, GROUPED, AUG)
    for c in range(c_lo, c_hi):
        base = (c0 + c) * H + i_h
        if STORE_STATES:
            tl.store(states + base * N * N + o_s, S.to(states.dtype.element_ty))
        t0 = bos + c * BT
        rows = t0 + o_t
        rmask = rows < eos
        w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
        k_c = _load_rows(k, t0, eos, i_h, o_k, H, N, BT)
        b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
        v_c = tl.load(v + (rows[:, None] * H + i_h) * N + o_v[None, :], mask=rmask[:, None] & vmask[None, :],
                      other=0.0).to(tl.float32)
        Wm = tl.load(Wbuf + base * BT * N + o_t[:, None] * N + o_k[None, :])
        Qm = tl.load(Qbuf + base * BT * BT + o_t[:, None] * BT + o_t[None, :])
        G = tl.cumsum(w_c, axis=0)
        gC = tl.sum(w_c, axis=0)
        eGi = tl.exp(-G)
        eGC = tl.exp(gC)
        e = eGi * eGC[None, :]
        if AFFINE:
            # U^T = S W^T + V^T Q^T folded into the step: S <- S e^{gC} + S (W^T be) + V^T (Q^T be + ke),
            # where be = b e^{gC-G}, ke = k e^{gC-G}. Both factors are independent of S, so the walk's
            # dependent chain is one [BV, N] x [N, N] product instead of two products and a transpose.
            be = b_c * e
            P = _dot(tl.trans(Wm), be, PREC)  # [N, N]
            Z = _dot(tl.trans(Qm), be, PREC) + k_c * e  # [BT, N]
            S = S * eGC[None, :] + _dot(S, P, PREC) + _dot(tl.trans(v_c), Z, PREC)
        else:
            ST = tl.trans(S)
            U = _dot(Wm, ST, PREC) + _dot(Qm, v_c, PREC)  # [BT, BV]
            if FUSE_OUT:
                rt = _load_rows(r, t0, eos, i_h, o_k, H, N, BT) * tl.exp(G)
                Arb = tl.where(lower, _dot(rt, tl.trans(b_c * eGi), PREC), 0.0)
                Ark = tl.where(lower, _dot(rt, tl.trans(k_c * eGi), PREC), 0.0)
                Y = _dot(rt, ST, PREC) + _dot(Arb, U, PREC) \
                    + _dot(Ark, v_c, PREC)
                tl.store(y + (rows[:, None] * H + i_h) * N + o_v[None, :], Y.to(y.dtype.element_ty),
                         mask=rmask[:, None])
            S = S * eGC[None, :] + _dot(tl.trans(U), b_c * e, PREC) \
                + _dot(tl.trans(v_c), k_c * e, PREC)
    if AUG:
        tl.store(Xbuf + gbase * 2 * N * N + o_s, S, mask=active)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * N * N + o_s, S)


@triton.jit
def _scan_kernel(
    init, final, gstates, Xbuf, cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
    EXACT: tl.constexpr,
):
    """Sequential pass over groups: S <- S P_g + X_g, storing the state entering every group.

    Forward: init = h0, final = ht, groups in order. Backward (REVERSE): init = dht, final = dh0,
    the state is dL/dS and groups go last to first (the group maps are the transposed ones).
    """
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0, g0 = _seq_bounds(i_n, cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, IS_VARLEN, True)
    n_groups = tl.cdiv(tl.cdiv(eos - bos, BT), GC)
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = tl.arange(0, N)
    o_s = o_v[:, None] * N + o_k[None, :]
    o_p = (N + o_k[:, None]) * N + o_k[None, :]
    S = tl.zeros([BV, N], dtype=tl.float32)
    if USE_INIT:
        S = tl.load(init + i_nh.to(tl.int64) * N * N + o_s).to(tl.float32)
    for gi in range(0, n_groups):
        if REVERSE:
            g = n_groups - 1 - gi
        else:
            g = gi
        gbase = (g0 + g) * H + i_h
        tl.store(gstates + gbase * N * N + o_s, S)
        X = tl.load(Xbuf + gbase * 2 * N * N + o_s)
        P = tl.load(Xbuf + gbase * 2 * N * N + o_p)
        S = tl.dot(S, P, input_precision=EXACT) + X
    if STORE_FINAL:
        tl.store(final + i_nh.to(tl.int64) * N * N + o_s, S)


@triton.jit
def _fwd_out_kernel(
    r, w, k, v, b, y, Wbuf, Qbuf, states, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0, eos = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    o_k = tl.arange(0, N)
    o_t = tl.arange(0, BT)
    r_c = _load_rows(r, t0, eos, i_h, o_k, H, N, BT)
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    k_c = _load_rows(k, t0, eos, i_h, o_k, H, N, BT)
    b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
    v_c = _load_rows(v, t0, eos, i_h, o_k, H, N, BT)
    base = i_c.to(tl.int64) * H + i_h
    S0 = tl.load(states + base * N * N + o_k[:, None] * N + o_k[None, :]).to(tl.float32)
    Wm = tl.load(Wbuf + base * BT * N + o_t[:, None] * N + o_k[None, :])
    Qm = tl.load(Qbuf + base * BT * BT + o_t[:, None] * BT + o_t[None, :])
    G = tl.cumsum(w_c, axis=0)
    rt = r_c * tl.exp(G)
    eGi = tl.exp(-G)
    lower = o_t[:, None] >= o_t[None, :]
    Arb = tl.where(lower, _dot(rt, tl.trans(b_c * eGi), PREC), 0.0)
    Ark = tl.where(lower, _dot(rt, tl.trans(k_c * eGi), PREC), 0.0)
    S0T = tl.trans(S0)
    U = _dot(Wm, S0T, PREC) + _dot(Qm, v_c, PREC)
    Y = _dot(rt, S0T, PREC) + _dot(Arb, U, PREC) + _dot(Ark, v_c, PREC)
    _store_rows(y, Y, t0, eos, i_h, o_k, H, N, BT)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_state_kernel(
    r, w, b, dy, Wbuf, dht, dh0, dstates, gdstates, Xbuf,
    cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, GROUPED: tl.constexpr, AUG: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, AFFINE: tl.constexpr = False,
):
    """Reverse walk over the chunks of group i_g: dstates[chunk] = dL/dS at the chunk's end (from the
    future); per chunk  dS_0 = dS_end (diag(e^{gC}) + bb^T W) + (Arb^T dY)^T W + dY^T rt.
    AUG / GROUPED as in _fwd_state_kernel (here the group map is dS_start = dS_end P + X)."""
    i_nh, i_h, bos, eos, c0, c_lo, c_hi, o_v, o_s, active, gbase = _walk_span(
        cu_seqlens, chunk_offsets, group_offsets, T, NT, NG, GC, H, N, BT, BV, IS_VARLEN, GROUPED)
    o_k = tl.arange(0, N)
    o_t = tl.arange(0, BT)
    vmask = o_v < N
    lower = o_t[:, None] >= o_t[None, :]
    dS = _walk_start(dht, gdstates, i_nh, gbase, o_v, o_s, active, N, BV, USE_DHT, GROUPED, AUG)
    for ci in range(0, c_hi - c_lo):
        c = c_hi - 1 - ci
        base = (c0 + c) * H + i_h
        if not AUG:
            tl.store(dstates + base * N * N + o_s, dS.to(dstates.dtype.element_ty))
        t0 = bos + c * BT
        rows = t0 + o_t
        rmask = rows < eos
        r_c = _load_rows(r, t0, eos, i_h, o_k, H, N, BT)
        w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
        b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
        dy_c = tl.load(dy + (rows[:, None] * H + i_h) * N + o_v[None, :], mask=rmask[:, None] & vmask[None, :],
                       other=0.0).to(tl.float32)
        Wm = tl.load(Wbuf + base * BT * N + o_t[:, None] * N + o_k[None, :])
        G = tl.cumsum(w_c, axis=0)
        gC = tl.sum(w_c, axis=0)
        eGC = tl.exp(gC)
        rt = r_c * tl.exp(G)
        bh = b_c * tl.exp(-G)
        Arb = tl.where(lower, _dot(rt, tl.trans(bh), PREC), 0.0)
        if AFFINE:
            # dU^T = dY^T Arb + dS (bh e^{gC})^T folded in: dS <- dS e^{gC} + dS ((bh e^{gC})^T W) + dY^T (rt + Arb W)
            P = _dot(tl.trans(bh * eGC[None, :]), Wm, PREC)  # [N, N]
            Z = rt + _dot(Arb, Wm, PREC)  # [BT, N]
            dS = dS * eGC[None, :] + _dot(dS, P, PREC) + _dot(tl.trans(dy_c), Z, PREC)
        else:
            dU = _dot(tl.trans(Arb), dy_c, PREC) \
                + _dot(bh * eGC[None, :], tl.trans(dS), PREC)
            dS = dS * eGC[None, :] + _dot(tl.trans(dy_c), rt, PREC) \
                + _dot(tl.trans(dU), Wm, PREC)
    if AUG:
        tl.store(Xbuf + gbase * 2 * N * N + o_s, dS, mask=active)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * N * N + o_s, dS)


@triton.jit
def _bwd_grads_kernel(
    r, w, k, v, a, b, dy, states, dstates,
    dr, dw, dk, dv, da, db,
    cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0, eos = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    o_k = tl.arange(0, N)
    o_t = tl.arange(0, BT)
    r_c = _load_rows(r, t0, eos, i_h, o_k, H, N, BT)
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    k_c = _load_rows(k, t0, eos, i_h, o_k, H, N, BT)
    a_c = _load_rows(a, t0, eos, i_h, o_k, H, N, BT)
    b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
    base = i_c.to(tl.int64) * H + i_h

    # recompute the chunk's forward quantities
    G, at, bh, kh, Aak, M, Wm, Qm = _wy(w_c, k_c, a_c, b_c, BT, LOG2_BT, PREC, EXACT)
    rt = r_c * tl.exp(G)
    strict = o_t[:, None] > o_t[None, :]
    lower = o_t[:, None] >= o_t[None, :]
    Arb = tl.where(lower, _dot(rt, tl.trans(bh), PREC), 0.0)
    Ark = tl.where(lower, _dot(rt, tl.trans(kh), PREC), 0.0)
    # Everything that touches the chunk's [N, N] state S0 and its gradient dS (and v, dy, loaded only
    # here) is one loop over blocks of BV value rows (CONFIG["grad_bv"]). dS is taken with its key
    # columns scaled by e^{gC} (dSg), which folds the chunk-end decay of bh, kh into it.
    # Back through Y = rt S0^T + Arb U + Ark V, S_end = S0 e^{gC} + U^T bh e^{gC} + V^T kh e^{gC} and
    # U = W S0^T + Q V, one value block at a time; dbh, dkh start with the S_end terms.
    egC = tl.exp(tl.sum(w_c, axis=0))
    dW = tl.zeros([BT, N], dtype=tl.float32)
    drt = tl.zeros([BT, N], dtype=tl.float32)
    dbh = tl.zeros([BT, N], dtype=tl.float32)
    dkh = tl.zeros([BT, N], dtype=tl.float32)
    dArb = tl.zeros([BT, BT], dtype=tl.float32)
    dArk = tl.zeros([BT, BT], dtype=tl.float32)
    dQ = tl.zeros([BT, BT], dtype=tl.float32)
    dgC = tl.zeros([N], dtype=tl.float32)  # dL/dgC
    for v0 in range(0, N, BV):
        o_v = v0 + tl.arange(0, BV)
        o_s = o_v[:, None] * N + o_k[None, :]
        S0 = tl.load(states + base * N * N + o_s).to(tl.float32)  # [BV, K]
        dSg = tl.load(dstates + base * N * N + o_s).to(tl.float32) * egC[None, :]
        v_b = _load_rows(v, t0, eos, i_h, o_v, H, N, BT)  # [BT, BV]
        dy_b = _load_rows(dy, t0, eos, i_h, o_v, H, N, BT)
        dgC += tl.sum(dSg * S0, axis=0)
        U = _dot(Wm, tl.trans(S0), PREC) + _dot(Qm, v_b, PREC)
        dU = _dot(tl.trans(Arb), dy_b, PREC) + _dot(bh, tl.trans(dSg), PREC)
        dW += _dot(dU, S0, PREC)
        drt += _dot(dy_b, S0, PREC)
        dbh += _dot(U, dSg, PREC)
        dkh += _dot(v_b, dSg, PREC)
        dv_b = _dot(tl.trans(Ark), dy_b, PREC) + _dot(kh, tl.trans(dSg), PREC) + _dot(tl.trans(Qm), dU, PREC)
        _store_rows(dv, dv_b, t0, eos, i_h, o_v, H, N, BT)
        dArb += _dot(dy_b, tl.trans(U), PREC)
        dArk += _dot(dy_b, tl.trans(v_b), PREC)
        dQ += _dot(dU, tl.trans(v_b), PREC)
    dgC += tl.sum(dbh * bh + dkh * kh, axis=0)
    dArb = tl.where(lower, dArb, 0.0)
    dArk = tl.where(lower, dArk, 0.0)
    drt += _dot(dArb, bh, PREC) + _dot(dArk, kh, PREC)
    _store_rows(dr, drt * tl.exp(G), t0, eos, i_h, o_k, H, N, BT)
    # back through W = M at, Q = M Aak, M = (I - Aab)^{-1}
    dQ = tl.where(strict, dQ, 0.0)
    MT = tl.trans(M)
    dM = _dot(dW, tl.trans(at), PREC) + _dot(dQ, tl.trans(Aak), PREC)
    dAak = tl.where(strict, _dot(MT, dQ, PREC), 0.0)
    dAab = tl.where(strict, _dot(_dot(MT, dM, PREC), MT, PREC), 0.0)
    dat = _dot(MT, dW, PREC) + _dot(dAab, bh, PREC) + _dot(dAak, kh, PREC)
    dbh += _dot(tl.trans(dAab), at, PREC) + _dot(tl.trans(dArb), rt, PREC)
    dkh += _dot(tl.trans(dAak), at, PREC) + _dot(tl.trans(dArk), rt, PREC)

    # back to the raw inputs; G enters through every e^{+-G} factor
    datat = dat * at
    dG = drt * rt - dbh * bh - dkh * kh + datat
    dw_c = tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG - datat + dgC[None, :]
    _store_rows(dw, dw_c, t0, eos, i_h, o_k, H, N, BT)
    eGi = tl.exp(-G)
    _store_rows(dk, dkh * eGi, t0, eos, i_h, o_k, H, N, BT)
    _store_rows(da, dat * tl.exp(G - w_c), t0, eos, i_h, o_k, H, N, BT)
    _store_rows(db, dbh * eGi, t0, eos, i_h, o_k, H, N, BT)


@triton.jit
def _chunk_program(cu_seqlens, chunk_indices, T, NT, H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr,
                   IS_VARLEN: tl.constexpr):
    """A per-chunk program's head, token range [t0, eos), key / token offsets and its row in per-chunk buffers."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0, eos = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    return i_h, t0, eos, tl.arange(0, N), tl.arange(0, BT), i_c.to(tl.int64) * H + i_h


@triton.jit
def _chunk_end_grad(dstates, base, o_s, w_c, N: tl.constexpr):
    """dL/dS at the chunk's end with its key columns scaled by e^{gC} (dSg of `_bwd_grads_kernel`), fp32."""
    return tl.load(dstates + base * N * N + o_s).to(tl.float32) * tl.exp(tl.sum(w_c, axis=0))[None, :]


@triton.jit
def _bwd_grads_u_kernel(
    r, w, k, v, b, dy, Wbuf, Qbuf, states, dstates, dv, DW, DQ, UBUF, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """First of three kernels replacing `_bwd_grads` for long chunks (BT 64, whose one-kernel form needs
    more shared memory than a GPU has): U = W S0^T + Q V and its gradient dU, hence dv, dW = dU S0 and
    dQ = dU V^T (fp32 per chunk, for `_bwd_grads_wy_kernel`); U goes to `_bwd_grads_s_kernel`."""
    i_h, t0, eos, o_k, o_t, base = _chunk_program(cu_seqlens, chunk_indices, T, NT, H, N, BT, IS_VARLEN)
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    G = tl.cumsum(w_c, axis=0)
    eGi = tl.exp(-G)
    rt = _load_rows(r, t0, eos, i_h, o_k, H, N, BT) * tl.exp(G)
    lower = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    o_s = o_k[:, None] * N + o_k[None, :]
    o_m = o_t[:, None] * N + o_k[None, :]
    S0 = tl.load(states + base * N * N + o_s).to(tl.float32)  # [value, key]
    v_c = _load_rows(v, t0, eos, i_h, o_k, H, N, BT)
    U = _dot(tl.load(Wbuf + base * BT * N + o_m), tl.trans(S0), PREC)
    Qm = tl.load(Qbuf + base * BT * BT + o_t[:, None] * BT + o_t[None, :])
    U += _dot(Qm, v_c, PREC)
    tl.store(UBUF + base * BT * N + o_m, U)
    dSg = _chunk_end_grad(dstates, base, o_s, w_c, N)
    dy_c = _load_rows(dy, t0, eos, i_h, o_k, H, N, BT)
    bh = _load_rows(b, t0, eos, i_h, o_k, H, N, BT) * eGi
    Arb = tl.where(lower, _dot(rt, tl.trans(bh), PREC), 0.0)
    dU = _dot(tl.trans(Arb), dy_c, PREC) + _dot(bh, tl.trans(dSg), PREC)
    tl.store(DW + base * BT * N + o_m, _dot(dU, S0, PREC))
    tl.store(DQ + base * BT * BT + o_t[:, None] * BT + o_t[None, :],
             tl.where(strict, _dot(dU, tl.trans(v_c), PREC), 0.0))
    kh = _load_rows(k, t0, eos, i_h, o_k, H, N, BT) * eGi
    Ark = tl.where(lower, _dot(rt, tl.trans(kh), PREC), 0.0)
    dv_c = _dot(tl.trans(Ark), dy_c, PREC) + _dot(kh, tl.trans(dSg), PREC) + _dot(tl.trans(Qm), dU, PREC)
    _store_rows(dv, dv_c, t0, eos, i_h, o_k, H, N, BT)


@triton.jit
def _bwd_grads_s_kernel(
    r, w, k, v, b, dy, states, dstates, dr, UBUF, DBH, DKH, DGP, DGC, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Second of the three long-chunk kernels: the gradients of the intra-chunk matrices Arb, Ark and of
    the decayed rows rt, bh, kh through Y and S_end (dr stored; the state parts of dbh, dkh, dG's
    partial sum and dL/dgC in fp32 for `_bwd_grads_wy_kernel`)."""
    i_h, t0, eos, o_k, o_t, base = _chunk_program(cu_seqlens, chunk_indices, T, NT, H, N, BT, IS_VARLEN)
    lower = o_t[:, None] >= o_t[None, :]
    o_s = o_k[:, None] * N + o_k[None, :]
    o_m = o_t[:, None] * N + o_k[None, :]
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    G = tl.cumsum(w_c, axis=0)
    eGi = tl.exp(-G)
    dy_c = _load_rows(dy, t0, eos, i_h, o_k, H, N, BT)
    U = tl.load(UBUF + base * BT * N + o_m)
    v_c = _load_rows(v, t0, eos, i_h, o_k, H, N, BT)
    dSg = _chunk_end_grad(dstates, base, o_s, w_c, N)
    S0 = tl.load(states + base * N * N + o_s).to(tl.float32)
    bh = _load_rows(b, t0, eos, i_h, o_k, H, N, BT) * eGi
    kh = _load_rows(k, t0, eos, i_h, o_k, H, N, BT) * eGi
    dbh = _dot(U, dSg, PREC)
    dkh = _dot(v_c, dSg, PREC)
    dgC = tl.sum(dSg * S0, axis=0) + tl.sum(dbh * bh + dkh * kh, axis=0)
    dArb = tl.where(lower, _dot(dy_c, tl.trans(U), PREC), 0.0)
    dArk = tl.where(lower, _dot(dy_c, tl.trans(v_c), PREC), 0.0)
    rt = _load_rows(r, t0, eos, i_h, o_k, H, N, BT) * tl.exp(G)
    dbh += _dot(tl.trans(dArb), rt, PREC)
    dkh += _dot(tl.trans(dArk), rt, PREC)
    drt = _dot(dy_c, S0, PREC) + _dot(dArb, bh, PREC) + _dot(dArk, kh, PREC)
    _store_rows(dr, drt * tl.exp(G), t0, eos, i_h, o_k, H, N, BT)
    tl.store(DBH + base * BT * N + o_m, dbh)
    tl.store(DKH + base * BT * N + o_m, dkh)
    tl.store(DGP + base * BT * N + o_m, drt * rt - dbh * bh - dkh * kh)
    tl.store(DGC + base * N + o_k, dgC)


@triton.jit
def _bwd_grads_wy_kernel(
    w, k, a, b, DW, DQ, DBH, DKH, DGP, DGC, dw, dk, da, db, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr,
):
    """Third of the three long-chunk kernels: back through W = M at, Q = M Aak, M = (I - Aab)^{-1}
    (M recomputed) to dw, dk, da, db."""
    i_h, t0, eos, o_k, o_t, base = _chunk_program(cu_seqlens, chunk_indices, T, NT, H, N, BT, IS_VARLEN)
    w_c = _load_rows(w, t0, eos, i_h, o_k, H, N, BT)
    k_c = _load_rows(k, t0, eos, i_h, o_k, H, N, BT)
    a_c = _load_rows(a, t0, eos, i_h, o_k, H, N, BT)
    b_c = _load_rows(b, t0, eos, i_h, o_k, H, N, BT)
    G, at, bh, kh, Aak, M, Wm, Qm = _wy(w_c, k_c, a_c, b_c, BT, LOG2_BT, PREC, EXACT)
    strict = o_t[:, None] > o_t[None, :]
    o_m = o_t[:, None] * N + o_k[None, :]
    dW = tl.load(DW + base * BT * N + o_m)
    dQ = tl.load(DQ + base * BT * BT + o_t[:, None] * BT + o_t[None, :])
    MT = tl.trans(M)
    dM = _dot(dW, tl.trans(at), PREC) + _dot(dQ, tl.trans(Aak), PREC)
    dAak = tl.where(strict, _dot(MT, dQ, PREC), 0.0)
    dAab = tl.where(strict, _dot(_dot(MT, dM, PREC), MT, PREC), 0.0)
    dat = _dot(MT, dW, PREC) + _dot(dAab, bh, PREC) + _dot(dAak, kh, PREC)
    dbh_wy = _dot(tl.trans(dAab), at, PREC)
    dkh_wy = _dot(tl.trans(dAak), at, PREC)
    datat = dat * at
    dG = tl.load(DGP + base * BT * N + o_m) - dbh_wy * bh - dkh_wy * kh + datat
    dgC = tl.load(DGC + base * N + o_k)
    dw_c = tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG - datat + dgC[None, :]
    _store_rows(dw, dw_c, t0, eos, i_h, o_k, H, N, BT)
    eGi = tl.exp(-G)
    _store_rows(dk, (tl.load(DKH + base * BT * N + o_m) + dkh_wy) * eGi, t0, eos, i_h, o_k, H, N, BT)
    _store_rows(da, dat * tl.exp(G - w_c), t0, eos, i_h, o_k, H, N, BT)
    _store_rows(db, (tl.load(DBH + base * BT * N + o_m) + dbh_wy) * eGi, t0, eos, i_h, o_k, H, N, BT)


# ----------------------------------------------------------------------------- host side


# Launch defaults for 64-token chunks (compiled for sm_90 with bf16 inputs, Triton 3.6: every kernel fits the
# shared memory, spills <= 0.5 KB; timed on an H200 in docs/benchmarks.md, session 6).
CHUNK64_WARPS = {"chunk_warps": 4, "state_warps": 8, "grad_warps": 8}

_CHOICES = {
    "chunk_len": (16, 32, 64),
    "dot_precision": ("auto", "tf32", "ieee", "bf16"),
    "exact_precision": ("auto", "ieee", "tf32x3"),
    "grad_bv": (16, 32, 64),
    "state_bv": (16, 32, 64),
    "scan_bv": (16, 32, 64),
    "state_dtype": ("auto", "fp32", "bf16"),
    "state_step": ("direct", "affine"),
}


def resolve_config(options=None) -> dict:
    """CONFIG with `options` (a dict of some of its keys) on top, checked before any kernel runs.

    Raises ValueError naming the unknown key or the bad value. Every call takes its own snapshot, so
    per-call options (the model's `wkv_kernel` config) never touch the module defaults."""
    cfg = dict(CONFIG)
    if options:
        unknown = sorted(set(options) - set(CONFIG))
        if unknown:
            raise ValueError(f"unknown wkv7 chunk kernel option(s) {unknown}; known: {sorted(CONFIG)}")
        cfg.update(options)
    gk = cfg["grad_kernels"]
    if not (gk == "auto" or (type(gk) is int and gk in (1, 3))):  # 3.0 or True are not 3 or 1 here
        raise ValueError(f"wkv7 chunk option grad_kernels must be 'auto', 1 or 3, got {gk!r}")
    if cfg["chunk_len"] == 64:  # 64-row tiles: warpgroup products need 4+ warps (unless set explicitly)
        for key, val in CHUNK64_WARPS.items():
            if key not in (options or {}) and cfg[key] == CONFIG[key]:
                cfg[key] = val
        if cfg["fuse_out"]:
            raise ValueError("wkv7 chunk option fuse_out is not supported with chunk_len 64 (262 KB of shared memory)")
        if cfg["grad_kernels"] == 1:
            raise ValueError("wkv7 chunk option grad_kernels 1 is not supported with chunk_len 64 (278 KB of shared memory)")
    for key, allowed in _CHOICES.items():
        val = cfg[key]
        if type(val) is not type(allowed[0]) or val not in allowed:  # 32.0 or True are not 32 or 1 here
            raise ValueError(f"wkv7 chunk option {key} must be one of {allowed}, got {val!r}")
    for key in ("checkpoint_chunks", "state_warps", "state_stages", "chunk_warps", "grad_warps", "scan_warps",
                "programs_per_sm"):
        val = cfg[key]
        low = 0 if key == "checkpoint_chunks" else 1
        if type(val) is not int or val < low:
            why = " (0: save no chunk states)" if key == "checkpoint_chunks" else ""
            raise ValueError(f"wkv7 chunk option {key} must be an integer >= {low}{why}, got {val!r}")
        if key.endswith("_warps") and val & (val - 1):
            raise ValueError(f"wkv7 chunk option {key} must be a power of two, got {val}")
    if cfg["grad_kernels"] == "auto":
        cfg["grad_kernels"] = 3 if cfg["chunk_len"] == 64 else 1
    for key in ("fuse_out", "save_wy"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"wkv7 chunk option {key} must be true or false, got {cfg[key]!r}")
    if cfg["state_step"] == "affine" and cfg["fuse_out"]:
        raise ValueError("wkv7 chunk option fuse_out is not supported with state_step 'affine' (the fused output needs U)")
    gc = cfg["group_chunks"]
    if gc != "auto" and (isinstance(gc, bool) or not isinstance(gc, int) or gc < 0):
        raise ValueError(f"wkv7 chunk option group_chunks must be 'auto' or an integer >= 0, got {gc!r}")
    return cfg


def _pick_group(progs, max_chunks, slots):
    """Chunks per group minimising a wave-count model of the sequential passes (0: no grouping).

    Plain: ceil(progs / slots) waves of max_chunks steps. Grouped with G chunks per group and
    NG = ceil(max_chunks / G): the augmented pass (2x the rows) over NG groups, a scan of NG steps,
    then the recompute pass over NG groups, each in waves of G steps.
    """
    def waves(p):
        return -(-p // slots)

    best, best_cost = 0, float("inf")
    g = 2
    while g < max_chunks:
        ng = -(-max_chunks // g)
        cost = waves(2 * progs * ng) * g + ng + waves(progs * ng) * g
        if cost <= best_cost:  # ties: the larger group (fewer group states in memory)
            best, best_cost = g, cost
        g *= 2
    return best if best_cost < 0.8 * waves(progs) * max_chunks else 0


class _Grouping:
    """Sequences cut into groups of GC chunks: the group-indexed buffers' layout for the kernels."""

    def __init__(self, n, NT, gc, is_varlen, device):
        ng = (n + gc - 1) // gc
        self.GC, self.NG = gc, (NT + gc - 1) // gc  # NG: groups per sequence of a fixed-length batch
        self.max_groups = int(ng.max()) if len(ng) else 1
        self.total = int(ng.sum())
        self.offsets = None  # first group of every sequence (packed documents only)
        if is_varlen:
            go = torch.zeros(len(ng) + 1, dtype=torch.int64)
            go[1:] = torch.cumsum(ng, 0)
            self.offsets = go.to(device=device, dtype=torch.int32)


class _Plan:
    """Chunk / group bookkeeping for one call (fixed-length batch or packed documents)."""

    def __init__(self, B, T, H, N, cu_seqlens, device, config=None):
        self.cfg = cfg = resolve_config(config)  # one snapshot, so backward launches like its forward
        self.bt = BT = int(cfg["chunk_len"])
        self.T, self.H, self.N = T, H, N
        self.cu = cu_seqlens
        self.device = device
        self.is_varlen = cu_seqlens is not None
        if cu_seqlens is None:
            self.NS, self.NT = B, triton.cdiv(T, BT)
            n = torch.full((B,), self.NT, dtype=torch.int64)
            self.indices = self.chunk_offsets = None
            offsets = torch.arange(B + 1, dtype=torch.int64) * self.NT
        else:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
            n = (lens + BT - 1) // BT
            self.NS, self.NT = len(n), 0
            offsets = torch.zeros(len(n) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(n, 0)
            seq = torch.repeat_interleave(torch.arange(len(n)), n)
            idx = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(n)
            self.indices = torch.stack([seq, idx], 1).to(device=device, dtype=torch.int32).contiguous()
            self.chunk_offsets = offsets.to(device=device, dtype=torch.int32)
        self.n, self.first_chunk = n, offsets[:-1]
        self.total = int(n.sum())
        self.max_chunks = int(n.max()) if len(n) else 0
        self.bv = cfg["state_bv"]
        if N % cfg["grad_bv"]:
            raise ValueError(f"wkv7 chunk option grad_bv must divide the head size {N}, got {cfg['grad_bv']}")
        # Two-level scan for the sequential passes when (sequences x heads) cannot fill the GPU.
        gc = cfg["group_chunks"]
        if gc == "auto":
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
            gc = _pick_group(self.NS * H * (N // self.bv), self.max_chunks, cfg["programs_per_sm"] * sms)
        gc = int(gc)
        self.grouped = 0 < gc < self.max_chunks
        self.groups = self.grouping(gc) if self.grouped else None
        ck = int(cfg["checkpoint_chunks"])
        self.ckpt = self.grouping(ck) if ck > 1 and self.total else None
        self.save_states = ck != 0  # else backward recomputes them all from the initial state
        self.affine = cfg["state_step"] == "affine"  # the sequential passes' step form (AFFINE of their kernels)

    def grouping(self, gc):
        return _Grouping(self.n, self.NT, gc, self.is_varlen, self.device)

    def seq_args(self, groups="plan"):
        """The sequence/group arguments of the sequential kernels, for the plan's own two-level scan
        (default), for another grouping, or (None) for plain whole-sequence walks."""
        g = self.groups if groups == "plan" else groups
        if g is None:
            return (self.cu, self.chunk_offsets, None, self.T, self.NT, 1, max(self.max_chunks, 1))
        return (self.cu, self.chunk_offsets, g.offsets, self.T, self.NT, g.NG, g.GC)

    def checkpoint_index(self):
        """Rows of the per-chunk state buffer that start a checkpoint group, in group order."""
        ck = self.ckpt.GC
        idx = [torch.arange(int(c0), int(c0 + n), ck) for c0, n in zip(self.first_chunk, self.n) if n > 0]
        return torch.cat(idx).to(self.device)


def _prep(w, k, a, b, plan):
    BT = plan.bt
    H, N = plan.H, plan.N
    Wbuf = torch.empty(max(plan.total, 1), H, BT, N, dtype=torch.float32, device=w.device)
    Qbuf = torch.empty(max(plan.total, 1), H, BT, BT, dtype=torch.float32, device=w.device)
    if plan.total:
        _prep_kernel[(plan.total, H)](
            w, k, a, b, Wbuf, Qbuf, plan.cu, plan.indices, plan.T, plan.NT,
            H=H, N=N, BT=BT, LOG2_BT=int(math.log2(BT)), IS_VARLEN=plan.is_varlen,
            PREC=_prec(w, plan.cfg), EXACT=_exact(w, plan.cfg), num_warps=plan.cfg["chunk_warps"],
        )
    return Wbuf, Qbuf


def _prec(x, cfg):
    p = cfg["dot_precision"]
    if p == "auto":
        return "ieee" if x.dtype == torch.float32 else "tf32"
    return p


def _exact(x, cfg):
    p = cfg["exact_precision"]
    if p == "auto":
        return "ieee" if x.dtype == torch.float32 else "tf32x3"
    return p


def _state_dtype(x, cfg):
    sd = cfg["state_dtype"]
    if sd == "auto":
        return torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[sd]


def chunk_wkv7_fwd(r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state, need_states=True, config=None):
    B, T, H, N = r.shape
    plan = _Plan(B, T, H, N, cu_seqlens, r.device, config)
    BT = plan.bt
    dev, prec = r.device, _prec(r, plan.cfg)
    Wbuf, Qbuf = _prep(w, k, a, b, plan)
    fuse = bool(plan.cfg["fuse_out"])
    store_states = (need_states and plan.save_states) or not fuse  # _fwd_out reads them unless fused
    states = torch.empty(max(plan.total, 1), H, N, N, dtype=_state_dtype(r, plan.cfg), device=dev) if store_states else None
    ht = torch.empty(plan.NS, H, N, N, dtype=torch.float32, device=dev) if output_final_state else None
    y = torch.empty_like(r)
    _state_pass(r, w, k, v, b, y, Wbuf, Qbuf, initial_state, ht, states, plan, fuse)
    if not fuse and plan.total:
        _fwd_out_kernel[(plan.total, H)](
            r, w, k, v, b, y, Wbuf, Qbuf, states, plan.cu, plan.indices, T, plan.NT,
            H=H, N=N, BT=BT, IS_VARLEN=plan.is_varlen, PREC=prec, num_warps=plan.cfg["chunk_warps"],
        )
    if need_states and plan.ckpt is not None:  # keep every checkpoint_chunks-th state only
        states = states[plan.checkpoint_index()]
    if not plan.save_states:
        states = None
    wy = (Wbuf, Qbuf) if need_states and plan.cfg["save_wy"] else None
    return y, ht, states, plan, wy


def _state_pass(r, w, k, v, b, y, Wbuf, Qbuf, initial_state, ht, states, plan, fuse):
    """The forward's sequential pass: the state entering every chunk -> `states` (if given), the final
    state -> `ht` (if given), y too with `fuse`; a two-level scan over groups when the plan has them."""
    H, N, bv = plan.H, plan.N, plan.bv
    common = dict(H=H, N=N, BT=plan.bt, BV=bv, IS_VARLEN=plan.is_varlen, PREC=_prec(r, plan.cfg),
                  AFFINE=plan.affine, num_warps=plan.cfg["state_warps"], num_stages=plan.cfg["state_stages"])
    gstates = Xbuf = None
    ngrid = plan.groups.max_groups if plan.grouped else 1
    if plan.grouped:
        Xbuf = torch.empty(plan.groups.total, H, 2 * N, N, dtype=torch.float32, device=r.device)
        gstates = torch.empty(plan.groups.total, H, N, N, dtype=torch.float32, device=r.device)
        _fwd_state_kernel[(2 * N // bv, plan.NS * H, ngrid)](
            r, w, k, v, b, y, Wbuf, Qbuf, None, None, None, None, Xbuf, *plan.seq_args(),
            USE_H0=False, STORE_HT=False, STORE_STATES=False, FUSE_OUT=False, GROUPED=True, AUG=True, **common,
        )
        _scan(initial_state, ht, gstates, Xbuf, plan, reverse=False, exact=_exact(r, plan.cfg))
    _fwd_state_kernel[(N // bv, plan.NS * H, ngrid)](
        r, w, k, v, b, y, Wbuf, Qbuf, initial_state, ht, states, gstates, Xbuf, *plan.seq_args(),
        USE_H0=initial_state is not None, STORE_HT=ht is not None and not plan.grouped,
        STORE_STATES=states is not None, FUSE_OUT=fuse, GROUPED=plan.grouped, AUG=False, **common,
    )


def _scan(init, final, gstates, Xbuf, plan, reverse, exact):
    """The short sequential pass over the groups of the two-level scan."""
    BT = plan.bt
    sbv = plan.cfg["scan_bv"]
    _scan_kernel[(plan.N // sbv, plan.NS * plan.H)](
        init, final, gstates, Xbuf, *plan.seq_args(), H=plan.H, N=plan.N, BT=BT, BV=sbv,
        USE_INIT=init is not None, STORE_FINAL=final is not None, REVERSE=reverse,
        IS_VARLEN=plan.is_varlen, EXACT=exact, num_warps=plan.cfg["scan_warps"],
    )


def _restore_states(r, w, k, v, b, Wbuf, Qbuf, ckpt, plan):
    """Every chunk's entering state from the saved checkpoints: the forward state pass again, one short
    walk of checkpoint_chunks chunks per checkpoint, all in parallel."""
    BT = plan.bt
    H, N, bv = plan.H, plan.N, plan.bv
    states = torch.empty(plan.total, H, N, N, dtype=ckpt.dtype, device=r.device)
    _fwd_state_kernel[(N // bv, plan.NS * H, plan.ckpt.max_groups)](
        r, w, k, v, b, None, Wbuf, Qbuf, None, None, states, ckpt, None, *plan.seq_args(plan.ckpt),
        H=H, N=N, BT=BT, BV=bv, USE_H0=False, STORE_HT=False, STORE_STATES=True, FUSE_OUT=False, GROUPED=True,
        AUG=False, IS_VARLEN=plan.is_varlen, PREC=_prec(r, plan.cfg), AFFINE=plan.affine,
        num_warps=plan.cfg["state_warps"], num_stages=plan.cfg["state_stages"],
    )
    return states


def chunk_wkv7_bwd(r, w, k, v, a, b, dy, dht, states, plan, need_dh0, wy=None, initial_state=None):
    """Gradients of every input; `wy` = the forward's (W, Q) factors when it kept them (save_wy);
    `states` None (checkpoint_chunks 0): recomputed here from `initial_state`."""
    BT = plan.bt
    B, T, H, N = r.shape
    dev, prec, bv = r.device, _prec(r, plan.cfg), plan.bv
    Wbuf, Qbuf = wy if wy is not None else _prep(w, k, a, b, plan)
    if not plan.save_states:
        states = torch.empty(max(plan.total, 1), H, N, N, dtype=_state_dtype(r, plan.cfg), device=dev)
        _state_pass(r, w, k, v, b, None, Wbuf, Qbuf, initial_state, None, states, plan, fuse=False)
    elif plan.ckpt is not None:
        states = _restore_states(r, w, k, v, b, Wbuf, Qbuf, states, plan)
    split = plan.cfg["grad_kernels"] == 3  # (one kernel needs more shared memory than a GPU has at 64-token chunks)
    if not split:
        del Qbuf
    dstates = torch.empty_like(states)
    dh0 = torch.empty(plan.NS, H, N, N, dtype=torch.float32, device=dev) if need_dh0 else None
    common = dict(H=H, N=N, BT=BT, BV=bv, IS_VARLEN=plan.is_varlen, PREC=prec, AFFINE=plan.affine,
                  num_warps=plan.cfg["state_warps"], num_stages=plan.cfg["state_stages"])
    gdstates = Xbuf = None
    ngrid = plan.groups.max_groups if plan.grouped else 1
    if plan.grouped:
        Xbuf = torch.empty(plan.groups.total, H, 2 * N, N, dtype=torch.float32, device=dev)
        gdstates = torch.empty(plan.groups.total, H, N, N, dtype=torch.float32, device=dev)
        _bwd_state_kernel[(2 * N // bv, plan.NS * H, ngrid)](
            r, w, b, dy, Wbuf, None, None, None, None, Xbuf, *plan.seq_args(),
            USE_DHT=False, STORE_DH0=False, GROUPED=True, AUG=True, **common,
        )
        _scan(dht, dh0, gdstates, Xbuf, plan, reverse=True, exact=_exact(r, plan.cfg))
    _bwd_state_kernel[(N // bv, plan.NS * H, ngrid)](
        r, w, b, dy, Wbuf, dht, dh0, dstates, gdstates, Xbuf, *plan.seq_args(),
        USE_DHT=dht is not None, STORE_DH0=need_dh0 and not plan.grouped, GROUPED=plan.grouped, AUG=False, **common,
    )
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    if plan.total and split:
        _bwd_grads_in_three(r, w, k, v, a, b, dy, states, dstates, Wbuf, Qbuf, grads, plan)
    elif plan.total:
        _bwd_grads_kernel[(plan.total, H)](
            r, w, k, v, a, b, dy, states, dstates, *grads, plan.cu, plan.indices, T, plan.NT,
            H=H, N=N, BT=BT, LOG2_BT=int(math.log2(BT)), BV=plan.cfg["grad_bv"], IS_VARLEN=plan.is_varlen,
            PREC=prec, EXACT=_exact(w, plan.cfg), num_warps=plan.cfg["grad_warps"],
        )
    return (*grads, dh0)


def _bwd_grads_in_three(r, w, k, v, a, b, dy, states, dstates, Wbuf, Qbuf, grads, plan):
    """`_bwd_grads` as three kernels (64-token chunks, or grad_kernels 3; module docstring), fp32 terms between them."""
    BT, H, N, T = plan.bt, plan.H, plan.N, plan.T
    dr, dw, dk, dv, da, db = grads
    prec = _prec(r, plan.cfg)
    f32 = dict(dtype=torch.float32, device=r.device)
    ubuf, dW, dbh, dkh, dGp = (torch.empty(plan.total, H, BT, N, **f32) for _ in range(5))
    dQ = torch.empty(plan.total, H, BT, BT, **f32)
    dgC = torch.empty(plan.total, H, N, **f32)
    seq = (plan.cu, plan.indices, T, plan.NT)
    common = dict(H=H, N=N, BT=BT, IS_VARLEN=plan.is_varlen, PREC=prec, num_warps=plan.cfg["grad_warps"])
    grid = (plan.total, H)
    _bwd_grads_u_kernel[grid](r, w, k, v, b, dy, Wbuf, Qbuf, states, dstates, dv, dW, dQ, ubuf, *seq, **common)
    _bwd_grads_s_kernel[grid](r, w, k, v, b, dy, states, dstates, dr, ubuf, dbh, dkh, dGp, dgC, *seq, **common)
    _bwd_grads_wy_kernel[grid](w, k, a, b, dW, dQ, dbh, dkh, dGp, dgC, dw, dk, da, db, *seq,
                               LOG2_BT=int(math.log2(BT)), EXACT=_exact(w, plan.cfg), **common)


class _ChunkWKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state, need_states, config):
        y, ht, states, plan, wy = chunk_wkv7_fwd(r, w, k, v, a, b, initial_state, cu_seqlens, output_final_state,
                                                 need_states=need_states, config=config)
        if need_states:
            h0 = None if plan.save_states else initial_state  # to recompute the states from
            ctx.save_for_backward(r, w, k, v, a, b, states, h0, *(wy or ()))
        ctx.plan = plan
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        r, w, k, v, a, b, states, h0, *wy = ctx.saved_tensors
        need_dh0 = ctx.h0_dtype is not None and ctx.needs_input_grad[6]
        dr, dw, dk, dv, da, db, dh0 = chunk_wkv7_bwd(
            r, w, k, v, a, b, dy.contiguous(), None if dht is None else dht.contiguous(), states, ctx.plan, need_dh0,
            wy=wy or None, initial_state=h0,
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dr, dw, dk, dv, da, db, dh0, None, None, None, None


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False, config=None):
    """Chunked Triton RWKV-7 recurrence. Inputs [B, T, H, 64]; returns (y, final_state or None).

    `config`: options for this call on top of CONFIG (e.g. {"checkpoint_chunks": 1}: keep every chunk
    state for backward, faster for more memory), checked by `resolve_config`.

    `initial_state` [B, H, 64, 64] (or [n_docs, H, 64, 64] with `cu_seqlens`, B == 1); fp32 state math,
    y in r's dtype, the final state fp32. Differentiable in every tensor input. Needs w >= about -5
    (the model's w is in (-0.607, 0]). Backward reads `initial_state` again (the default keeps no chunk
    states), so writing into it in place between forward and backward makes autograd raise.
    """
    r, w, k, v, a, b, initial_state, cu_seqlens = prepare_inputs(r, w, k, v, a, b, initial_state, cu_seqlens)
    need_states = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state)
    )  # inference: the per-chunk states need not be written (unless the output kernel reads them)
    return _ChunkWKV7Function.apply(r, w, k, v, a, b, initial_state, cu_seqlens, bool(output_final_state), need_states,
                                    config)
