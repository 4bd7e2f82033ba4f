"""The sparse attention dK/dV kernel in Gluon for Hopper (sm_90): the same work and summation order as
`triton_topk._bwd_dkdv_kernel` (bitwise-identical dK, dV on an H200), 5.4 instead of 8.1 ms at 64K tokens,
chunk 2048, topk 3 (docs/benchmarks.md, sessions 8, 9 and 13).

Why Gluon: Triton 3.6 waits for every warpgroup product whose result is used in the same iteration
(`wgmma.wait_group 0`), so the exponentials of a tile never overlap the tensor cores. Gluon issues the
products asynchronously and waits for exactly the one needed:

    per row tile of BM queries, each warpgroup on 64 keys:
    S^T = K Q^T and dP^T = V dO^T issued together      (k, v in shared memory, q, dO tiles from a ring)
    wait S^T; P^T = exp2(S^T - lse)                    (while dP^T runs)
    dV += P^T dO issued                                (P^T from registers)
    wait dP^T; dS^T = P^T (dP^T - delta)               (while dV runs)
    dK += dS^T Q issued                                (stays in flight into the next tile)

A program is one warpgroup on one block of 64 keys, so two programs share an SM and drift out of step:
one's exponentials run beside the other's products. (Two warpgroups on 128 keys, kept in step by the
ring's barrier, took 6.4 instead of 5.4 ms at 64K, chunk 2048: docs/benchmarks.md, session 13.)
The [keys, queries] tiles keep P^T and dS^T in the registers where the dV, dK products read them (no
shared-memory transpose). Row tiles (own-chunk queries, then the bucket of queries that selected the
chunk) go by cp.async into a 4-stage ring, two tiles ahead. `gather_rows` first lays every bucket out in
padded bucket order (whole tiles of BM rows, padding after its end): the rows' indices, lse and delta,
so that the loop finds a bucket tile's rows with one index load, no division and no bucket-end mask.

Chunks of at most FUSED_BN tokens (`can_fuse_dq`): one program of two warpgroups then covers a whole
chunk, so it also forms dQ = dS K of every row tile, complete there (dS^T goes through shared memory;
the warpgroups split D), and the backward needs no dQ pass over the past chunks (`dq_in_dkdv`,
`_dq_sum_kernel` adds the parts).

Only for bf16/fp16 inputs with head size 64 on compute capability 9.x, and Triton 3.6 (Gluon is an
experimental API that changes between releases); no CPU interpreter support (the Triton kernel is the
reference the tests compare it with, besides float64).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)
except ImportError as e:  # older Triton: no Gluon, or a different Gluon API
    gluon = None
    _IMPORT_ERROR = repr(e)
else:
    _IMPORT_ERROR = None

TESTED_TRITON = ("3.6.",)
BM = 64  # queries per row tile
STAGES = 4  # ring of row tiles, loaded two ahead
BN, WARPS = 64, 4  # keys and warps per program (one warpgroup)
FUSED_BN, FUSED_WARPS = 128, 8  # with dQ: the whole chunk, two warpgroups (they split D for dQ = dS K)


def triton_unsupported_reason() -> str | None:
    """Why the installed Triton cannot build the kernel (None: it can). Gluon changes between releases (3.9
    renamed thread_barrier), so only the release it is written for counts."""
    if gluon is None:
        return f"Triton without the Gluon Hopper API ({_IMPORT_ERROR})"
    if not triton.__version__.startswith(TESTED_TRITON):
        return f"Triton {triton.__version__} (the kernel is written for {', '.join(TESTED_TRITON)}x)"
    return None


@functools.lru_cache(maxsize=64)
def unsupported_reason(device, dtype, head_size: int) -> str | None:
    """Why the Gluon kernel cannot run for these inputs (None: it can); cached, as it is asked on every call."""
    reason = triton_unsupported_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability {major}.{minor} (needs 9.x, Hopper)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype} (needs bf16 or fp16)"
    if head_size != 64:
        return f"head size {head_size} (needs 64)"
    return None


@triton.jit
def _gather_rows_kernel(LSE, DELTA, PERM, OFFS, WB, WS, TOKG, LSE_G, DELTA_G, ROWPOS, T, NC, H: tl.constexpr,
                        K1: tl.constexpr, BM: tl.constexpr, POS: tl.constexpr):
    """Work item w (a block of up to BM entries of one bucket) -> padded rows w*BM .. w*BM+BM-1 in bucket
    order: the selecting queries' flat [B*T*H] row indices (-1 after the bucket's end), lse and delta; with
    POS also ROWPOS[pair] = the pair's padded row."""
    w = tl.program_id(0)
    bucket = tl.load(WB + w)
    if bucket >= 0:
        bh = bucket // NC
        idx = tl.load(WS + w) + tl.arange(0, BM)
        valid = idx < tl.load(OFFS + bucket + 1)
        pair = tl.load(PERM + idx, mask=valid, other=0)
        t = (pair // (H * K1)) % T
        rows = w.to(tl.int64) * BM + tl.arange(0, BM)
        tl.store(TOKG + rows, tl.where(valid, ((bh // H) * T + t) * H + bh % H, -1))
        tl.store(LSE_G + rows, tl.load(LSE + bh * T + t, mask=valid, other=0.0))
        tl.store(DELTA_G + rows, tl.load(DELTA + bh * T + t, mask=valid, other=0.0))
        if POS:
            tl.store(ROWPOS + pair, rows.to(tl.int32), mask=valid)


def gather_rows(lse, delta, perm, offs, work, T: int, H: int, NC: int, K1: int, positions: bool = False):
    """The bucket entries in padded bucket order (work item w of `work` fills rows w*BM .. w*BM+BM-1):
    (tokg [R] int32 flat row indices, -1 for padding; lse_g, delta_g [R] fp32), by `_gather_rows_kernel`;
    with `positions` also rowpos [pairs] int32, each (query, slot) pair's padded row.

    The kernel then reads a bucket tile's rows through one index load, without the division and masks
    that finding them through `perm` takes. Copies of the q, dO rows in this order (no index at all) were
    no faster and cost a gather of their own (docs/benchmarks.md, session 9)."""
    wb, ws, n_items = work
    R = n_items * BM
    tokg = torch.empty(R, device=lse.device, dtype=torch.int32)
    lse_g = lse.new_empty(R)
    delta_g = lse.new_empty(R)
    rowpos = torch.empty(perm.numel() if positions else 1, device=lse.device, dtype=torch.int32)
    _gather_rows_kernel[(n_items,)](lse, delta, perm, offs, wb, ws, tokg, lse_g, delta_g, rowpos, T, NC, H=H, K1=K1,
                                    BM=BM, POS=positions)
    return (tokg, lse_g, delta_g, rowpos) if positions else (tokg, lse_g, delta_g)


@triton.jit
def _dq_sum_kernel(DQ_OWN, DQ_G, ROWPOS, SEL, DQ, n_rows, K1: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """dQ of BM flat [B*T*H] rows: the own-chunk part plus the part of each filled slot, which the fused
    dK/dV kernel left at the pair's padded row of DQ_G; cast to the input dtype."""
    tok = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = tok < n_rows
    dd = tl.arange(0, D)
    acc = tl.load(DQ_OWN + tok[:, None] * D + dd[None, :], mask=rmask[:, None], other=0.0)
    for j in tl.static_range(K1):
        pidx = tok * K1 + j
        valid = rmask & (tl.load(SEL + pidx, mask=rmask, other=-1) >= 0)
        pos = tl.load(ROWPOS + pidx, mask=valid, other=0).to(tl.int64)
        acc += tl.load(DQ_G + pos[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0)
    tl.store(DQ + tok[:, None] * D + dd[None, :], acc.to(DQ.dtype.element_ty), mask=rmask[:, None])


if gluon is not None:

    @gluon.jit
    def _tile_rows(i, n_own, n_tiles, kstart, cend, bfirst, head, TOKG, H: gl.constexpr, D: gl.constexpr,
                   BM: gl.constexpr, IDX64: gl.constexpr, layout: gl.constexpr):
        """Element offsets into Q, DO and validity of the rows of tile i. Tiles 0 .. n_own-1 are the chunk's
        own queries (rows past the chunk's end invalid), the rest whole tiles of the bucket in padded bucket
        order, found through TOKG (-1: padding). Tiles past the last are invalid."""
        own = i < n_own
        row0 = gl.where(own, kstart + i * BM, (bfirst + i - n_own) * BM)
        offs = gl.arange(0, BM, layout)
        if IDX64:
            rows = row0.to(gl.int64) + offs
        else:
            rows = row0 + offs
        valid = offs < gl.where(i < n_tiles, gl.where(own, cend - row0, BM), 0)
        tok = gl.load(TOKG + rows, mask=valid & (not own), other=0)
        valid = valid & (own | (tok >= 0))
        if IDX64:
            tok = tok.to(gl.int64)
        return gl.where(own, head + rows * (H * D), tok * D), valid

    @gluon.jit
    def _load_row_tile(s, i, off, valid, n_own, kstart, bfirst, n_tiles, cend, lse_row, delta_row, Q, DO, LSE_G,
                       DELTA_G, q_ring, do_ring, lse_ring, delta_ring, D: gl.constexpr, BM: gl.constexpr,
                       ld_layout: gl.constexpr, vec_layout: gl.constexpr):
        """cp.async row tile i (q, dO rows at `off`, their lse and delta) into ring stage s; one commit group.
        Invalid rows read as zeros, and zero rows add nothing to dK, dV."""
        own = i < n_own
        offs_d = gl.arange(0, D, gl.SliceLayout(0, ld_layout))
        off = off[:, None] + offs_d[None, :]
        async_copy.async_copy_global_to_shared(q_ring.index(s), Q + off, mask=valid[:, None])
        async_copy.async_copy_global_to_shared(do_ring.index(s), DO + off, mask=valid[:, None])
        row0 = gl.where(own, kstart + i * BM, (bfirst + i - n_own) * BM)
        offs = gl.arange(0, BM, vec_layout)
        vmask = offs < gl.where(i < n_tiles, gl.where(own, cend - row0, BM), 0)
        rv = row0 + offs
        async_copy.async_copy_global_to_shared(lse_ring.index(s), gl.where(own, lse_row + rv, LSE_G + rv), mask=vmask)
        async_copy.async_copy_global_to_shared(delta_ring.index(s), gl.where(own, delta_row + rv, DELTA_G + rv),
                                               mask=vmask)
        async_copy.commit_group()

    @gluon.jit
    def _dkdv_gluon_kernel(Q, K, V, DO, LSE, DELTA, TOKG, LSE_G, DELTA_G, DK, DV, DQ_OWN, DQ_G, FIRST, CH_START,
                           CH_END, T, NC, NKB, BH, scale, scale2, H: gl.constexpr, K1: gl.constexpr, D: gl.constexpr,
                           BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, IDX64: gl.constexpr,
                           FUSE_DQ: gl.constexpr, num_warps: gl.constexpr):
        """dK, dV of one block of BN keys of one chunk; program order as `_bwd_dkdv_kernel` (SPLIT 0).

        FUSE_DQ (the whole chunk is this one key block): also dQ = dS K of every row tile, complete here:
        own-chunk rows into DQ_OWN [B*T*H, D], bucket rows into DQ_G at their padded rows (fp32, scaled)."""
        gl.static_assert(BN == 16 * num_warps)
        pid = gl.program_id(0)
        bh = pid % BH
        g = pid // BH // NKB
        kb = (pid // BH) % NKB
        bfirst = 0  # the bucket's first tile in the padded bucket-ordered table, and its number of tiles
        n_btiles = 0
        if K1 > 0:
            bfirst = gl.load(FIRST + bh * NC + g)
            n_btiles = gl.load(FIRST + bh * NC + g + 1) - bfirst
        cend = gl.load(CH_END + g)
        kstart = gl.load(CH_START + g) + kb * BN
        if kstart < cend:
            b = bh // H
            h = bh % H
            dt: gl.constexpr = Q.dtype.element_ty
            # [keys, queries] products: warps stacked along the keys, 16 rows each (64 per warpgroup)
            s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, BM, 16])
            kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
            op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
            col_l: gl.constexpr = gl.SliceLayout(0, s_l)
            ld_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                                  warps_per_cta=[num_warps, 1], order=[1, 0])
            row_l: gl.constexpr = gl.SliceLayout(1, ld_l)
            vec_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32],
                                                   warps_per_cta=[num_warps], order=[0])
            tile_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], dt)
            kv_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dt)
            vec_s: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])

            kr = kstart + gl.arange(0, BN, row_l)
            dd = gl.arange(0, D, gl.SliceLayout(0, ld_l))
            if IDX64:
                head = (b.to(gl.int64) * T * H + h) * D
                kv_off = head + kr.to(gl.int64)[:, None] * (H * D) + dd[None, :]
            else:
                head = (b * T * H + h) * D
                kv_off = head + kr[:, None] * (H * D) + dd[None, :]
            kv_mask = (kr < cend)[:, None]
            k_smem = gl.allocate_shared_memory(dt, [BN, D], kv_s, gl.load(K + kv_off, mask=kv_mask, other=0.0))
            v_smem = gl.allocate_shared_memory(dt, [BN, D], kv_s, gl.load(V + kv_off, mask=kv_mask, other=0.0))
            q_ring = gl.allocate_shared_memory(dt, [STAGES, BM, D], tile_s)
            do_ring = gl.allocate_shared_memory(dt, [STAGES, BM, D], tile_s)
            lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_s)
            delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_s)
            if FUSE_DQ:
                # dQ [queries, D] = dS K: one warpgroup's 64 query rows, the two warpgroups split D
                dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // 2, 2],
                                                               instr_shape=[16, D // 2, 16])
                ds_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BM], dt)
                ds_smem = gl.allocate_shared_memory(dt, [BN, BM], ds_s)
                zero_q = gl.zeros([BM, D], gl.float32, dq_l)
                dq_r = gl.arange(0, BM, gl.SliceLayout(1, dq_l))
                dq_d = gl.arange(0, D, gl.SliceLayout(0, dq_l))

            n_own = gl.cdiv(cend - kstart, BM)
            n_diag = gl.cdiv(BN, BM)  # own-chunk tiles that reach into the key block: causal mask
            n_tiles = n_own + n_btiles
            cols = kstart + gl.arange(0, BN, gl.SliceLayout(1, s_l))
            offs_c = gl.arange(0, BM, col_l)
            lse_row = LSE + bh * T
            delta_row = DELTA + bh * T

            AHEAD: gl.constexpr = STAGES - 2  # a stage is refilled two tiles after its last reader issued
            for i in gl.static_range(AHEAD):
                off, valid = _tile_rows(i, n_own, n_tiles, kstart, cend, bfirst, head, TOKG, H, D, BM, IDX64,
                                        row_l)
                _load_row_tile(i, i, off, valid, n_own, kstart, bfirst, n_tiles, cend, lse_row, delta_row, Q, DO,
                               LSE_G, DELTA_G, q_ring, do_ring, lse_ring, delta_ring, D, BM, ld_l, vec_l)
            # the rows of the next tile to load, one iteration ahead (their indices are loads)
            off, valid = _tile_rows(AHEAD, n_own, n_tiles, kstart, cend, bfirst, head, TOKG, H, D, BM, IDX64,
                                    row_l)
            dk = warpgroup_mma_init(gl.zeros([BN, D], gl.float32, kv_l))
            dv = warpgroup_mma_init(gl.zeros([BN, D], gl.float32, kv_l))
            zero_s = gl.zeros([BN, BM], gl.float32, s_l)
            for i in range(n_tiles):
                s = i % STAGES
                async_copy.wait_group(AHEAD - 1)
                fence_async_shared()
                gl.thread_barrier()  # every thread's copies of tile i landed; stage i-2's readers are done
                qs = q_ring.index(s)
                dos = do_ring.index(s)
                st = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dpt = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                lse = lse_ring.index(s).load(col_l)
                delta = delta_ring.index(s).load(col_l)
                _load_row_tile((i + AHEAD) % STAGES, i + AHEAD, off, valid, n_own, kstart, bfirst, n_tiles, cend,
                               lse_row, delta_row, Q, DO, LSE_G, DELTA_G, q_ring, do_ring, lse_ring, delta_ring,
                               D, BM, ld_l, vec_l)
                off, valid = _tile_rows(i + AHEAD + 1, n_own, n_tiles, kstart, cend, bfirst, head, TOKG, H, D, BM,
                                        IDX64, row_l)
                st, dk, dv = warpgroup_mma_wait(1, deps=(st, dk, dv))  # S^T and the previous tile's dK, dV
                pt = gl.exp2(st * scale2 - lse[None, :])
                if i < n_diag:
                    pt = gl.where((kstart + i * BM + offs_c)[None, :] >= cols[:, None], pt, 0.0)
                dv = warpgroup_mma(gl.convert_layout(pt.to(dt), op_l), dos, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=(dpt, ))
                dst = (pt * (dpt - delta[None, :])).to(dt)
                if FUSE_DQ:
                    ds_smem.store(dst)
                    fence_async_shared()
                    gl.thread_barrier()  # all of dS^T stored (the last tile's dQ read it before the loop's barrier)
                    # dK is issued in both branches; here after dQ, so waiting for all but one product waits for dQ
                    dqt = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, zero_q, use_acc=False, is_async=True)
                    dk = warpgroup_mma(gl.convert_layout(dst, op_l), qs, dk, is_async=True)
                    dqt = warpgroup_mma_wait(1, deps=(dqt, ))
                    own = i < n_own
                    row0 = gl.where(own, kstart + i * BM, (bfirst + i - n_own) * BM)
                    if IDX64:
                        rq = row0.to(gl.int64) + dq_r
                    else:
                        rq = row0 + dq_r
                    dq_ptr = gl.where(own, DQ_OWN + head + rq * (H * D), DQ_G + rq * D)
                    dq_mask = dq_r < gl.where(own, cend - row0, BM)
                    gl.store(dq_ptr[:, None] + dq_d[None, :], dqt * scale, mask=dq_mask[:, None])
                else:
                    dk = warpgroup_mma(gl.convert_layout(dst, op_l), qs, dk, is_async=True)
            dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
            async_copy.wait_group(0)
            kr2 = kstart + gl.arange(0, BN, gl.SliceLayout(1, kv_l))
            dd2 = gl.arange(0, D, gl.SliceLayout(0, kv_l))
            if IDX64:
                off2 = head + kr2.to(gl.int64)[:, None] * (H * D) + dd2[None, :]
            else:
                off2 = head + kr2[:, None] * (H * D) + dd2[None, :]
            gl.store(DK + off2, (dk * scale).to(dt), mask=(kr2 < cend)[:, None])
            gl.store(DV + off2, dv.to(dt), mask=(kr2 < cend)[:, None])


def can_fuse_dq(chunk_size: int, K1: int) -> bool:
    """Whether the kernel can also form dQ: one program then covers a whole chunk, so every row tile's
    dQ = dS K is complete in it (no atomics), and the past chunks need no dQ pass of their own."""
    return chunk_size <= FUSED_BN and K1 > 0


def dkdv_gluon(q, k, v, do, lse, delta, dk, dv, perm, offs, work, ch_start, ch_end, NC: int, chunk_size: int, K1: int,
               scale: float, scale2: float, dq=None, sel=None):
    """Write dK, dV (input dtype) of the sparse attention backward into dk, dv; arguments as
    `triton_topk._backward` has them, which checks `unsupported_reason` first. work: (wb, ws, n_items, first),
    the buckets cut in blocks of BM entries (`triton_topk._work_table(..., first=True)`; None when K1 == 0).
    With `dq` (and the forward's `sel`; only where `can_fuse_dq`) also dQ, written there: the own-chunk and
    per-slot parts from this kernel, added by `_dq_sum_kernel`."""
    B, T, H, D = q.shape
    fuse = dq is not None
    if K1 > 0:
        wb, ws, n_items, first = work
        tokg, lse_g, delta_g, *rowpos = gather_rows(lse, delta, perm, offs, (wb, ws, n_items), T, H, NC, K1,
                                                    positions=fuse)
    else:
        tokg, lse_g, delta_g, first = offs, lse, delta, offs
    if fuse:
        dq_own = torch.empty(q.numel(), device=q.device, dtype=torch.float32)
        dq_g = torch.empty(tokg.numel(), D, device=q.device, dtype=torch.float32)
    else:
        dq_own = dq_g = lse
    bn, warps = (FUSED_BN, FUSED_WARPS) if fuse else (BN, WARPS)
    nkb = triton.cdiv(chunk_size, bn)
    idx64 = max(q.numel(), dq_g.numel()) >= 2**31
    _dkdv_gluon_kernel[(B * H * NC * nkb,)](q, k, v, do, lse, delta, tokg, lse_g, delta_g, dk, dv, dq_own, dq_g, first,
                                            ch_start, ch_end, T, NC, nkb, B * H, scale, scale2, H=H, K1=K1, D=D, BM=BM,
                                            BN=bn, STAGES=STAGES, IDX64=idx64, FUSE_DQ=fuse, num_warps=warps)
    if fuse:
        n_rows = B * T * H
        _dq_sum_kernel[(triton.cdiv(n_rows, 64),)](dq_own, dq_g, rowpos[0], sel, dq, n_rows, K1=K1, D=D, BM=64)
