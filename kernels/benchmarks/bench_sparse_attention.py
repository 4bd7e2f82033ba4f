"""Benchmark the Triton top-k chunk sparse attention (CUDA only) against dense causal SDPA and FlexAttention.

    python -m rwkvx_kernels.benchmarks.bench_sparse_attention                     # default sweep
    python -m rwkvx_kernels.benchmarks.bench_sparse_attention --shapes 65536:16:2048:3 --no-decode
    python -m rwkvx_kernels.benchmarks.bench_sparse_attention --configs '{}' '{"dq_atomic": true}'
    python -m rwkvx_kernels.benchmarks.bench_sparse_attention --compile-only --configs '{}' '{"dkdv_bn": 64}'

Every shape is T:H:chunk:topk (B = 1, head size 64, bf16 unless --dtype). On identical inputs, in one process:
- ours: `rwkvx_kernels.sparse_attention.sparse_attention` (gating + attention), fwd and fwd+bwd, one row
  per --configs entry (launch parameters, see triton_topk.CONFIG_GPU);
- sdpa: dense causal `scaled_dot_product_attention`, flash backend (skipped above --dense-max-T:
  the estimate from quadratic scaling of the last measured shape is printed instead);
- sdpa_cudnn: the same dense attention through the cuDNN backend (T <= --cudnn-max-T), the faster dense
  kernel on Hopper; ours' rows note the speed-up against it too;
- flex: FlexAttention with OUR selection expressed as a block mask (built from the selected chunk
  indices, excluded from the timing) plus a mask_mod reading those indices (T in --flex-T only);
- the relative error (norm of difference / norm of reference) of the output and of dq, dk, dv
  against the float64 `sparse_attention_naive` on the first --ref-heads heads (T <= --ref-max-T);
  the "err" column is the largest of the four.
Times are CUDA-event medians of --iters runs after --warmup, each from an idle GPU (host work up to the first
launch included); --host-ahead-ms adds fwd+bwd with the host ahead of the GPU, as in a training step
(`timing.cuda_time_ms`); --steady adds fwd+bwd with the calls back to back, the GPU never idle
(`timing.steady_time_ms`, the way `triton.testing.do_bench` times). "peak" is torch.cuda.max_memory_allocated
during fwd+bwd (inputs included). Finally, decode: per-token time of ChunkedKVCache.step at each
--decode context length (H=16, chunk 2048, topk 3 unless --decode-shape).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import torch
from rwkvx_kernels.benchmarks.timing import cuda_time_ms, steady_time_ms

D = 64
DEVICE = "cuda"  # the benchmark is meant for CUDA; tests may point it elsewhere
DEFAULT_SHAPES = ["8192:16:2048:3", "65536:16:2048:3", "65536:16:128:8", "262144:16:2048:3", "1048576:16:2048:3"]


def parse_shape(text):
    T, H, cs, topk = (int(x) for x in text.split(":"))
    return T, H, cs, topk


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()




def measure(name, fwd, iters, warmup, do, keep_result=True, host_ahead_ms=0.0, steady=False):
    """fwd: () -> (output, inputs tuple). Returns dict with fwd ms, fwd+bwd ms, peak GiB (and the output and
    grads of the first call when keep_result); with host_ahead_ms > 0 also fwd+bwd ms with the host ahead
    of the GPU (`timing.cuda_time_ms`), with steady also fwd+bwd ms back to back (`timing.steady_time_ms`)."""
    row = {"method": name}
    try:
        def fwd_only():
            with torch.no_grad():
                fwd()

        def fwd_bwd():
            out, inputs = fwd()
            return torch.autograd.grad(out, inputs, do)

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out, inputs = fwd()
        grads = torch.autograd.grad(out, inputs, do)
        torch.cuda.synchronize()
        if keep_result:
            row["result"] = (out.detach(), *grads)
        del out, grads
        row["fwd"] = cuda_time_ms(fwd_only, iters, warmup)
        row["fwdbwd"] = cuda_time_ms(fwd_bwd, iters, warmup)
        if host_ahead_ms > 0:
            row["ahead"] = cuda_time_ms(fwd_bwd, iters, 1, host_ahead_ms=host_ahead_ms)
        if steady:
            row["steady"] = steady_time_ms(fwd_bwd, iters, 1)
        row["peak"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # noqa: BLE001
        row["error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if not is_oom(e):
            traceback.print_exc()
        torch.cuda.empty_cache()
    return row


def build_flex_block_mask(sel, tok_chunk, T, H, block=128):
    """BlockMask from our selection: sel [1, T, H, K1] int32 global chunk ids (-1 = none), tok_chunk [T].

    A KV block is 'full' when every query of the query block sees all of it (own chunk strictly below the
    diagonal, or a chunk that every query of the block selected), 'partial' when some query sees some of
    it; partial blocks are resolved by the mask_mod.
    """
    from torch.nn.attention.flex_attention import BlockMask

    dev = sel.device
    B, _, _, K1 = sel.shape
    nb = (T + block - 1) // block
    NC = int(tok_chunk.max()) + 1
    tc = tok_chunk.long()
    pos = torch.arange(T, device=dev)
    qb_of = pos // block
    blk_lo = torch.arange(nb, device=dev) * block
    blk_hi = torch.clamp(blk_lo + block, max=T) - 1  # last token of each block
    c_lo, c_hi = tc[blk_lo], tc[blk_hi]  # chunk range of each block
    blk_size = blk_hi - blk_lo + 1
    # how many queries of each query block selected each chunk: [B, H, nb, NC]
    cnt = torch.zeros(B, H, nb, NC + 1, device=dev, dtype=torch.int32)
    s = sel.permute(0, 2, 1, 3).long()  # [B, H, T, K1]
    s = torch.where(s >= 0, s, NC)
    flat = (qb_of[None, None, :, None] * (NC + 1) + s).reshape(B, H, T * K1)
    cnt.view(B, H, nb * (NC + 1)).scatter_add_(2, flat, torch.ones_like(flat, dtype=torch.int32))
    cnt = cnt[..., :NC]
    any_cum = torch.nn.functional.pad(torch.cumsum((cnt > 0).int(), -1), (1, 0))  # [B, H, nb, NC + 1]
    sel_any = (any_cum[..., c_hi + 1] - any_cum[..., c_lo]) > 0  # [B, H, nb(q), nb(kv)]
    single = (c_lo == c_hi) & (blk_size == block)
    sel_all = single[None, None, None, :] & (cnt[..., c_lo] == blk_size[None, None, :, None])
    # own chunk, causal
    q_lo, q_hi = c_lo[:, None], c_hi[:, None]
    own = (c_lo[None, :] <= q_hi) & (c_hi[None, :] >= q_lo) & (blk_lo[None, :] <= blk_hi[:, None])
    own_full = ((c_lo[:, None] == c_hi[:, None]) & (c_lo[None, :] == c_lo[:, None]) & single[None, :]
                & (blk_hi[None, :] < blk_lo[:, None]))
    full = own_full[None, None] | sel_all
    partial = (own[None, None] | sel_any) & ~full

    def to_kv(mask):
        num = mask.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = to_kv(partial)
    full_num, full_idx = to_kv(full)
    sel_bht = sel.permute(0, 2, 1, 3).contiguous()  # [B, H, T, K1]

    def mask_mod(b, h, q_idx, kv_idx):
        kc = tok_chunk[kv_idx]
        visible = (tok_chunk[q_idx] == kc) & (kv_idx <= q_idx)
        for j in range(K1):
            visible = visible | (sel_bht[b, h, q_idx, j] == kc)
        return visible

    try:
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                      seq_lengths=(T, T))
    except TypeError:
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod)
    density = (partial.sum() + full.sum()).item() / partial.numel()
    return bm, density


def profile_ours(q, k, v, do, cs, topk, cfg):
    """Per-kernel CUDA time of one fwd+bwd of ours (torch.profiler)."""
    from rwkvx_kernels.sparse_attention import sparse_attention
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = sparse_attention(q, k, v, cs, topk, config=cfg or None)
            torch.autograd.grad(out, (q, k, v), do)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=48), flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"profiler failed: {e!r}")


def reference(q, k, v, do, cs, topk, heads):
    from rwkvx_kernels.sparse_attention import sparse_attention_naive

    sl = slice(0, heads)
    q64, k64, v64 = (x[:, :, sl].detach().double().requires_grad_() for x in (q, k, v))
    out = sparse_attention_naive(q64, k64, v64, cs, topk)
    grads = torch.autograd.grad(out, (q64, k64, v64), do[:, :, sl].double())
    return (out.detach(), *grads)


def rel_errors(result, ref, heads, layout_bthd=True):
    errs = []
    for got, want in zip(result, ref):
        got = got[:, :, :heads] if layout_bthd else got[:, :heads].transpose(1, 2)
        errs.append(((got.double() - want).norm() / want.norm()).item())
    return max(errs)


def bench_shape(T, H, cs, topk, args, dense_est):
    from rwkvx_kernels.sparse_attention import last_backend, sparse_attention
    from rwkvx_kernels.sparse_attention.triton_topk import prepare_selection

    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q, k, v, do = (torch.randn(1, T, H, D, generator=g, device=dev, dtype=dtype) for _ in range(4))
    if args.skew:  # make chunk 0 attractive to every query: one very large bucket (load-balance check)
        u = torch.full((D,), args.skew / math.sqrt(D), device=dev, dtype=dtype)
        q, k = q + u, k.clone()
        k[:, :cs] += u
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    rows = []
    for i, cfg in enumerate(args.configs):
        name = "ours" if len(args.configs) == 1 else f"ours[{i}]"

        def fwd_ours(cfg=cfg):
            return sparse_attention(q, k, v, cs, topk, config=cfg or None), (q, k, v)

        rows.append(measure(name, fwd_ours, args.iters, args.warmup, do, keep_result=T <= args.ref_max_T,
                            host_ahead_ms=args.host_ahead_ms, steady=args.steady))
        rows[-1]["config"] = cfg
    assert last_backend() == "triton", last_backend()
    if T in args.profile_T:
        for i, cfg in enumerate(args.configs):
            print(f"== per kernel, ours[{i}] {json.dumps(cfg)}", flush=True)
            profile_ours(q, k, v, do, cs, topk, cfg)

    # dense causal SDPA, flash backend, on [B, H, T, D] copies (transposes not timed)
    if T <= args.dense_max_T or T in args.flex_T:
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        doh = do.transpose(1, 2).contiguous()
    if T <= args.dense_max_T:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fwd_sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True), (qh, kh, vh)

        dense_iters, dense_warm = (args.iters, args.warmup) if T <= 65536 else (max(1, args.iters // 2), 1)
        row = measure("sdpa", fwd_sdpa, dense_iters, dense_warm, doh, host_ahead_ms=args.host_ahead_ms, steady=args.steady)
        row.pop("result", None)  # dense attention is a different function: no error column
        if "fwdbwd" in row:
            dense_est["T"], dense_est["ms"] = T, row["fwdbwd"]
        rows.append(row)
        if T <= args.cudnn_max_T:  # the other fused dense kernel PyTorch ships (faster than flash on Hopper)
            def fwd_cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True), (qh, kh, vh)

            row = measure("sdpa_cudnn", fwd_cudnn, dense_iters, dense_warm, doh, host_ahead_ms=args.host_ahead_ms, steady=args.steady)
            row.pop("result", None)
            rows.append(row)
    else:
        if dense_est:  # quadratic scaling of the last measured dense run
            est = dense_est["ms"] * (T / dense_est["T"]) ** 2
            rows.append({"method": "sdpa", "error": f"skipped (T > --dense-max-T); quadratic estimate {est:.0f} ms",
                         "fwdbwd_est": est})
        else:
            rows.append({"method": "sdpa", "error": "skipped (T > --dense-max-T), no dense run to scale from"})

    # FlexAttention with the same selection
    density = float("nan")
    if T in args.flex_T:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            sel, tok_chunk, _ = prepare_selection(q.detach(), k.detach(), cs, topk)
            if sel is None:
                sel = torch.full((1, T, H, 1), -1, device=dev, dtype=torch.int32)
            block_mask, density = build_flex_block_mask(sel, tok_chunk, T, H)
            flex = torch.compile(flex_attention, dynamic=False)

            def fwd_flex():
                return flex(qh, kh, vh, block_mask=block_mask), (qh, kh, vh)

            row = measure("flex", fwd_flex, args.iters, args.warmup, doh, keep_result=T <= args.ref_max_T,
                          host_ahead_ms=args.host_ahead_ms, steady=args.steady)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = {"method": "flex", "error": "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:100]}"}
        if "result" in row:
            res = row["result"]
            row["result"] = tuple(x.transpose(1, 2) for x in res)
        rows.append(row)
    else:
        rows.append({"method": "flex", "error": "skipped (T not in --flex-T)"})

    # float64 reference on a few heads
    if T <= args.ref_max_T:
        try:
            ref = reference(q, k, v, do, cs, topk, args.ref_heads)
            for row in rows:
                if "result" in row:
                    row["err"] = rel_errors(row["result"], ref, args.ref_heads)
            del ref
        except Exception as e:  # noqa: BLE001
            print(f"reference failed: {'OOM' if is_oom(e) else e}")
    for row in rows:
        row.pop("result", None)
    torch.cuda.empty_cache()
    return rows, density


def bench_decode(ctx, H, cs, topk, steps, warmup):
    from rwkvx_kernels.sparse_attention import ChunkedKVCache

    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(1)
    cache = ChunkedKVCache(H, D, cs, topk, device=dev, dtype=torch.bfloat16, max_len=ctx + steps + warmup + 1)
    block = 65536
    for start in range(0, ctx, block):
        n = min(block, ctx - start)
        kk = torch.randn(1, n, H, D, generator=g, device=dev, dtype=torch.bfloat16)
        cache.extend(kk, torch.randn(1, n, H, D, generator=g, device=dev, dtype=torch.bfloat16))
    toks = torch.randn(steps + warmup, 3, 1, H, D, generator=g, device=dev, dtype=torch.bfloat16)
    for i in range(warmup):
        cache.step(*toks[i])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        y = cache.step(*toks[i])
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    assert torch.isfinite(y.float()).all()
    mem = (cache._k.numel() + cache._v.numel()) * 2 / 2**30
    del cache
    torch.cuda.empty_cache()
    return ms, mem


def fmt(x, spec=".2f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def compile_only(configs, topk=3, arch=90, dtype="bfloat16"):
    """Compile every kernel for sm_<arch> at the default launch parameters updated by each of `configs`
    (inputs of `dtype`, H=16, D=64, `topk`) and print registers, spills and shared memory; no GPU needed."""
    from rwkvx_kernels.benchmarks.resources import Compiler
    from rwkvx_kernels.sparse_attention import triton_topk as S

    compiler = Compiler(arch)
    f32, i32 = "*fp32", "*i32"
    types = {**dict.fromkeys(["MEANS", "OP", "LSEP", "LSE", "DELTA", "LSE_G", "DELTA_G", "DQP", "DQACC", "OWN",
                                 "LSEOWN", "DQ_OWN", "DQ_G"], f32),
             **dict.fromkeys(["PERM", "OFFS", "WB", "WS", "CH_START", "CH_END", "CH_FIRST", "TOK_CHUNK", "SEL", "KEYS",
                              "FIRST", "TOKG", "ROWPOS"], i32),
             **dict.fromkeys(["T", "H", "NC", "NKB", "BH", "n_buckets", "n_items",
                              "n_rows"], "i32"),
             "scale": "fp32", "scale2": "fp32",
             **dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"],
                             {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype])}
    H, K1, D = 16, topk - 1, 64
    kp = max(2, 1 << (K1 - 1).bit_length())
    for i, cfg in enumerate(configs):
        c = S.resolve_config(cfg, dtype=getattr(torch, dtype))
        if c["partial_dtype"] == "input":
            types.update(dict.fromkeys(["OP", "OWN", "DQP"], types["Q"]))
        else:
            types.update(dict.fromkeys(["OP", "OWN", "DQP"], f32))
        tag = f"[{i}] " if len(configs) > 1 else ""
        merge = K1 > 0 and S._merge_in_own(c, K1)
        sel_prec = S._sel_precision(c, getattr(torch, dtype))  # as `_select` launches it
        tiles = {p: {"BM": c.get(f"{p}_bm"), "BN": c.get(f"{p}_bn")} for p in ("past", "fwd", "dkdv", "dqp", "dq")}
        dot = {"DOT_PREC": "ieee" if dtype == "float32" else "tf32", "D": D, "BD": D}
        kernels = [  # (name, kernel, config prefix, constexprs, warps, stages)
            ("means", S._chunk_means_kernel, "means", {"D": D, "BD": D, "BN": c["means_bn"]}, c["means_warps"], 3),
            ("select", S._select_kernel, "sel", {"D": D, "BD": D, "K1": K1, "KP": kp, "BM": c["sel_bm"],
                                                 "BG": c["sel_bg"], "SEL_PREC": sel_prec}, c["sel_warps"], 3),
            ("past_fwd", S._past_fwd_kernel, "past", {**dot, "K1": K1, "EVEN_N": True, **tiles["past"]},
             c["past_warps"], c["past_stages"]),
            ("own_fwd", S._own_fwd_kernel, "fwd", {**dot, "H": H, "K1": K1, "PARTIAL": K1 > 0 and not merge,
                                                  "MERGE": merge, **tiles["fwd"]},
             c["fwd_warps"], c["fwd_stages"]),
            ("merge_fwd", S._merge_fwd_kernel, "merge", {"D": D, "BD": D, "K1": K1, "BM": c["merge_bm"]},
             c["merge_warps"], 1),
            ("block_scan", S._block_scan_kernel, "scan", {"BM": c["past_bm"], "AT_LEAST_ONE": False, "BLOCK": 1024},
             4, 1),
            ("fill_work", S._fill_work_kernel, "fill", {"BM": c["past_bm"], "BLOCK": 256}, 4, 1),
            ("delta", S._delta_kernel, "delta", {"D": D, "BD": D, "H": H, "BM": 64}, 4, 3),
            ("dkdv", S._bwd_dkdv_kernel, "dkdv", {**dot, "H": H, "K1": K1, "SPLIT": int(c["dkdv_split"]),
                                                  "STAGGER": bool(c["dq_atomic"]),
                                                  "DQ_ATOMIC": bool(c["dq_atomic"]), **tiles["dkdv"]},
             c["dkdv_warps"], c["dkdv_stages"]),
            ("dq_past", S._bwd_dq_past_kernel, "dqp", {**dot, "K1": K1, **tiles["dqp"]}, c["dqp_warps"],
             c["dqp_stages"]),
            ("dq_own", S._bwd_dq_own_kernel, "dq", {**dot, "H": H, "K1": K1, **tiles["dq"]}, c["dq_warps"],
             c["dq_stages"]),
        ]
        from rwkvx_kernels.sparse_attention import gluon_dkdv as G

        if G.triton_unsupported_reason() is None and dtype != "float32" and c["dkdv_impl"] != "triton":
            consts = {"H": H, "K1": K1, "D": D, "BM": G.BM, "STAGES": G.STAGES, "IDX64": False}
            kernels.append(("dkdv_gluon", G._dkdv_gluon_kernel, "dkdv_impl",
                            {**consts, "BN": G.BN, "num_warps": G.WARPS, "FUSE_DQ": False}, G.WARPS, 1))
            if c["dq_in_dkdv"]:
                kernels.append(("dkdv_gluon with dQ", G._dkdv_gluon_kernel, "dq_in_dkdv",
                                {**consts, "BN": G.FUSED_BN, "num_warps": G.FUSED_WARPS, "FUSE_DQ": True},
                                G.FUSED_WARPS, 1))
        kernels.append(("gather_rows", G._gather_rows_kernel, "gather", {"H": H, "K1": K1, "BM": G.BM, "POS": True},
                        4, 1))
        kernels.append(("dq_sum", G._dq_sum_kernel, "dq_sum", {"K1": K1, "D": D, "BM": 64}, 4, 1))
        for name, fn, prefix, consts, warps, stages in kernels:
            launch = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith(prefix + "_"))
            compiler.build(fn, {k: v for k, v in types.items() if k not in consts}, consts, warps,
                           f"{tag}{name} {launch}", stages, c.get(prefix + "_maxnreg", 0))
    compiler.finish()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="T:H:chunk:topk (B=1, D=64, bf16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", nargs="*", type=json.loads, default=[{}],
                   help="JSON launch-parameter overrides for ours, one timed row each")
    p.add_argument("--dense-max-T", type=int, default=262144, help="longest T for dense SDPA")
    p.add_argument("--cudnn-max-T", type=int, default=65536,
                   help="longest T for dense SDPA through the cuDNN backend (a second dense peer)")
    p.add_argument("--flex-T", nargs="*", type=int, default=[65536], help="T values at which to run FlexAttention")
    p.add_argument("--ref-max-T", type=int, default=65536, help="longest T for the float64 reference")
    p.add_argument("--ref-heads", type=int, default=1)
    p.add_argument("--host-ahead-ms", type=float, default=0.0,
                   help="also time fwd+bwd with the GPU kept busy this long first (a sleep kernel) while the host "
                        "issues the call, as in training where the host runs ahead: column 'ahead ms'")
    p.add_argument("--steady", action="store_true",
                   help="also time fwd+bwd with the calls back to back, the GPU never idle: column 'steady ms'")
    p.add_argument("--profile-T", nargs="*", type=int, default=[],
                   help="T values at which to print per-kernel times (of each config)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="add this (norm) along one direction to q and to chunk 0's keys: every query picks chunk 0")
    p.add_argument("--decode", nargs="*", type=int, default=[4096, 1048576], help="decode context lengths")
    p.add_argument("--decode-shape", default="16:2048:3", help="H:chunk:topk for decode")
    p.add_argument("--decode-steps", type=int, default=200)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU: compile every kernel for sm_90 with each --configs entry, print registers/spills")
    args = p.parse_args(argv)
    if args.compile_only:
        compile_only(args.configs, dtype=args.dtype)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_sparse_attention needs CUDA")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"device: {name}  torch {torch.__version__}", flush=True)
    try:
        import triton

        print(f"triton {triton.__version__}", flush=True)
    except Exception:  # noqa: BLE001
        pass

    table = []
    dense_est = {}
    for text in args.shapes:
        T, H, cs, topk = parse_shape(text)
        shape = f"T={T} H={H} cs={cs} k={topk}"
        print(f"== {shape}", flush=True)
        t0 = time.time()
        rows, density = bench_shape(T, H, cs, topk, args, dense_est)
        for row in rows:
            row["shape"] = shape
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "shape"},
                  flush=True)
        print(f"   flex block density {fmt(density, '.3f')}  ({time.time() - t0:.0f} s)", flush=True)
        table.extend(rows)

    decode_rows = []
    if not args.no_decode:
        H, cs, topk = (int(x) for x in args.decode_shape.split(":"))
        for ctx in args.decode:
            try:
                ms, mem = bench_decode(ctx, H, cs, topk, args.decode_steps, 20)
                decode_rows.append((ctx, ms, mem))
                print(f"decode ctx={ctx}: {ms:.3f} ms/token, KV cache {mem:.2f} GiB", flush=True)
            except Exception as e:  # noqa: BLE001
                decode_rows.append((ctx, None, None))
                print(f"decode ctx={ctx}: {'OOM' if is_oom(e) else repr(e)}", flush=True)

    print("\n" + "=" * 100)
    ahead = args.host_ahead_ms > 0
    print(f"{'shape':30s} {'method':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'x sdpa':>7s} {'x flex':>7s} "
          f"{'peak GiB':>9s} {'err':>9s}" + (f" {'ahead ms':>9s} {'x sdpa':>7s}" if ahead else "")
          + (f" {'steady ms':>9s} {'x sdpa':>7s}" if args.steady else "") + "  note")
    by_shape = {}
    for row in table:
        by_shape.setdefault(row["shape"], []).append(row)
    for shape, rows in by_shape.items():
        sdpa = next((r for r in rows if r["method"] == "sdpa"), {})
        flex = next((r for r in rows if r["method"] == "flex"), {})
        cudnn = next((r for r in rows if r["method"] == "sdpa_cudnn"), {})
        sdpa_ms = sdpa.get("fwdbwd", sdpa.get("fwdbwd_est"))
        for r in rows:
            ms = r.get("fwdbwd")
            x_sdpa = sdpa_ms / ms if ms and sdpa_ms and r["method"] != "sdpa" else None
            x_flex = flex["fwdbwd"] / ms if ms and flex.get("fwdbwd") and r["method"] != "flex" else None
            note = r.get("error", "") or (json.dumps(r["config"]) if r.get("config") else "")
            if r["method"] != "sdpa" and x_sdpa and "fwdbwd" not in sdpa:
                note = (note + " x sdpa vs estimate").strip()
            if r["method"].startswith("ours") and ms and cudnn.get("fwdbwd"):
                note = (note + f" {cudnn['fwdbwd'] / ms:.2f}x sdpa_cudnn").strip()
                if r.get("ahead") and cudnn.get("ahead"):
                    note += f" ({cudnn['ahead'] / r['ahead']:.2f}x with the host ahead)"
                if r.get("steady") and cudnn.get("steady"):
                    note += f" ({cudnn['steady'] / r['steady']:.2f}x steady)"
            cols = ""
            if ahead:
                x_ahead = sdpa["ahead"] / r["ahead"] if r.get("ahead") and sdpa.get("ahead") and r is not sdpa else None
                cols = f" {fmt(r.get('ahead')):>9s} {fmt(x_ahead, '.1f'):>7s}"
            if args.steady:
                x_steady = (sdpa["steady"] / r["steady"] if r.get("steady") and sdpa.get("steady") and r is not sdpa
                            else None)
                cols += f" {fmt(r.get('steady')):>9s} {fmt(x_steady, '.1f'):>7s}"
            print(f"{shape:30s} {r['method']:10s} {fmt(r.get('fwd')):>9s} {fmt(ms):>11s} {fmt(x_sdpa, '.1f'):>7s} "
                  f"{fmt(x_flex, '.2f'):>7s} {fmt(r.get('peak')):>9s} {fmt(r.get('err'), '.1e'):>9s}{cols}  {note}")
    if decode_rows:
        base = decode_rows[0][1]
        for ctx, ms, mem in decode_rows:
            ratio = ms / base if ms and base else None
            print(f"decode ctx={ctx:<9d} {fmt(ms, '.3f')} ms/token  ({fmt(ratio, '.2f')}x of ctx={decode_rows[0][0]}), "
                  f"KV cache {fmt(mem)} GiB")


if __name__ == "__main__":
    main()
