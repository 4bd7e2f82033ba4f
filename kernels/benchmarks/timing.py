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


def steady_time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median time of `fn()` in milliseconds with the calls issued back to back (no sync between them).

    After the first call the GPU never idles and the host issues each call while the GPU runs the one
    before, as in a training loop (and as `triton.testing.do_bench` times, without its cache flush): the
    time is the GPU's alone, under the card's sustained clocks, with no sleep kernel in between."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)
