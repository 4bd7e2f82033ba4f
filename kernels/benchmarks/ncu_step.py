"""One fwd+bwd of ours between cudaProfilerStart/Stop, for Nsight Compute (CUDA only).

The device machines have `ncu` in /usr/local/cuda/bin. Profile only the marked step (after warm-up
and autotuning), e.g. the sparse backward kernels at 64K tokens or the wkv7 chunk kernels:

    ncu --target-processes all --profile-from-start off -k regex:"dkdv|dq_past" -c 2 \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section SourceCounters \\
        --print-details all python3 -m rwkvx_kernels.benchmarks.ncu_step sparse --T 65536
    ncu ... -k regex:"_prep|_fwd_state|_fwd_out|_bwd_state|_bwd_grads" -c 7 ... ncu_step wkv7 --B 8 --T 4096 --H 64

(ncu runs the SM at its base clock, so its durations are longer than the benchmarks'.)
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["sparse", "wkv7"])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=65536)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--chunk", type=int, default=2048, help="sparse: chunk size")
    p.add_argument("--topk", type=int, default=3, help="sparse: chunks per query, own included")
    p.add_argument("--config", type=json.loads, default=None, help="kernel options (JSON), as `config=`")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.op == "sparse":
        from rwkvx_kernels.sparse_attention.triton_topk import sparse_attention_triton

        xs = [torch.randn(args.B, args.T, args.H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]

        def fwd():
            return sparse_attention_triton(*xs, args.chunk, args.topk, config=args.config)
    else:
        from rwkvx_kernels.benchmarks.bench_wkv7 import make_inputs
        from rwkvx_kernels.wkv7.chunk import chunk_wkv7

        xs = [x.requires_grad_() for x in make_inputs(args.B, args.T, args.H)]

        def fwd():
            return chunk_wkv7(*xs, config=args.config)[0]

    dy = torch.randn_like(xs[0])
    for _ in range(3):  # compile and autotune outside the profiled range
        torch.autograd.grad(fwd(), xs, dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    torch.autograd.grad(fwd(), xs, dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled one fwd+bwd")


if __name__ == "__main__":
    main()
