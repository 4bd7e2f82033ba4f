"""GPU timing shared by the benchmark scripts."""

import statistics

import torch

_SLEEP_CYCLES_PER_MS: dict = {}


def _sleep_cycles_per_ms() -> float:
    """`torch.cuda._sleep` cycles per millisecond on the current device (measured once)."""
    dev = torch.cuda.current_device()
    if dev not in _SLEEP_CYCLES_PER_MS:
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        _SLEEP_CYCLES_PER_MS[dev] = cycles / start.elapsed_time(end)
    return _SLEEP_CYCLES_PER_MS[dev]


def cuda_time_ms(fn, iters: int, warmup: int = 3, host_ahead_ms: float = 0.0) -> float:
    """Median time of `fn()` in milliseconds, measured with CUDA events after `warmup` calls.

    Each call starts from an idle GPU, so the time includes the host's work up to the first kernel launch.
    With `host_ahead_ms` > 0 the GPU is first kept busy that long (a sleep kernel before the start event)
    while the host issues the call, as in a training step where the host runs ahead of the GPU: the time
    is then the GPU's alone (plus any point where the host falls behind after the sleep)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    sleep = int(host_ahead_ms * _sleep_cycles_per_ms()) if host_ahead_ms > 0 else 0
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep:
            torch.cuda._sleep(sleep)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
