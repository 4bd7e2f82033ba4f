"""GPU timing shared by the benchmark scripts."""

import statistics

import torch


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds, measured with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
