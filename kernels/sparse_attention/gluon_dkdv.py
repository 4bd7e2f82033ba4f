"""The sparse attention dK/dV kernel in Gluon for Hopper (sm_90): the same work and summation order as
`triton_topk._bwd_dkdv_kernel` (bitwise-identical dK, dV on an H200), 6.95 instead of 8.07 ms at 64K tokens,
chunk 2048, topk 3 (docs/benchmarks.md, session 8).

Why Gluon: Triton 3.6 waits for every warpgroup product whose result is used in the same iteration
(`wgmma.wait_group 0`), so the exponentials of a tile never overlap the tensor cores. Gluon issues the
products asynchronously and waits for exactly the one needed:

    per row tile of BM queries, each warpgroup on its 64 of the program's 128 keys:
    S^T = K Q^T and dP^T = V dO^T issued together      (k, v in shared memory, q, dO tiles from a ring)
    wait S^T; P^T = exp2(S^T - lse)                    (while dP^T runs)
    dV += P^T dO issued                                (P^T from registers)
    wait dP^T; dS^T = P^T (dP^T - delta)               (while dV runs)
    dK += dS^T Q issued                                (stays in flight into the next tile)

The [keys, queries] tiles keep P^T and dS^T in the registers where the dV, dK products read them (no
shared-memory transpose). Row tiles are gathered (own-chunk queries, then the bucket of queries that
selected the chunk) by cp.async into a 4-stage ring, two tiles ahead; lse and delta of the bucket rows
come pre-gathered in bucket order (`bucket_rows`), so their loads need no index first.

Only for bf16/fp16 inputs with head size 64 on compute capability 9.x, and Triton 3.6 (Gluon is an
experimental API that changes between releases); no CPU interpreter support (the Triton kernel is the
reference the tests compare it with, besides float64).
"""

from __future__ import annotations

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
BN = 128  # keys per program: 64 per warpgroup
BM = 64  # queries per row tile
STAGES = 4  # ring of row tiles, loaded two ahead
WARPS = 8


def triton_unsupported_reason() -> str | None:
    """Why the installed Triton cannot build the kernel (None: it can). Gluon changes between releases (3.9
    renamed thread_barrier), so only the release it is written for counts."""
    if gluon is None:
        return f"Triton without the Gluon Hopper API ({_IMPORT_ERROR})"
    if not triton.__version__.startswith(TESTED_TRITON):
        return f"Triton {triton.__version__} (the kernel is written for {', '.join(TESTED_TRITON)}x)"
    return None


def unsupported_reason(device, dtype, head_size: int) -> str | None:
    """Why the Gluon kernel cannot run for these inputs (None: it can)."""
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
def _bucket_rows_kernel(LSE, DELTA, PERM, LSE_G, DELTA_G, n, T, H: tl.constexpr, K1: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    pair = tl.load(PERM + idx, mask=mask, other=0).to(tl.int64)
    t = (pair // (H * K1)) % T
    bh = (pair // (T * H * K1)) * H + (pair // K1) % H
    tl.store(LSE_G + idx, tl.load(LSE + bh * T + t, mask=mask), mask=mask)
    tl.store(DELTA_G + idx, tl.load(DELTA + bh * T + t, mask=mask), mask=mask)


def bucket_rows(lse, delta, perm, T: int, H: int, K1: int):
    """lse, delta [B*H, T] of every bucket entry, in bucket order: [B*T*H*K1] fp32 each."""
    n = perm.numel()
    lse_g = torch.empty(max(n, 1), device=lse.device, dtype=torch.float32)
    delta_g = torch.empty_like(lse_g)
    if K1 > 0 and n > 0:
        _bucket_rows_kernel[(triton.cdiv(n, 1024),)](lse, delta, perm, lse_g, delta_g, n, T, H=H, K1=K1, BLOCK=1024)
    return lse_g, delta_g


if gluon is not None:

    @gluon.jit
    def _row_tile(i, n_own, kstart, cend, seg_lo, seg_hi, n_tiles, PERM, b, h, T,
                  H: gl.constexpr, K1: gl.constexpr, BM: gl.constexpr, IDX64: gl.constexpr, layout: gl.constexpr):
        """Flat [B*T*H] rows and validity of row tile i: own-chunk queries first, then the bucket's."""
        offs = gl.arange(0, BM, layout)
        own = i < n_own
        idx_own = kstart + i * BM + offs
        idx_b = seg_lo + (i - n_own) * BM + offs
        valid_b = (idx_b < seg_hi) & (not own)
        pair = gl.load(PERM + idx_b, mask=valid_b, other=0)
        t = gl.where(own, idx_own, (pair // (H * K1)) % T)
        valid = gl.where(own, idx_own < cend, valid_b) & (i < n_tiles)
        if IDX64:
            tok = (b.to(gl.int64) * T + t) * H + h
        else:
            tok = (b * T + t) * H + h
        return tok, valid

    @gluon.jit
    def _load_row_tile(s, i, tok, valid, n_own, kstart, cend, seg_lo, seg_hi, lse_row, delta_row, LSE_G, DELTA_G,
                       Q, DO, q_ring, do_ring, lse_ring, delta_ring, D: gl.constexpr, BM: gl.constexpr,
                       ld_layout: gl.constexpr, vec_layout: gl.constexpr):
        """cp.async row tile i (q, dO rows, their lse and delta) into ring stage s; one commit group.
        Masked rows read as zeros, and zero rows add nothing to dK, dV."""
        offs_d = gl.arange(0, D, gl.SliceLayout(0, ld_layout))
        off = tok[:, None] * D + offs_d[None, :]
        async_copy.async_copy_global_to_shared(q_ring.index(s), Q + off, mask=valid[:, None])
        async_copy.async_copy_global_to_shared(do_ring.index(s), DO + off, mask=valid[:, None])
        offs = gl.arange(0, BM, vec_layout)
        own = i < n_own
        r_own = kstart + i * BM + offs
        r_b = seg_lo + (i - n_own) * BM + offs
        vmask = ((r_own < cend) & own) | ((r_b < seg_hi) & (not own))
        async_copy.async_copy_global_to_shared(lse_ring.index(s), gl.where(own, lse_row + r_own, LSE_G + r_b),
                                               mask=vmask)
        async_copy.async_copy_global_to_shared(delta_ring.index(s), gl.where(own, delta_row + r_own, DELTA_G + r_b),
                                               mask=vmask)
        async_copy.commit_group()

    @gluon.jit
    def _dkdv_gluon_kernel(Q, K, V, DO, LSE, DELTA, LSE_G, DELTA_G, DK, DV, PERM, OFFS, CH_START, CH_END, T, NC, NKB,
                           BH, scale, scale2, H: gl.constexpr, K1: gl.constexpr, D: gl.constexpr, BM: gl.constexpr,
                           BN: gl.constexpr, STAGES: gl.constexpr, IDX64: gl.constexpr, num_warps: gl.constexpr):
        """dK, dV of one block of BN keys of one chunk; program order as `_bwd_dkdv_kernel` (SPLIT 0)."""
        gl.static_assert(BN == 16 * num_warps)
        pid = gl.program_id(0)
        bh = pid % BH
        g = pid // BH // NKB
        kb = (pid // BH) % NKB
        seg_lo = 0
        seg_hi = 0
        if K1 > 0:
            seg_lo = gl.load(OFFS + bh * NC + g)
            seg_hi = gl.load(OFFS + bh * NC + g + 1)
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

            n_own = gl.cdiv(cend - kstart, BM)
            n_diag = gl.cdiv(BN, BM)  # own-chunk tiles that reach into the key block: causal mask
            n_tiles = n_own + gl.cdiv(seg_hi - seg_lo, BM)
            cols = kstart + gl.arange(0, BN, gl.SliceLayout(1, s_l))
            offs_c = gl.arange(0, BM, col_l)
            lse_row = LSE + bh * T
            delta_row = DELTA + bh * T

            AHEAD: gl.constexpr = STAGES - 2  # a stage is refilled two tiles after its last reader issued
            for i in gl.static_range(AHEAD):
                tok, valid = _row_tile(i, n_own, kstart, cend, seg_lo, seg_hi, n_tiles, PERM, b, h, T, H, K1, BM,
                                       IDX64, row_l)
                _load_row_tile(i, i, tok, valid, n_own, kstart, cend, seg_lo, seg_hi, lse_row, delta_row, LSE_G,
                               DELTA_G, Q, DO, q_ring, do_ring, lse_ring, delta_ring, D, BM, ld_l, vec_l)
            # the rows of the next tile to load, one iteration ahead (gathered through PERM)
            tok, valid = _row_tile(AHEAD, n_own, kstart, cend, seg_lo, seg_hi, n_tiles, PERM, b, h, T, H, K1, BM,
                                   IDX64, row_l)
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
                _load_row_tile((i + AHEAD) % STAGES, i + AHEAD, tok, valid, n_own, kstart, cend, seg_lo, seg_hi,
                               lse_row, delta_row, LSE_G, DELTA_G, Q, DO, q_ring, do_ring, lse_ring, delta_ring, D, BM,
                               ld_l, vec_l)
                tok, valid = _row_tile(i + AHEAD + 1, n_own, kstart, cend, seg_lo, seg_hi, n_tiles, PERM, b, h, T,
                                       H, K1, BM, IDX64, row_l)
                st, dk, dv = warpgroup_mma_wait(1, deps=(st, dk, dv))  # S^T and the previous tile's dK, dV
                pt = gl.exp2(st * scale2 - lse[None, :])
                if i < n_diag:
                    pt = gl.where((kstart + i * BM + offs_c)[None, :] >= cols[:, None], pt, 0.0)
                dv = warpgroup_mma(gl.convert_layout(pt.to(dt), op_l), dos, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=(dpt, ))
                dst = pt * (dpt - delta[None, :])
                dk = warpgroup_mma(gl.convert_layout(dst.to(dt), op_l), qs, dk, is_async=True)
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


def dkdv_gluon(q, k, v, do, lse, delta, dk, dv, perm, offs, ch_start, ch_end, NC: int, chunk_size: int, K1: int,
               scale: float, scale2: float):
    """Write dK, dV (input dtype) of the sparse attention backward into dk, dv; arguments as
    `triton_topk._backward` has them, which checks `unsupported_reason` first."""
    B, T, H, D = q.shape
    lse_g, delta_g = bucket_rows(lse, delta, perm, T, H, K1)
    nkb = triton.cdiv(chunk_size, BN)
    _dkdv_gluon_kernel[(B * H * NC * nkb,)](q, k, v, do, lse, delta, lse_g, delta_g, dk, dv, perm, offs, ch_start,
                                            ch_end, T, NC, nkb, B * H, scale, scale2, H=H, K1=K1, D=D, BM=BM, BN=BN,
                                            STAGES=STAGES, IDX64=q.numel() >= 2**31, num_warps=WARPS)
