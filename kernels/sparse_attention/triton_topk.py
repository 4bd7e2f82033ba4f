"""Triton MoBA top-k chunk sparse attention, forward and backward (SPEC sections 3 and 8).

Same semantics as `naive.sparse_attention_naive`: per batch row, head and query t, keys are split in
chunks of `chunk_size` tokens counted from the start of the sequence (or of its document with
`cu_seqlens`); query t attends causally to its own chunk plus the `topk - 1` strictly past chunks
of its document whose mean key scores highest against q_t (fp32 means, unscaled, no gradient; ties
go to the earlier chunk); one softmax with scale 1/sqrt(D) over the union. The scores are tf32x3
tensor-core products by default, fp32 to about 1e-6 relative, so two chunks whose scores differ by
less than that may rank in the other order than in the fp32 reference (`sel_prec: ieee`: exact fp32).

Pipeline (inputs contiguous [B, T, H, D]; B*H = BH; NC = number of chunks, all documents together):

1. `_chunk_means_kernel`: mean key of every chunk, [BH, NC, D] fp32, one pass over K. Every chunk
   is summed by the same code path, so identical key chunks get bit-identical means.
2. `_select_kernel`: per (query tile, head) a loop over the eligible chunks of the tile's
   documents in blocks of `sel_bg` chunks: one product (tf32x3 tensor-core passes by default, fp32 to
   about 1e-6 relative, two passes for bf16/fp16 queries, which are exact in tf32, with bitwise the same
   scores; "ieee" for exact fp32) scores a block for the whole tile, the same
   instructions for every chunk, so equal means give equal scores; a running top-(topk-1) set is
   kept in registers and updated in a few insertion rounds per block, which keeps exactly the
   stable-descending tie rule. Output: `sel` [B, T, H, topk-1] int32 global chunk ids, best
   first, -1 padded. Nothing of size T x NC is ever stored.
3. Inversion (O(T*H*topk)): the (query, slot) pairs are sorted by their bucket (head, chunk), which
   `_select_kernel` writes as a sort key (`perm`, torch's stable sort, so queries ascend in each bucket),
   with bucket offsets `offs` [BH*NC + 1]; a work table (`_work_table`, two small kernels) cuts every
   bucket into blocks of gathered queries.
4. `_past_fwd_kernel`: per work item (head, chunk, block of gathered queries): dense flash tiles of
   those queries against the chunk's keys -> partial output and log-sum-exp per (query, slot).
5. `_own_fwd_kernel`: per (query tile, head): causal attention inside each query's own chunk
   (masked only on the diagonal / chunk-boundary blocks). With at most two past slots (config
   `merge_in_own`) it runs after step 4 and ends with an exact log-sum-exp merge with the partials of the
   query's selected slots; with more it runs first (it needs no selection, so the GPU works on it while
   the host issues the gating launches) and `_merge_fwd_kernel` merges at the end. Stores O and the total
   log-sum-exp (base 2) per row.

Backward (exact; recomputes probabilities from the stored log-sum-exp):
- `_delta_kernel`: delta = rowsum(dO * O).
- `_bwd_dkdv_kernel`: one program per (head, chunk, block of keys) owns that block of dK/dV (no
  atomics): it loops over the chunk's own queries (causal) and over the bucket of gathered queries
  that selected the chunk. Config `dkdv_split=N` instead cuts buckets into segments of N queries,
  one program each, adding partial dK/dV atomically into fp32 buffers (bounds the longest program
  when one chunk is picked by very many queries). Tiles are [queries, keys], so k and v stay in
  shared memory as right-hand operands.
  On Hopper (bf16/fp16, head size 64) `gluon_dkdv` runs the same sums instead (config `dkdv_impl`); for
  chunks of at most 128 tokens it also forms dQ, and the two dQ kernels below do not run (`dq_in_dkdv`).
- `_bwd_dq_past_kernel`: per work item, dQ contribution of the selected chunk -> per (query, slot).
- `_bwd_dq_own_kernel`: per (query tile, head): own-chunk dQ plus the slot partials.
  Config `dq_atomic=True` replaces these two: the dK/dV kernel also computes dS K for every tile and
  adds it atomically into an fp32 dQ buffer (FlashAttention-2 style: 5 instead of 7 matmuls per
  tile, at the price of atomics and non-deterministic summation order). Every atomic here is
  `sem="relaxed"`: Triton's default (acq_rel) wraps each one in a GPU-wide memory barrier and an L1
  invalidation, which made this mode 1.5x slower.

Saved for backward: q, k, v, o (input dtype), lse [BH, T] fp32, sel [B, T, H, topk-1] int32, perm
[B*T*H*(topk-1)] int32, offs [BH*NC + 1] int32, the forward's work table (2 int32 per past_bm pairs) and
the chunk tables: per token and head 4*D*elem + 4 + 8*(topk-1) bytes (bf16, D=64, topk=3: 532 bytes;
q/k/v/o alone are 512). Transient: the forward partials (o, lse) and the backward dQ partials, fp32
[B*T*H*(topk-1), D + 1]-ish; with the Gluon dK/dV kernel its bucket-ordered row table (`gather_rows`:
row index, lse and delta, 12 bytes per pair, buckets padded to whole 64-row tiles); with dQ formed there
(`dq_in_dkdv`) fp32 dQ parts instead of the partials: the own part [B*T*H, D] and one row per padded entry.

Any chunk size >= 1 and any T work (tiles are masked); documents may be shorter than a chunk.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import gluon_dkdv

__all__ = ["sparse_attention_triton", "chunk_selection_triton", "prepare_selection", "resolve_config", "CONFIG_GPU",
           "CONFIG_INTERPRET"]

# Launch parameters. *_bm = query rows per tile, *_bn = key rows per tile.
CONFIG_GPU = {
    # chunk means: 256 key rows per step, 8 warps (H200, 64K, chunk 2048: 82 -> 48 us; a program walks its chunk)
    "means_bn": 256, "means_warps": 8,
    # sel_bg: chunks scored per block by one product; sel_prec: its precision, "tf32x3" (tensor cores,
    # fp32 to about 1e-6 relative: 1.5 ms at 64K tokens, chunk 128) or "ieee" (exact fp32 on the FMA
    # units, about 7 ms there)
    # sel_maxnreg: 96 registers fit five programs per SM instead of four, no spills (64K chunk 2048: 168 -> 158 us)
    "sel_bm": 64, "sel_warps": 4, "sel_bg": 32, "sel_prec": "tf32x3", "sel_maxnreg": 96,
    # own-chunk tiles of 64 query rows (spill-free; 128 rows: 11.7 vs 10.6 ms at 64K, chunk 128, topk 8)
    "fwd_bm": 64, "fwd_bn": 64, "fwd_warps": 4, "fwd_stages": 3, "fwd_maxnreg": 0,
    "past_bm": 128, "past_bn": 64, "past_warps": 4, "past_stages": 3,
    # register caps (*_maxnreg, 0: none). The past-chunk forward's: 168 instead of 208 fits three programs
    # per SM instead of two, at 24 B of spills; H200, 64K: 2.56 -> 2.50 ms at chunk 2048 topk 3, 1.80 ->
    # 1.56 at chunk 128 topk 8, bitwise the same output (docs/benchmarks.md, session 13)
    "past_maxnreg": 168,
    # merge of the own-chunk result with the past partials: rows per program
    "merge_bm": 64, "merge_warps": 4,
    # "auto": with at most two past slots (topk <= 3) the own-chunk forward runs after the past chunks' and
    # merges their partials in its epilogue (no own-chunk partial through HBM, no merge launch); with more
    # slots the own-chunk forward runs first and `_merge_fwd_kernel` merges (its epilogue would read too many
    # partials: 64K chunk 128 topk 8 was 0.5 ms slower so, docs/benchmarks.md, session 14). True / False force.
    "merge_in_own": "auto",
    "dkdv_bn": 128, "dkdv_bm": 128, "dkdv_warps": 8, "dkdv_stages": 3,
    "dq_bm": 64, "dq_bn": 32, "dq_warps": 4, "dq_stages": 3, "dq_maxnreg": 0,
    # past-chunk dQ: 163 registers, three programs per SM already; a cap of 128 was slower (session 13)
    "dqp_bm": 128, "dqp_bn": 32, "dqp_warps": 4, "dqp_stages": 3, "dqp_maxnreg": 0,
    # dQ: False = recomputed per query (dq_past + dq_own kernels, deterministic);
    # True = atomically accumulated by the dK/dV kernel into an fp32 buffer (5 instead of 7 matmuls per
    # pair, non-deterministic sums). H200, fwd+bwd ms, default / dq_atomic: 64K chunk 2048 topk 3
    # 17.5 / 19.2 (22.4 before the key blocks' walks were staggered), 64K chunk 128 topk 8 10.6 / 10.1
    # (9.9 with 64 x 64 tiles, 4 warps); docs/benchmarks.md, session 7.
    "dq_atomic": False,
    # dK/dV: 0 = one program per key block over the whole bucket of queries that selected its chunk;
    # N > 0 = buckets cut in segments of N queries, partial sums added atomically (fp32), which bounds
    # the longest program when many queries pick the same chunk.
    "dkdv_split": 0,
    # dK/dV kernel: "triton" (_bwd_dkdv_kernel) or "gluon" (gluon_dkdv: the same sums, bitwise, with the
    # products issued asynchronously; Hopper, bf16/fp16, head size 64, Triton 3.6, not with dq_atomic or
    # dkdv_split). H200, 64K tokens, chunk 2048, topk 3: fwd+bwd 15.3 vs 16.7 ms (docs/benchmarks.md,
    # session 9). "auto": gluon where it can run, else triton.
    "dkdv_impl": "auto",
    # dQ inside the Gluon dK/dV kernel where one program covers a whole chunk (chunk size <= 128, topk >= 2):
    # no dQ recomputation pass for the past chunks (`gluon_dkdv.can_fuse_dq`); False: the two dQ kernels.
    "dq_in_dkdv": True,
    # Per-pair partial results kept between kernels (own-chunk and past-chunk outputs before the merge,
    # past-chunk dQ before the sum): "float32", or "input" (the input dtype: half the bytes, each partial
    # rounded once more before the fp32 merge; output partials are convex combinations of v rows, so they
    # stay in the input dtype's range). H200, 64K, fwd+bwd back to back: chunk 128 topk 8 7.58 -> 7.24 ms,
    # chunk 2048 topk 3 14.18 -> 14.42 (with dqp_maxnreg 168; the bf16 stores cost the past-chunk kernels
    # registers), error vs float64 at 8K 2.5e-3 -> 2.8e-3 (docs/benchmarks.md, session 14)
    "partial_dtype": "float32",
}
# fp32 inputs on a GPU (exact fp32 products, twice the bytes per tile): the default dK/dV tiles would need
# 264 KB of shared memory (the H100/H200 limit is 227 KB) and fail to launch; these take 74 KB
# (compile-only, Triton 3.6, head size 64: `bench_sparse_attention --compile-only --dtype float32`).
CONFIG_GPU_FP32 = {"dkdv_bn": 64, "dkdv_bm": 32, "dkdv_warps": 4}
# The CPU interpreter: the same keys with 16-row tiles, one warp, no pipelining (tiny test shapes).
CONFIG_INTERPRET = {
    key: 16 if key.endswith(("_bm", "_bn", "_bg")) else 1 if key.endswith(("_warps", "_stages"))
    else 0 if key.endswith("_maxnreg") else val
    for key, val in CONFIG_GPU.items()
}

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------
# Gating: chunk means and top-k selection
# --------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_means_kernel(K, MEANS, CH_START, CH_END, T, H, NC,
                        D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = tl.load(CH_START + g)
    end = tl.load(CH_END + g)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    base = K + (b.to(tl.int64) * T * H + h) * D
    acc = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(start, end, BN):
        rows = n0 + tl.arange(0, BN)
        ptrs = base + rows.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
        x = tl.load(ptrs, mask=(rows < end)[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    count = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(MEANS + (bh * NC + g).to(tl.int64) * D + offs_d, acc / count, mask=dmask)


@triton.jit
def _select_kernel(Q, MEANS, TOK_CHUNK, CH_FIRST, SEL, KEYS, T, H, NC,
                   D: tl.constexpr, BD: tl.constexpr, K1: tl.constexpr, KP: tl.constexpr,
                   BM: tl.constexpr, BG: tl.constexpr, SEL_PREC: tl.constexpr):
    """Top-(K1) past chunks of every query of a BM-row tile, best first (score desc, chunk id asc).

    Chunks are taken BG at a time: one product scores the block for the whole tile (every chunk by the
    same instructions, so equal means give equal scores), then as many insertion rounds as the tile's
    row with the most candidates above its current worst member needs (at most K1). A round takes every
    row's best remaining candidate (higher score, then lower id) and puts it in place of the worst
    member (lowest score, then highest id) when it scores strictly higher. Members always have lower
    ids than the block's chunks, so this keeps exactly the stable-descending top-K1 set. Padding slots
    (KP > K1) hold +inf so they are never the worst member. KEYS gets each (query, slot)'s bucket,
    batch*head * NC + chunk (B*H*NC for an empty slot), the sort key of the inversion."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    own = tl.load(TOK_CHUNK + rows, mask=rmask, other=0)
    first = tl.load(CH_FIRST + own, mask=rmask, other=0)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    tok = (b.to(tl.int64) * T + rows) * H + h
    q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(tl.float32)
    g_lo = tl.min(tl.where(rmask, first, NC), axis=0)
    g_hi = tl.max(tl.where(rmask, own, 0), axis=0)
    slot = tl.arange(0, KP)
    real = slot < K1
    top_s = tl.zeros([BM, KP], dtype=tl.float32) + tl.where(real, float("-inf"), float("inf"))[None, :]
    top_i = tl.zeros([BM, KP], dtype=tl.int32) + (-1 - slot)[None, :]
    mean_base = MEANS + (bh * NC).to(tl.int64) * D
    offs_g = tl.arange(0, BG)
    for g0 in range(g_lo, g_hi, BG):
        gs = g0 + offs_g
        m = tl.load(mean_base + gs[:, None] * D + offs_d[None, :], mask=(gs < g_hi)[:, None] & dmask[None, :],
                    other=0.0)
        if SEL_PREC == "tf32x3_exact_q":
            # q (bf16 / fp16 values) is exact in tf32, so tf32x3's product of q's low part is zero: the other
            # two in tf32x3's order (low part of the means, then high part, NaNs of the first dropped), bitwise
            # what tf32x3 gives with one product and q's split fewer
            mt = tl.trans(m)
            m_hi = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [mt], dtype=tl.float32, is_pure=True,
                                             pack=1)
            s = tl.dot(q, mt - m_hi, input_precision="tf32")
            s = tl.dot(q, m_hi, tl.where(s != s, 0.0, s), input_precision="tf32") + 0.0
        else:
            s = tl.dot(q, tl.trans(m), input_precision=SEL_PREC)
        eligible = (gs[None, :] >= first[:, None]) & (gs[None, :] < own[:, None]) & rmask[:, None]
        s = tl.where(eligible, s, float("-inf"))
        worst_s = tl.min(top_s, axis=1)
        rounds = tl.minimum(tl.max(tl.sum((s > worst_s[:, None]).to(tl.int32), axis=1), axis=0), K1)
        for _ in range(rounds):
            best = tl.max(s, axis=1)
            best_g = tl.min(tl.where(s == best[:, None], gs[None, :], 2147483647), axis=1)
            worst_s = tl.min(top_s, axis=1)
            worst_i = tl.max(tl.where(top_s == worst_s[:, None], top_i, -2147483647), axis=1)
            hit = (best > worst_s)[:, None] & (top_i == worst_i[:, None])
            top_s = tl.where(hit, best[:, None], top_s)
            top_i = tl.where(hit, best_g[:, None], top_i)
            s = tl.where(gs[None, :] == best_g[:, None], float("-inf"), s)
    a_s = top_s[:, :, None]
    a_i = top_i[:, :, None]
    o_s = top_s[:, None, :]
    o_i = top_i[:, None, :]
    better = ((o_s > a_s) | ((o_s == a_s) & (o_i < a_i))) & real[None, None, :]
    rank = tl.sum(better.to(tl.int32), axis=2)
    out = tl.where(top_i >= 0, top_i, -1)
    tl.store(SEL + tok[:, None] * K1 + rank, out, mask=rmask[:, None] & real[None, :])
    key = tl.where(top_i >= 0, bh * NC + top_i, tl.num_programs(1) * NC)
    tl.store(KEYS + tok[:, None] * K1 + rank, key, mask=rmask[:, None] & real[None, :])


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bucket_block(bucket, w, WS, OFFS, PERM, T, H, NC, K1: tl.constexpr, BM: tl.constexpr):
    """Work item w of a bucket table (bucket >= 0): its batch*head, chunk, batch and head, and its BM
    gathered (query, slot) pairs: pair ids, query tokens, flat [B*T*H] rows and the row mask."""
    pstart = tl.load(WS + w)
    pend = tl.load(OFFS + bucket + 1)
    bh = bucket // NC
    g = bucket % NC
    b = bh // H
    h = bh % H
    idx = pstart + tl.arange(0, BM)
    rmask = idx < pend
    pair = tl.load(PERM + idx, mask=rmask, other=0)
    t = (pair // (H * K1)) % T
    tok = (b.to(tl.int64) * T + t) * H + h
    return bh, g, b, h, pair, t, tok, rmask


@triton.jit
def _past_fwd_kernel(Q, K, V, OP, LSEP, PERM, OFFS, WB, WS, CH_START, CH_END, T, H, NC, scale2,
                     K1: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr):
    w = tl.program_id(0)
    bucket = tl.load(WB + w)
    if bucket < 0:
        return
    bh, g, b, h, pair, t, tok, rmask = _bucket_block(bucket, w, WS, OFFS, PERM, T, H, NC, K1, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    kbeg = tl.load(CH_START + g)
    kend = tl.load(CH_END + g)
    head = (b.to(tl.int64) * T * H + h) * D
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(kbeg, kend, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < kend
        kv_off = head + cols.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
        k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled: the scale goes into one FMA below
        if not EVEN_N:
            s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    pair64 = pair.to(tl.int64)
    tl.store(OP + pair64[:, None] * D + offs_d[None, :], o.to(OP.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSEP + pair64, m_i + tl.log2(l_safe), mask=rmask)


@triton.jit
def _own_fwd_inner(acc, l_i, m_i, q, K, V, head, rows, kst, k_lo, k_hi, scale2, offs_d, dmask,
                   H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(k_lo, k_hi, BN):
        cols = n0 + tl.arange(0, BN)
        kv_off = head + cols.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
        if MASKED:
            cmask = cols < k_hi
            k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        else:
            k = tl.load(K + kv_off, mask=dmask[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled: the scale goes into one FMA below
        if MASKED:
            vis = (cols[None, :] >= kst[:, None]) & (cols[None, :] <= rows[:, None]) & cmask[None, :]
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _merge_slots(acc, l_i, m_i, tok, OP, LSEP, SEL, rmask, offs_d, dmask, K1: tl.constexpr, D: tl.constexpr):
    """Exact log-sum-exp merge of rows (acc: output scaled by l_i, m_i: log-sum-exp base 2) with the partials of
    their K1 slots (flat rows `tok`; empty slots, -1 in SEL, add nothing): the merged (acc, l_i, m_i)."""
    for j in tl.static_range(K1):
        pidx = tok * K1 + j
        valid = tl.load(SEL + pidx, mask=rmask, other=-1) >= 0
        lse_j = tl.load(LSEP + pidx, mask=valid, other=float("-inf"))
        o_j = tl.load(OP + pidx[:, None] * D + offs_d[None, :], mask=valid[:, None] & dmask[None, :],
                      other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, lse_j)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(lse_j - m_new)
        acc = acc * alpha[:, None] + beta[:, None] * o_j
        l_i = l_i * alpha + beta
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _own_fwd_kernel(Q, K, V, O, LSE, T, scale2, TOK_CHUNK, CH_START, OP, LSEP, SEL,
                    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    PARTIAL: tl.constexpr, MERGE: tl.constexpr, K1: tl.constexpr, DOT_PREC: tl.constexpr):
    """Causal attention inside each query's own chunk, per (query tile, head). PARTIAL (there are past
    slots to merge): the normalised output goes to O [B*T*H, D] (fp32 or input dtype) and the log-sum-exp to LSE [B*T*H]
    (`_merge_fwd_kernel` adds the past chunks); as it needs no selection, it then runs first, so the GPU works
    on it while the host issues the gating launches. MERGE: it runs after the past chunks' kernel and merges
    their partials (OP, LSEP, the K1 slots of SEL) itself, as `_merge_fwd_kernel` does. Else (or with MERGE)
    O is the final output and LSE [BH, T] the total log-sum-exp (base 2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    own = tl.load(TOK_CHUNK + rows, mask=rmask, other=0)
    kst = tl.load(CH_START + own, mask=rmask, other=0)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    tok = (b.to(tl.int64) * T + rows) * H + h
    q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    head = (b.to(tl.int64) * T * H + h) * D
    # Keys [full_lo, mid) are visible to every row of the tile: no mask there.
    lo = tl.min(tl.where(rmask, kst, T), axis=0)
    hi = tl.max(tl.where(rmask, rows, 0), axis=0) + 1
    full_lo = tl.max(tl.where(rmask, kst, 0), axis=0)
    first_row = pid_m * BM
    n_full = tl.maximum(first_row - full_lo, 0) // BN
    mid = full_lo + n_full * BN
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    acc, l_i, m_i = _own_fwd_inner(acc, l_i, m_i, q, K, V, head, rows, kst, lo, full_lo, scale2, offs_d, dmask,
                                   H, D, BN, True, DOT_PREC)
    acc, l_i, m_i = _own_fwd_inner(acc, l_i, m_i, q, K, V, head, rows, kst, full_lo, mid, scale2, offs_d, dmask,
                                   H, D, BN, False, DOT_PREC)
    acc, l_i, m_i = _own_fwd_inner(acc, l_i, m_i, q, K, V, head, rows, kst, mid, hi, scale2, offs_d, dmask,
                                   H, D, BN, True, DOT_PREC)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_i[:, None]
    omask = rmask[:, None] & dmask[None, :]
    if MERGE:  # as `_merge_fwd_kernel` does, on the own-chunk result still in registers
        o, l_o, m_o = _merge_slots(o, tl.full([BM], 1.0, dtype=tl.float32), m_i + tl.log2(l_i), tok, OP, LSEP, SEL,
                                   rmask, offs_d, dmask, K1, D)
        tl.store(O + tok[:, None] * D + offs_d[None, :], (o / l_o[:, None]).to(O.dtype.element_ty), mask=omask)
        tl.store(LSE + bh.to(tl.int64) * T + rows, m_o + tl.log2(l_o), mask=rmask)
    elif PARTIAL:
        tl.store(O + tok[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=omask)
        tl.store(LSE + tok, m_i + tl.log2(l_i), mask=rmask)
    else:
        tl.store(O + tok[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=omask)
        tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rmask)


@triton.jit
def _merge_fwd_kernel(O, LSE, OWN, LSEOWN, OP, LSEP, SEL, n_rows, T, H,
                      K1: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """Exact log-sum-exp merge of the own-chunk result with the partials of each row's selected slots, for
    BM consecutive flat [B*T*H] rows: O (input dtype) and the total log-sum-exp (base 2) into LSE [BH, T]."""
    tok = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = tok < n_rows
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    omask = rmask[:, None] & dmask[None, :]
    acc = tl.load(OWN + tok[:, None] * D + offs_d[None, :], mask=omask, other=0.0).to(tl.float32)
    acc, l_i, m_i = _merge_slots(acc, tl.full([BM], 1.0, dtype=tl.float32), tl.load(LSEOWN + tok, mask=rmask, other=0.0),
                                 tok, OP, LSEP, SEL, rmask, offs_d, dmask, K1, D)
    o = acc / l_i[:, None]
    tl.store(O + tok[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=omask)
    h = tok % H
    bt = tok // H
    row = ((bt // T) * H + h) * T + bt % T
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=rmask)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(O, DO, DELTA, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    offs_d = tl.arange(0, BD)
    mask = rmask[:, None] & (offs_d < D)[None, :]
    tok = (b.to(tl.int64) * T + rows) * H + h
    o = tl.load(O + tok[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + tok[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=rmask)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, PERM, DQACC, b, h, T, r_lo, r_hi, cols, scale, scale2, offs_d,
                dmask, rot_num, rot_den, H: tl.constexpr, K1: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                GATHER: tl.constexpr, CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, ROTATE: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query rows r_lo..r_hi (tokens, or bucket entries); with
    DQ_ATOMIC also add the rows' dQ contributions into the fp32 buffer DQACC (FlashAttention-2 style).

    ROTATE: the row tiles are visited from tile (n_tiles * rot_num) // rot_den on, wrapping around. With
    atomic dQ the key blocks of one chunk walk the same bucket at the same time; starting them at
    different tiles keeps them from adding into the same dQ rows at once.

    Tiles are [queries, keys] so that k and v stay right-hand operands (shared memory) for the whole
    loop and P, dS are transposed for the dV, dK products; with 128 x 128 tiles on two warpgroups this
    was 8.0 ms against 9.0 ms for [keys, queries] tiles (k, v as left operands) at 64K tokens. [keys,
    queries] tiles with k, v read from shared memory (no transposes at all) were slower again: 18.7 vs
    17.4 ms fwd+bwd at their best tiles (docs/benchmarks.md, session 7)."""
    n_tiles = tl.cdiv(r_hi - r_lo, BM)
    shift = (n_tiles * rot_num) // rot_den if ROTATE else 0
    for r0 in range(r_lo, r_hi, BM):
        if ROTATE:
            tile = (r0 - r_lo) // BM + shift
            r0 = r_lo + tl.where(tile >= n_tiles, tile - n_tiles, tile) * BM
        idx = r0 + tl.arange(0, BM)
        rmask = idx < r_hi
        if GATHER:
            pair = tl.load(PERM + idx, mask=rmask, other=0)
            t = (pair // (H * K1)) % T
        else:
            t = idx
        tok = (b.to(tl.int64) * T + t) * H + h
        lmask = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
        do = tl.load(DO + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
        lse = tl.load(LSE + t, mask=rmask, other=0.0)
        delta = tl.load(DELTA + t, mask=rmask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        p = tl.exp2(qk - lse[:, None])  # padded rows: q = dO = 0, so they add nothing below
        if CAUSAL:
            p = tl.where((t[:, None] >= cols[None, :]) & rmask[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        if DQ_ATOMIC:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
            tl.atomic_add(DQACC + tok[:, None] * D + offs_d[None, :], dq, mask=lmask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, OFFS, WB, WS, CH_START, CH_END, DQACC, T, NC, NKB, BH,
                     scale, scale2, H: tl.constexpr, K1: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                     STAGGER: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of one block of BN keys of one chunk.

    SPLIT == 0: one program per (head, chunk, key block) owns the block: own-chunk queries plus the
    whole bucket of gathered queries, plain stores. SPLIT > 0: the bucket is cut in segments of SPLIT
    queries (work table WB/WS, at least one segment per chunk); one program per (segment, key block),
    the first segment also does the own-chunk queries; partial dK/dV are atomically added into fp32
    buffers, so one heavily selected chunk does not serialise on a single program.
    """
    pid = tl.program_id(0)
    if SPLIT > 0:
        item = pid // NKB
        kb = pid % NKB
        bucket = tl.load(WB + item)
        if bucket < 0:
            return
        bh = bucket // NC
        g = bucket % NC
        seg_lo = tl.load(WS + item)
        first_seg = seg_lo == tl.load(OFFS + bucket)
        seg_hi = tl.minimum(seg_lo + SPLIT, tl.load(OFFS + bucket + 1))
    else:
        # Heads vary fastest so that the (longest) early chunks of every head are scheduled first.
        bh = pid % BH
        g = pid // BH // NKB
        kb = (pid // BH) % NKB
        first_seg = True
        seg_lo = 0
        seg_hi = 0
        if K1 > 0:
            seg_lo = tl.load(OFFS + bh * NC + g)
            seg_hi = tl.load(OFFS + bh * NC + g + 1)
    cbeg = tl.load(CH_START + g)
    cend = tl.load(CH_END + g)
    kstart = cbeg + kb * BN
    if kstart >= cend:
        return
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    cols = kstart + tl.arange(0, BN)
    cmask = cols < cend
    head = (b.to(tl.int64) * T * H + h) * D
    kv_off = head + cols.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
    kvmask = cmask[:, None] & dmask[None, :]
    k = tl.load(K + kv_off, mask=kvmask, other=0.0)
    v = tl.load(V + kv_off, mask=kvmask, other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    lse_row = LSE + bh.to(tl.int64) * T
    delta_row = DELTA + bh.to(tl.int64) * T
    if first_seg:
        # Own-chunk queries: the diagonal rows (causal mask), then the rows below the block (all visible).
        diag_end = tl.minimum(kstart + BN, cend)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, lse_row, delta_row, PERM, DQACC, b, h, T, kstart, diag_end, cols,
                             scale, scale2, offs_d, dmask, 0, 1, H, K1, D, BM, False, True, DQ_ATOMIC, False, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, lse_row, delta_row, PERM, DQACC, b, h, T, diag_end, cend, cols,
                             scale, scale2, offs_d, dmask, 0, 1, H, K1, D, BM, False, False, DQ_ATOMIC, False, DOT_PREC)
    if K1 > 0:
        # Queries of later chunks that selected this chunk.
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, lse_row, delta_row, PERM, DQACC, b, h, T, seg_lo, seg_hi, cols,
                             scale, scale2, offs_d, dmask, kb, NKB, H, K1, D, BM, True, False, DQ_ATOMIC, STAGGER,
                             DOT_PREC)
    if SPLIT > 0:
        tl.atomic_add(DK + kv_off, dk * scale, mask=kvmask, sem="relaxed")
        tl.atomic_add(DV + kv_off, dv, mask=kvmask, sem="relaxed")
    else:
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kvmask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _bwd_dq_past_kernel(Q, K, V, DO, LSE, DELTA, DQP, PERM, OFFS, WB, WS, CH_START, CH_END, T, H, NC, scale, scale2,
                        K1: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    w = tl.program_id(0)
    bucket = tl.load(WB + w)
    if bucket < 0:
        return
    bh, g, b, h, pair, t, tok, rmask = _bucket_block(bucket, w, WS, OFFS, PERM, T, H, NC, K1, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    lmask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
    do = tl.load(DO + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + t, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + t, mask=rmask, other=0.0)
    kbeg = tl.load(CH_START + g)
    kend = tl.load(CH_END + g)
    head = (b.to(tl.int64) * T * H + h) * D
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(kbeg, kend, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < kend
        kv_off = head + cols.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
        k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)  # padded keys are zero: no mask needed
    pair64 = pair.to(tl.int64)
    tl.store(DQP + pair64[:, None] * D + offs_d[None, :], (dq * scale).to(DQP.dtype.element_ty), mask=lmask)


@triton.jit
def _dq_own_inner(dq, q, do, lse, delta, K, V, head, rows, kst, k_lo, k_hi, scale2, offs_d, dmask,
                  H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    for n0 in range(k_lo, k_hi, BN):
        cols = n0 + tl.arange(0, BN)
        kv_off = head + cols.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
        if MASKED:
            cmask = cols < k_hi
            k = tl.load(K + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=cmask[:, None] & dmask[None, :], other=0.0)
        else:
            k = tl.load(K + kv_off, mask=dmask[None, :], other=0.0)
            v = tl.load(V + kv_off, mask=dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale2
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            vis = (cols[None, :] >= kst[:, None]) & (cols[None, :] <= rows[:, None]) & cmask[None, :]
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_own_kernel(Q, K, V, DO, LSE, DELTA, DQ, DQP, SEL, TOK_CHUNK, CH_START, T, scale, scale2,
                       H: tl.constexpr, K1: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    own = tl.load(TOK_CHUNK + rows, mask=rmask, other=0)
    kst = tl.load(CH_START + own, mask=rmask, other=0)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    lmask = rmask[:, None] & dmask[None, :]
    tok = (b.to(tl.int64) * T + rows) * H + h
    q = tl.load(Q + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
    do = tl.load(DO + tok[:, None] * D + offs_d[None, :], mask=lmask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    head = (b.to(tl.int64) * T * H + h) * D
    lo = tl.min(tl.where(rmask, kst, T), axis=0)
    hi = tl.max(tl.where(rmask, rows, 0), axis=0) + 1
    full_lo = tl.max(tl.where(rmask, kst, 0), axis=0)
    first_row = pid_m * BM
    n_full = tl.maximum(first_row - full_lo, 0) // BN
    mid = full_lo + n_full * BN
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    dq = _dq_own_inner(dq, q, do, lse, delta, K, V, head, rows, kst, lo, full_lo, scale2, offs_d, dmask,
                       H, D, BN, True, DOT_PREC)
    dq = _dq_own_inner(dq, q, do, lse, delta, K, V, head, rows, kst, full_lo, mid, scale2, offs_d, dmask,
                       H, D, BN, False, DOT_PREC)
    dq = _dq_own_inner(dq, q, do, lse, delta, K, V, head, rows, kst, mid, hi, scale2, offs_d, dmask,
                       H, D, BN, True, DOT_PREC)
    dq = dq * scale
    for j in tl.static_range(K1):
        pidx = tok * K1 + j
        sj = tl.load(SEL + pidx, mask=rmask, other=-1)
        valid = sj >= 0
        dq += tl.load(DQP + pidx[:, None] * D + offs_d[None, :], mask=valid[:, None] & dmask[None, :],
                      other=0.0).to(tl.float32)
    tl.store(DQ + tok[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=lmask)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------

_TABLE_CACHE: dict = {}


def _chunk_tables(T: int, chunk_size: int, bounds: tuple, device: torch.device):
    """Chunk tables shared by every batch row and head (all int32, on `device`):

    ch_start/ch_end [NC]: token range of global chunk g; ch_first [NC]: first chunk of g's document;
    tok_chunk [T]: global chunk of each token. Chunks are counted from each document's start.
    """
    key = (T, chunk_size, bounds, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    ends = torch.tensor(bounds[1:], dtype=torch.int64)
    n_per_doc = (ends - starts + chunk_size - 1) // chunk_size
    NC = int(n_per_doc.sum())
    doc = torch.repeat_interleave(torch.arange(len(n_per_doc)), n_per_doc)
    first = torch.cumsum(n_per_doc, 0) - n_per_doc
    local = torch.arange(NC) - first[doc]
    ch_start = starts[doc] + local * chunk_size
    ch_end = torch.minimum(ch_start + chunk_size, ends[doc])
    tok_chunk = torch.repeat_interleave(torch.arange(NC), ch_end - ch_start)
    tables = tuple(x.to(torch.int32).to(device) for x in (ch_start, ch_end, first[doc], tok_chunk))
    if len(_TABLE_CACHE) > 64:
        _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = (NC,) + tables
    return _TABLE_CACHE[key]


_CONFIG_CACHE: dict = {}


def _config(device: torch.device, config, dtype=None) -> dict:
    """The checked launch parameters (shared between calls with the same options: do not modify)."""
    try:
        key = (device.type, dtype, tuple(sorted(config.items())) if config else None)
        hit = _CONFIG_CACHE.get(key)
    except TypeError:  # an unhashable option value: checked (and refused) below
        key = hit = None
    if hit is not None:
        return hit
    cfg = _check_config(device, config, dtype)
    if key is not None:
        if len(_CONFIG_CACHE) > 64:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = cfg
    return cfg


def _check_config(device: torch.device, config, dtype=None) -> dict:
    base = CONFIG_INTERPRET if device.type != "cuda" else CONFIG_GPU
    cfg = dict(base)
    if device.type == "cuda" and dtype == torch.float32:
        cfg.update(CONFIG_GPU_FP32)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown sparse attention config keys {sorted(unknown)}")
        cfg.update(config)
    def power_of_two(val, low):
        return isinstance(val, int) and not isinstance(val, bool) and val >= low and not val & (val - 1)

    for key, val in cfg.items():
        # tl.dot needs 16-row tiles on a GPU (means_bn feeds no product); the CPU interpreter runs smaller ones
        low = 16 if key.endswith("_bg") or (device.type == "cuda" and key != "means_bn") else 1
        if key.endswith(("_bm", "_bn", "_bg")) and not power_of_two(val, low):
            raise ValueError(f"sparse attention config {key} must be a power of two >= {low}, got {val!r}")
        if key.endswith("_warps") and not power_of_two(val, 1):
            raise ValueError(f"sparse attention config {key} must be a power of two >= 1, got {val!r}")
        if key.endswith("_stages") and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"sparse attention config {key} must be an integer >= 1, got {val!r}")
        if key.endswith("_maxnreg") and (isinstance(val, bool) or not isinstance(val, int)
                                         or not (val == 0 or 32 <= val <= 255)):
            raise ValueError(f"sparse attention config {key} must be 0 (no cap) or an integer from 32 to 255, "
                             f"got {val!r}")
    if cfg["sel_prec"] not in ("tf32x3", "ieee"):
        raise ValueError(f"sparse attention config sel_prec must be 'tf32x3' or 'ieee', got {cfg['sel_prec']!r}")
    if cfg["merge_in_own"] not in ("auto", True, False):
        raise ValueError(f"sparse attention config merge_in_own must be 'auto', true or false, "
                         f"got {cfg['merge_in_own']!r}")
    for key in ("dq_atomic", "dq_in_dkdv"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"sparse attention config {key} must be true or false, got {cfg[key]!r}")
    if cfg["partial_dtype"] not in ("float32", "input"):
        raise ValueError(f"sparse attention config partial_dtype must be 'float32' or 'input', "
                         f"got {cfg['partial_dtype']!r}")
    if cfg["dkdv_impl"] not in ("auto", "triton", "gluon"):
        raise ValueError(f"sparse attention config dkdv_impl must be 'auto', 'triton' or 'gluon', "
                         f"got {cfg['dkdv_impl']!r}")
    split = cfg["dkdv_split"]
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ValueError(f"sparse attention config dkdv_split must be an integer >= 0, got {split!r}")
    return cfg


def resolve_config(options=None, device="cuda", dtype=None) -> dict:
    """The launch parameters for `device` and input `dtype` (CONFIG_GPU on CUDA, with CONFIG_GPU_FP32 for fp32
    inputs, else CONFIG_INTERPRET) with `options` (some of their keys) on top; ValueError naming an unknown
    key or a bad value (the model checks its `attn_kernel` config with this at start-up)."""
    return dict(_config(torch.device(device), options, dtype))


def _bounds(cu_seqlens, B: int, T: int) -> tuple:
    if cu_seqlens is None:
        return (0, T)
    from .naive import _document_bounds

    return tuple(_document_bounds(cu_seqlens, B, T))


def _select(q, k, NC, tables, K1, cfg):
    """Chunk means + top-K1 selection (K1 >= 1; tables from `_chunk_tables`): sel [B, T, H, K1] int32 global
    chunk ids and the pairs' bucket keys, flat int16 (where B*H*NC < 2**15) or int32."""
    B, T, H, D = q.shape
    ch_start, ch_end, ch_first, tok_chunk = tables
    BD = max(16, triton.next_power_of_2(D))
    means = torch.empty(B * H, NC, D, device=q.device, dtype=torch.float32)
    _chunk_means_kernel[(NC, B * H)](k, means, ch_start, ch_end, T, H, NC, D=D, BD=BD, BN=cfg["means_bn"],
                                     num_warps=cfg["means_warps"])
    sel = torch.empty(B, T, H, K1, device=q.device, dtype=torch.int32)
    # int16 sort keys where the buckets (and the empty-slot key B*H*NC) fit: the radix sort then takes two
    # passes over the keys instead of four
    key_dtype = torch.int16 if B * H * NC < 2**15 else torch.int32
    keys = torch.empty(B * T * H * K1, device=q.device, dtype=key_dtype)
    KP = max(2, triton.next_power_of_2(K1))
    _select_kernel[(triton.cdiv(T, cfg["sel_bm"]), B * H)](q, means, tok_chunk, ch_first, sel, keys, T, H, NC, D=D,
                                                           BD=BD, K1=K1, KP=KP, BM=cfg["sel_bm"], BG=cfg["sel_bg"],
                                                           SEL_PREC=_sel_precision(cfg, q.dtype), num_warps=cfg["sel_warps"],
                                                           **_maxnreg(cfg["sel_maxnreg"]))
    return sel, keys


def _invert(keys, n_buckets: int):
    """Sort the (query, slot) pairs by bucket (batch*head, chunk; `keys` from `_select_kernel`, n_buckets for
    an empty slot): perm [B*T*H*K1] int32 (stable, so queries ascend in each bucket), offs [n_buckets + 1] int32."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    offs = torch.searchsorted(sorted_keys, _arange(n_buckets + 1, keys.device, keys.dtype), out_int32=True)
    return perm.to(torch.int32), offs


_ARANGE_CACHE: dict = {}


def _arange(n: int, device, dtype=torch.int32) -> torch.Tensor:
    """torch.arange(n) as `dtype` on `device`, kept between calls (one launch less per call)."""
    key = (n, str(device), dtype)
    hit = _ARANGE_CACHE.get(key)
    if hit is None:
        if len(_ARANGE_CACHE) > 16:
            _ARANGE_CACHE.clear()
        hit = _ARANGE_CACHE[key] = torch.arange(n, device=device, dtype=dtype)
    return hit


@triton.jit
def _block_scan_kernel(OFFS, FIRST, n_buckets, BM: tl.constexpr, AT_LEAST_ONE: tl.constexpr, BLOCK: tl.constexpr):
    """FIRST[u] = number of BM-entry blocks in the buckets before u, for u = 0 .. n_buckets (one program)."""
    tl.store(FIRST, 0)
    carry = 0
    for u0 in range(0, n_buckets, BLOCK):
        u = u0 + tl.arange(0, BLOCK)
        m = u < n_buckets
        count = tl.load(OFFS + u + 1, mask=m, other=0) - tl.load(OFFS + u, mask=m, other=0)
        n_blocks = (count + BM - 1) // BM
        if AT_LEAST_ONE:
            n_blocks = tl.where(m, tl.maximum(n_blocks, 1), 0)
        tl.store(FIRST + 1 + u, carry + tl.cumsum(n_blocks, 0), mask=m)
        carry += tl.sum(n_blocks, 0)


@triton.jit
def _fill_work_kernel(OFFS, FIRST, WB, WS, n_buckets, n_items, BM: tl.constexpr, BLOCK: tl.constexpr):
    """Program u < n_buckets writes the work items of bucket u (bucket id, first entry); the last program
    marks the surplus items after them with bucket -1."""
    u = tl.program_id(0)
    if u < n_buckets:
        first = tl.load(FIRST + u)
        n_blocks = tl.load(FIRST + u + 1) - first
        lo = tl.load(OFFS + u)
        for j0 in range(0, n_blocks, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < n_blocks
            tl.store(WB + first + j, tl.zeros([BLOCK], dtype=tl.int32) + u, mask=m)
            tl.store(WS + first + j, lo + j * BM, mask=m)
    else:
        for w0 in range(tl.load(FIRST + n_buckets), n_items, BLOCK):
            w = w0 + tl.arange(0, BLOCK)
            m = w < n_items
            tl.store(WB + w, tl.full([BLOCK], -1, dtype=tl.int32), mask=m)
            tl.store(WS + w, tl.zeros([BLOCK], dtype=tl.int32), mask=m)


def _work_table(offs, BM: int, n_pairs: int, at_least_one: bool = False, first: bool = False):
    """Cut every bucket into blocks of BM pairs: (bucket or -1, first pair) per work item; no host sync.

    The grid is an upper bound (ceil(n_pairs / BM) + n_buckets items); surplus items get bucket -1, after
    the others, which are in bucket order. With `at_least_one`, empty buckets still get one (empty) item.
    With `first`, also the first item of every bucket and, last, the number of items in use [n_buckets + 1].
    Two launches (`_block_scan_kernel`, `_fill_work_kernel`): the host time of the torch ops this took
    before left the GPU idle at the start of the forward."""
    n_buckets = offs.numel() - 1
    n_items = triton.cdiv(n_pairs, BM) + n_buckets
    firsts = torch.empty(n_buckets + 1, device=offs.device, dtype=torch.int32)
    wb = torch.empty(n_items, device=offs.device, dtype=torch.int32)
    ws = torch.empty(n_items, device=offs.device, dtype=torch.int32)
    _block_scan_kernel[(1,)](offs, firsts, n_buckets, BM=BM, AT_LEAST_ONE=at_least_one, BLOCK=1024)
    _fill_work_kernel[(n_buckets + 1,)](offs, firsts, wb, ws, n_buckets, n_items, BM=BM, BLOCK=256)
    return (wb, ws, n_items, firsts) if first else (wb, ws, n_items)


def _use_gluon_dkdv(cfg, q) -> bool:
    """Whether the backward takes the Gluon dK/dV kernel; "gluon" where it cannot run raises the reason."""
    impl = cfg["dkdv_impl"]
    if impl == "triton":
        return False
    reason = gluon_dkdv.unsupported_reason(q.device, q.dtype, q.shape[-1])
    if reason is None and (cfg["dq_atomic"] or cfg["dkdv_split"]):
        reason = "dq_atomic and dkdv_split are Triton-kernel options"
    if reason is not None and impl == "gluon":
        raise ValueError(f"sparse attention config dkdv_impl 'gluon' cannot run: {reason}")
    return reason is None


def _maxnreg(cap: int) -> dict:
    """Launch option capping registers per thread (0: none; the CPU interpreter takes no such option)."""
    return {"maxnreg": cap} if cap else {}


def _sel_precision(cfg, dtype) -> str:
    """The selection kernel's SEL_PREC: config sel_prec, except that tf32x3 for bf16 / fp16 queries (exact in
    tf32) becomes "tf32x3_exact_q", the same scores with one product fewer (inline PTX: not in the interpreter)."""
    if cfg["sel_prec"] == "tf32x3" and dtype in (torch.bfloat16, torch.float16) and not _interpreting():
        return "tf32x3_exact_q"
    return cfg["sel_prec"]


def _merge_in_own(cfg, K1: int) -> bool:
    """Whether the own-chunk forward merges the past partials itself (config merge_in_own; "auto": K1 <= 2)."""
    mode = cfg["merge_in_own"]
    return K1 <= 2 if mode == "auto" else bool(mode)


def _partial_dtype(cfg, dtype):
    return torch.float32 if cfg["partial_dtype"] == "float32" else dtype


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, chunk_size, topk, bounds, cfg):
    B, T, H, D = q.shape
    K1 = topk - 1
    BD = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D)
    scale2 = scale * LOG2E
    prec = _dot_prec(q.dtype)
    NC, ch_start, ch_end, ch_first, tok_chunk = _chunk_tables(T, chunk_size, bounds, q.device)
    o = torch.empty_like(q)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    partial = K1 > 0
    merge_in_own = partial and _merge_in_own(cfg, K1)
    dummy = torch.empty(1, device=q.device, dtype=torch.int32)

    def own_chunks(out, out_lse, partial_out, past=None):
        """The own-chunk forward into out, out_lse; past: (op, lsep, sel) to merge in its epilogue, or None."""
        _own_fwd_kernel[(triton.cdiv(T, cfg["fwd_bm"]), B * H)](q, k, v, out, out_lse, T, scale2, tok_chunk, ch_start,
                                                                *(past or (dummy, dummy, dummy)), H=H, D=D, BD=BD,
                                                                BM=cfg["fwd_bm"], BN=cfg["fwd_bn"],
                                                                PARTIAL=partial_out, MERGE=past is not None, K1=K1,
                                                                DOT_PREC=prec,
                                                                num_warps=cfg["fwd_warps"],
                                                                num_stages=cfg["fwd_stages"],
                                                                **_maxnreg(cfg["fwd_maxnreg"]))

    if partial and not merge_in_own:  # own-chunk result (fp32 or the input dtype), merged at the end
        own_o = torch.empty(B * T * H, D, device=q.device, dtype=_partial_dtype(cfg, q.dtype))
        own_lse = torch.empty(B * T * H, device=q.device, dtype=torch.float32)
        # First, as it needs no selection: the GPU runs it while the host issues the gating launches below.
        own_chunks(own_o, own_lse, True)
    elif not partial:
        own_chunks(o, lse, False)
    tables = (ch_start, ch_end, ch_first, tok_chunk)
    if not partial:
        return o, lse, dummy, dummy, dummy, NC, tables, (dummy, dummy, 0)
    n_pairs = B * T * H * K1
    if n_pairs >= 2**31:
        raise ValueError(f"B*T*H*(topk-1) = {n_pairs} exceeds the int32 pair index")
    sel, keys = _select(q, k, NC, tables, K1, cfg)
    perm, offs = _invert(keys, B * H * NC)
    wb, ws, n_items = _work_table(offs, cfg["past_bm"], n_pairs)
    op = torch.empty(n_pairs, D, device=q.device, dtype=_partial_dtype(cfg, q.dtype))
    lsep = torch.empty(n_pairs, device=q.device, dtype=torch.float32)
    _past_fwd_kernel[(n_items,)](q, k, v, op, lsep, perm, offs, wb, ws, ch_start, ch_end, T, H, NC, scale2,
                                 K1=K1, D=D, BD=BD, BM=cfg["past_bm"], BN=cfg["past_bn"],
                                 EVEN_N=(chunk_size % cfg["past_bn"] == 0), DOT_PREC=prec,
                                 num_warps=cfg["past_warps"], num_stages=cfg["past_stages"],
                                 **_maxnreg(cfg["past_maxnreg"]))
    if merge_in_own:
        own_chunks(o, lse, False, (op, lsep, sel))
    else:
        n_rows = B * T * H
        _merge_fwd_kernel[(triton.cdiv(n_rows, cfg["merge_bm"]),)](o, lse, own_o, own_lse, op, lsep, sel, n_rows, T,
                                                                  H, K1=K1, D=D, BD=BD, BM=cfg["merge_bm"],
                                                                  num_warps=cfg["merge_warps"])
    return o, lse, sel, perm, offs, NC, tables, (wb, ws, n_items)


def _backward(do, q, k, v, o, lse, sel, perm, offs, NC, tables, chunk_size, topk, cfg, past_work):
    """dq, dk, dv. past_work: the forward's work table (blocks of past_bm pairs), reused for dQ of the past
    chunks when dqp_bm is the same."""
    B, T, H, D = q.shape
    K1 = topk - 1
    BD = max(16, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D)
    scale2 = scale * LOG2E
    prec = _dot_prec(q.dtype)
    ch_start, ch_end, ch_first, tok_chunk = tables
    do = do.contiguous()
    delta = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, T, H=H, D=D, BD=BD, BM=64)
    nkb = triton.cdiv(chunk_size, cfg["dkdv_bn"])
    atomic = bool(cfg["dq_atomic"])
    split = int(cfg["dkdv_split"]) if K1 > 0 else 0
    dqacc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else delta
    if split > 0:
        dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        wb, ws, n_items = _work_table(offs, split, B * T * H * K1, at_least_one=True)
        grid = (n_items * nkb,)
    else:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        wb = ws = offs
        grid = (B * H * NC * nkb,)
    if _use_gluon_dkdv(cfg, q):
        work = _work_table(offs, gluon_dkdv.BM, B * T * H * K1, first=True) if K1 > 0 else None
        fused_dq = torch.empty_like(q) if cfg["dq_in_dkdv"] and gluon_dkdv.can_fuse_dq(chunk_size, K1) else None
        gluon_dkdv.dkdv_gluon(q, k, v, do, lse, delta, dk, dv, perm, offs, work, ch_start, ch_end, NC, chunk_size, K1,
                              scale, scale2, dq=fused_dq, sel=sel)
        if fused_dq is not None:
            return fused_dq, dk, dv
    else:
        _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, perm, offs, wb, ws, ch_start, ch_end, dqacc, T, NC,
                               nkb, B * H, scale, scale2, H=H, K1=K1, D=D, BD=BD, BM=cfg["dkdv_bm"],
                               BN=cfg["dkdv_bn"], SPLIT=split, DQ_ATOMIC=atomic, STAGGER=atomic and nkb > 1,
                               DOT_PREC=prec, num_warps=cfg["dkdv_warps"], num_stages=cfg["dkdv_stages"])
    if split > 0:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    if atomic:
        return dqacc.to(q.dtype), dk, dv
    n_pairs = B * T * H * K1
    if K1 > 0:
        dqp = torch.empty(n_pairs, D, device=q.device, dtype=_partial_dtype(cfg, q.dtype))
        same = cfg["dqp_bm"] == cfg["past_bm"]
        wb, ws, n_items = past_work if same else _work_table(offs, cfg["dqp_bm"], n_pairs)
        _bwd_dq_past_kernel[(n_items,)](q, k, v, do, lse, delta, dqp, perm, offs, wb, ws, ch_start, ch_end, T, H, NC,
                                        scale, scale2, K1=K1, D=D, BD=BD, BM=cfg["dqp_bm"], BN=cfg["dqp_bn"],
                                        DOT_PREC=prec, num_warps=cfg["dqp_warps"], num_stages=cfg["dqp_stages"],
                                        **_maxnreg(cfg["dqp_maxnreg"]))
    else:
        dqp = torch.empty(1, device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    _bwd_dq_own_kernel[(triton.cdiv(T, cfg["dq_bm"]), B * H)](q, k, v, do, lse, delta, dq, dqp, sel, tok_chunk,
                                                              ch_start, T, scale, scale2, H=H, K1=K1, D=D, BD=BD,
                                                              BM=cfg["dq_bm"], BN=cfg["dq_bn"], DOT_PREC=prec,
                                                              num_warps=cfg["dq_warps"], num_stages=cfg["dq_stages"],
                                                              **_maxnreg(cfg["dq_maxnreg"]))
    return dq, dk, dv


class _SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk_size, topk, bounds, cfg):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse, sel, perm, offs, NC, tables, (wb, ws, n_items) = _forward(q, k, v, chunk_size, topk, bounds, cfg)
        ctx.save_for_backward(q, k, v, o, lse, sel, perm, offs, wb, ws, *tables)
        ctx.meta = (chunk_size, topk, NC, cfg, n_items)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sel, perm, offs, wb, ws, *tables = ctx.saved_tensors
        chunk_size, topk, NC, cfg, n_items = ctx.meta
        dq, dk, dv = _backward(do, q, k, v, o, lse, sel, perm, offs, NC, tables, chunk_size, topk, cfg,
                               (wb, ws, n_items))
        return dq, dk, dv, None, None, None, None


def _check(q, k, v, chunk_size, topk):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (the own chunk counts as one), got {topk}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"head size {q.shape[-1]} > 128 is not supported")


def sparse_attention_triton(q, k, v, chunk_size: int, topk: int, cu_seqlens=None, *, config=None):
    """MoBA top-k chunk sparse attention with Triton kernels: [B, T, H, D] -> [B, T, H, D] (input dtype).

    Differentiable in q, k, v (exact gradients; none through the selection). `cu_seqlens` (B == 1)
    packs independent documents. `config` overrides launch parameters (keys of CONFIG_GPU).
    """
    _check(q, k, v, chunk_size, topk)
    B, T, H, D = q.shape
    bounds = _bounds(cu_seqlens, B, T)
    if T == 0 or B * H == 0:
        return q.clone() + (k.sum() + v.sum()) * 0  # empty output that still carries a graph
    cfg = _config(q.device, config, q.dtype)
    _use_gluon_dkdv(cfg, q)  # a forced "gluon" that cannot run fails here, before the forward
    return _SparseAttentionFunction.apply(q, k, v, int(chunk_size), int(topk), bounds, cfg)


def prepare_selection(q, k, chunk_size: int, topk: int, cu_seqlens=None, *, config=None):
    """The gating step alone: (sel [B, T, H, topk-1] int32 GLOBAL chunk ids or None, tok_chunk [T] int32,
    NC). Global chunk ids number the chunks of all documents one after another, so two tokens with the
    same id are in the same document (used by the benchmark's FlexAttention mask)."""
    _check(q, k, k, chunk_size, topk)
    B, T, H, D = q.shape
    bounds = _bounds(cu_seqlens, B, T)
    cfg = _config(q.device, config)
    NC, *tables = _chunk_tables(T, chunk_size, bounds, q.device)
    if topk == 1:
        return None, tables[3], NC
    with torch.no_grad():
        sel, _ = _select(q.contiguous(), k.contiguous(), NC, tables, topk - 1, cfg)
    return sel, tables[3], NC


def chunk_selection_triton(q, k, chunk_size: int, topk: int, cu_seqlens=None, *, config=None):
    """Like `naive.chunk_selection` (LongTensor [B, T, H, topk - 1], best first, -1 padded), with chunk
    ids counted from each token's document start."""
    B, T, H, D = q.shape
    sel, tok_chunk, NC = prepare_selection(q, k, chunk_size, topk, cu_seqlens, config=config)
    if sel is None:
        return torch.empty(B, T, H, 0, dtype=torch.long, device=q.device)
    bounds = _bounds(cu_seqlens, B, T)
    _, ch_start, ch_end, ch_first, _ = _chunk_tables(T, chunk_size, bounds, q.device)
    first_of_token = ch_first.long()[tok_chunk.long()].view(1, T, 1, 1)
    sel = sel.long()
    return torch.where(sel >= 0, sel - first_of_token, -1)
