"""Benchmark the RWKV-7 recurrence kernels against fla's `chunk_rwkv7` (CUDA only).

    python -m rwkvx_kernels.benchmarks.bench_wkv7                 # the three target shapes
    python -m rwkvx_kernels.benchmarks.bench_wkv7 --sweep         # also try launch configs of ours
    python -m rwkvx_kernels.benchmarks.bench_wkv7 --shapes 2x1024x4 --no-recurrent
    python -m rwkvx_kernels.benchmarks.bench_wkv7 --compile-only  # CPU only: compile all kernels for sm_90
                                                                  # (with registers and spills per kernel)

For every shape (B x T x H, head size 64, bf16 inputs drawn like the model's): fwd and fwd+bwd
time (CUDA events, warmup, median of --iters) of ours (`chunk`, and the sequential
`fused_recurrent` unless --no-recurrent) and of fla's `chunk_rwkv7` on identical inputs in the same
process, plus the relative error (norm of difference / norm of reference) of y and of every input
gradient against a float64 reference computed on a slice (first sequence, first --ref-T tokens,
first --ref-H heads), so the reference stays cheap.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math

import torch
from rwkvx_kernels.benchmarks.timing import cuda_time_ms

SHAPES = [(8, 4096, 64), (1, 65536, 16), (16, 4096, 12)]
N = 64


def make_inputs(B, T, H, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rn():
        return torch.randn(B, T, H, N, generator=g, device=device, dtype=torch.float32)

    r, k, v = rn() * 0.5, rn() * 0.5, rn() * 0.5
    w = -math.exp(-0.5) * torch.sigmoid(rn())
    kk = torch.nn.functional.normalize(rn(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rn())
    return [x.to(dtype).contiguous() for x in (r, w, k, v, a, b)]


def fla_fn(lower_bound=None):
    """fla's chunk_rwkv7 wrapped to our call convention (w = log decay), or None with the reason.

    `lower_bound` (fla >= 0.6: the caller promises w >= lower_bound) lets fla pick its chunk-64
    tensor-core scheme; fla's own RWKV-7 layer does not pass it, so the default row is fla as its
    models run it."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # noqa: BLE001
        return None, f"fla not importable: {e!r}"
    params = inspect.signature(chunk_rwkv7).parameters
    if lower_bound is not None and "lower_bound" not in params:
        return None, "this fla's chunk_rwkv7 has no lower_bound argument"

    def call(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False):
        kw = dict(r=r, k=k, v=v, a=a, b=b, scale=1.0, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        if "log_w" in params:  # versions where `w` is the raw decay and log_w = -exp(w)
            kw["log_w"] = w
        else:  # current fla: `w` is the log decay
            kw["w"] = w
        if "use_log_w" in params:
            kw["use_log_w"] = True
        if lower_bound is not None:
            kw["lower_bound"] = lower_bound
        out = chunk_rwkv7(**kw)
        return out[0], out[1]

    return call, None


def ours(backend, config=None):
    """Our kernel through the `wkv7` entry point, with `config` (chunk kernel options) passed per call."""
    from rwkvx_kernels.wkv7 import wkv7

    def call(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, output_final_state=False):
        return wkv7(r, w, k, v, a, b, initial_state=initial_state, cu_seqlens=cu_seqlens,
                    output_final_state=output_final_state, backend=backend, config=config or None)

    return call


def bench_one(fn, xs, iters):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    dy = torch.randn_like(xs[3])

    def fwd():
        with torch.no_grad():
            fn(*leaves)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        y, _ = fn(*leaves)
        y.backward(dy)

    return cuda_time_ms(fwd, iters), cuda_time_ms(fwd_bwd, iters)


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def errors(fn, xs_slice, ref):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs_slice]
    y, _ = fn(*leaves)
    y.backward(ref["dy"].to(y.dtype))
    errs = [rel(y, ref["y"])] + [rel(x.grad, g) for x, g in zip(leaves, ref["grads"])]
    return max(errs[1:]), errs[0]


def reference(xs_slice, seed=1):
    from rwkvx_kernels.wkv7 import wkv7_naive

    leaves = [x.detach().double().requires_grad_(True) for x in xs_slice]
    y, _ = wkv7_naive(*leaves)
    g = torch.Generator(device=y.device).manual_seed(seed)
    # dy rounded to the input dtype, so the kernels under test see exactly this dy
    dy = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float64).to(xs_slice[0].dtype).double()
    y.backward(dy)
    return {"y": y.detach(), "dy": dy, "grads": [x.grad for x in leaves]}


def sweep(xs, iters):
    """Time one option at a time around the defaults (each passed per call)."""
    grid = {
        "fuse_out": [False, True],
        "state_dtype": ["fp32", "bf16"],
        "group_chunks": [0, 16, 64, 256, 1024],
        "state_bv": [16, 32, 64],
        "state_warps": [2, 4, 8],
        "chunk_warps": [2, 4, 8],
        "grad_warps": [2, 4, 8],
        "grad_kernels": [1, 3],
        "state_step": ["direct", "affine"],
        "dot_precision": ["tf32", "ieee", "bf16"],
        "exact_precision": ["ieee", "tf32x3"],
    }
    print("    sweep (one option at a time around the defaults):")
    for key, vals in grid.items():
        for val in vals:
            try:
                f, fb = bench_one(ours("chunk", {key: val}), xs, iters)
                print(f"      {key}={val!s:5}  fwd {f:8.3f} ms   fwd+bwd {fb:8.3f} ms")
            except Exception as e:  # noqa: BLE001
                print(f"      {key}={val!s:5}  failed: {e!r}")


def profile_kernels(fn, xs, iters=3):
    """Print the CUDA time per kernel (ms per fwd+bwd call) of `fn`, largest first."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    dy = torch.randn_like(xs[3])

    def step():
        for x in leaves:
            x.grad = None
        y, _ = fn(*leaves)
        y.backward(dy)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t / 1000 / iters, e.count // iters, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"    kernels (ms per fwd+bwd, sum {total:.2f}):")
    for t, n, key in rows[:12]:
        print(f"      {t:8.3f} ms  x{n:<3} {key[:70]}")


def compile_only(arch=90):
    """Compile every kernel variant for sm_<arch> without a GPU (catches what the CPU interpreter can't)."""
    from rwkvx_kernels.benchmarks.resources import Compiler
    from rwkvx_kernels.wkv7 import chunk as C
    from rwkvx_kernels.wkv7 import fused_recurrent as F

    compiler = Compiler(arch)
    build = compiler.build
    f32, H, N = "*fp32", 16, 64
    cfg = C.CONFIG  # the default launch parameters, for bf16 inputs
    cw, sw, gw, bv = cfg["chunk_warps"], cfg["state_warps"], cfg["grad_warps"], cfg["state_bv"]
    ints = {"T": "i32", "NT": "i32", "NG": "i32", "GC": "i32", "NH": "i32", "PART": "i64"}
    for varlen in (False, True):
        vl = dict.fromkeys(["cu_seqlens", "chunk_indices", "chunk_offsets", "group_offsets"], "*i32" if varlen else None)
        vl["seg_offsets"] = "*i64" if varlen else None
        base = {**ints, **vl, "Wbuf": f32, "Qbuf": f32, "h0": f32, "ht": f32, "gstates": f32, "Xbuf": f32,
                "dht": f32, "dh0": f32, "gdstates": f32, "init": f32, "final": f32}
        for prec, exact in [("tf32", "tf32x3"), ("tf32", "ieee"), ("bf16", "tf32x3")]:
            c = dict(H=H, N=N, BT=16, LOG2_BT=4, IS_VARLEN=varlen, PREC=prec, EXACT=exact)
            build(C._prep_kernel, base, c, cw, f"prep {prec}/{exact} varlen={varlen}")
            build(C._bwd_grads_kernel, {**base, "states": "*bf16", "dstates": "*bf16"}, {**c, "BV": cfg["grad_bv"]}, gw,
                  f"bwd_grads {prec}/{exact} varlen={varlen}")
        for sd in ("fp32", "bf16"):
            t = {**base, "states": f"*{sd}", "dstates": f"*{sd}"}
            # (aug, grouped, fuse, store): store=False with fuse is a fused forward that keeps no states
            for aug, grouped, fuse, store in [(False, False, True, True), (False, False, False, True),
                                              (True, True, False, False), (False, True, True, True),
                                              (False, False, True, False)]:
                for affine in (False, True) if not fuse else (False,):
                    c = dict(H=H, N=N, BT=16, BV=bv, USE_H0=True, STORE_HT=not grouped, STORE_STATES=store,
                             FUSE_OUT=fuse, GROUPED=grouped, AUG=aug, IS_VARLEN=varlen, PREC="tf32", AFFINE=affine)
                    build(C._fwd_state_kernel, t, c, sw, f"fwd_state aug={aug} grouped={grouped} fuse={fuse} "
                          f"store={store} affine={affine} {sd} varlen={varlen}")
                    c = dict(H=H, N=N, BT=16, BV=bv, USE_DHT=True, STORE_DH0=not grouped, GROUPED=grouped, AUG=aug,
                             IS_VARLEN=varlen, PREC="tf32", AFFINE=affine)
                    build(C._bwd_state_kernel, t, c, sw,
                          f"bwd_state aug={aug} grouped={grouped} affine={affine} {sd} varlen={varlen}")
            c = dict(H=H, N=N, BT=16, IS_VARLEN=varlen, PREC="tf32")
            build(C._fwd_out_kernel, t, c, cw, f"fwd_out {sd} varlen={varlen}")
        for rev in (False, True):
            for exact in ("ieee", "tf32x3"):
                c = dict(H=H, N=N, BT=16, BV=cfg["scan_bv"], USE_INIT=True, STORE_FINAL=True, REVERSE=rev,
                         IS_VARLEN=varlen, EXACT=exact)
                build(C._scan_kernel, base, c, cfg["scan_warps"], f"scan reverse={rev} {exact} varlen={varlen}")
        # 64-token chunks (experimental), bf16 states, their own warp defaults; the three split gradient kernels
        # (also at 16-token chunks, with grad_kernels 3)
        t = {**base, "states": "*bf16", "dstates": "*bf16",
             **dict.fromkeys(["DW", "DQ", "DBH", "DKH", "DGP", "DGC", "UBUF"], f32)}
        w64 = {**cfg, **C.CHUNK64_WARPS}
        c = dict(H=H, N=N, BT=64, LOG2_BT=6, IS_VARLEN=varlen, PREC="tf32", EXACT="tf32x3")
        build(C._prep_kernel, t, c, w64["chunk_warps"], f"chunk64 prep varlen={varlen}")
        build(C._bwd_grads_wy_kernel, t, c, w64["grad_warps"], f"chunk64 bwd_grads_wy varlen={varlen}")
        c = dict(H=H, N=N, BT=64, IS_VARLEN=varlen, PREC="tf32")
        build(C._fwd_out_kernel, t, c, w64["chunk_warps"], f"chunk64 fwd_out varlen={varlen}")
        build(C._bwd_grads_u_kernel, t, c, w64["grad_warps"], f"chunk64 bwd_grads_u varlen={varlen}")
        build(C._bwd_grads_s_kernel, t, c, w64["grad_warps"], f"chunk64 bwd_grads_s varlen={varlen}")
        for aug, grouped, affine in [(False, False, False), (True, True, False), (False, True, False),
                                     (False, False, True), (True, True, True)]:
            tag = f"aug={aug} grouped={grouped} affine={affine} varlen={varlen}"
            c = dict(H=H, N=N, BT=64, BV=bv, USE_H0=True, STORE_HT=not grouped, STORE_STATES=not aug, FUSE_OUT=False,
                     GROUPED=grouped, AUG=aug, IS_VARLEN=varlen, PREC="tf32", AFFINE=affine)
            build(C._fwd_state_kernel, t, c, w64["state_warps"], f"chunk64 fwd_state {tag}")
            c = dict(H=H, N=N, BT=64, BV=bv, USE_DHT=True, STORE_DH0=not grouped, GROUPED=grouped, AUG=aug,
                     IS_VARLEN=varlen, PREC="tf32", AFFINE=affine)
            build(C._bwd_state_kernel, t, c, w64["state_warps"], f"chunk64 bwd_state {tag}")
        # grad_kernels 3 at 16-token chunks (the default warps)
        c = dict(H=H, N=N, BT=16, IS_VARLEN=varlen, PREC="tf32")
        build(C._bwd_grads_u_kernel, t, c, gw, f"chunk16 bwd_grads_u varlen={varlen}")
        build(C._bwd_grads_s_kernel, t, c, gw, f"chunk16 bwd_grads_s varlen={varlen}")
        build(C._bwd_grads_wy_kernel, t, {**c, "LOG2_BT": 4, "EXACT": "tf32x3"}, gw, f"chunk16 bwd_grads_wy varlen={varlen}")
        t = {**base, "ckpt": f32, "scratch": f32, **dict.fromkeys(["dr", "dw", "dk", "da", "db"], f32)}
        c = dict(H=H, N=N, BV=16, SEG=16, USE_H0=True, STORE_HT=True, IS_VARLEN=varlen)
        build(F._wkv7_fwd_kernel, t, c, 2, f"fused_recurrent fwd varlen={varlen}")
        c = dict(H=H, N=N, BV=16, SEG=16, USE_DHT=True, STORE_DH0=True, IS_VARLEN=varlen)
        build(F._wkv7_bwd_kernel, t, c, 4, f"fused_recurrent bwd varlen={varlen}")
    compiler.finish()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=None, help="BxTxH, e.g. 8x4096x64")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--ref-T", type=int, default=1024)
    p.add_argument("--ref-H", type=int, default=4)
    p.add_argument("--no-recurrent", action="store_true", help="skip the sequential kernel")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--profile", action="store_true", help="print our chunk kernel's per-kernel times")
    p.add_argument("--no-fla", action="store_true", help="skip fla (its first call autotunes for minutes)")
    p.add_argument("--fla-lower-bound", action="store_true",
                   help="also time fla told the model's decay floor (w >= -exp(-0.5)): its chunk-64 path")
    p.add_argument("--config", nargs="*", type=json.loads, default=[{}],
                   help="chunk kernel options (passed per call), one JSON object per variant, e.g. '{\"state_warps\": 2}'")
    p.add_argument("--compile-only", action="store_true", help="compile all kernels for sm_90, no GPU needed")
    args = p.parse_args(argv)
    if args.compile_only:
        compile_only()
    if not torch.cuda.is_available():
        raise SystemExit("bench_wkv7 needs a CUDA device")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES

    impls = {}  # fla first, so every later row can print its ratio as soon as it is measured
    for cfg in args.config:
        impls["chunk" + (json.dumps(cfg, separators=(",", ":")) if cfg else "")] = ours("chunk", cfg)
    if not args.no_recurrent:
        impls["fused_recurrent"] = ours("fused_recurrent")
    fla, why = (None, "--no-fla") if args.no_fla else fla_fn()
    if fla is None:
        print(f"[fla skipped: {why}]")
    else:
        impls = {"fla": fla, **impls}
        if args.fla_lower_bound:
            fla_lb, why = fla_fn(lower_bound=-math.exp(-0.5))
            if fla_lb is None:
                print(f"[fla_lower_bound skipped: {why}]")
            else:
                impls["fla_lower_bound"] = fla_lb
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001
        pass

    print(f"{'shape (BxTxH)':>16} {'impl':>16} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs fla':>7} "
          f"{'y err':>9} {'max grad err':>12}", flush=True)
    for B, T, H in shapes:
        xs = make_inputs(B, T, H)
        sl = [x[:1, : args.ref_T, : args.ref_H].contiguous() for x in xs]
        ref = reference(sl)
        fla_fb = None
        for name, fn in impls.items():
            try:
                f, fb = bench_one(fn, xs, args.iters)
                gerr, yerr = errors(fn, sl, ref)
            except Exception as e:  # noqa: BLE001
                print(f"{B}x{T}x{H:>3} {name:>16}  failed: {e!r}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()
            fla_fb = fb if name == "fla" else fla_fb
            ratio = f"{fla_fb / fb:6.2f}x" if fla_fb else "   n/a"
            print(f"{f'{B}x{T}x{H}':>16} {name:>16} {f:9.3f} {fb:11.3f} {ratio:>7} {yerr:9.2e} {gerr:12.2e}",
                  flush=True)
        if args.profile:
            for name, fn in impls.items():
                if name.startswith("chunk"):
                    print(f"  {name}:")
                    profile_kernels(fn, xs)
        if args.sweep:
            sweep(xs, args.iters)
        del xs
        torch.cuda.empty_cache()
    print("'vs fla' = fla fwd+bwd time / this fwd+bwd time (>1: faster than fla). Errors vs float64 on "
          f"[1, {args.ref_T}, {args.ref_H}, 64].")


if __name__ == "__main__":
    main()
