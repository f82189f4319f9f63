"""The one timing helper the benchmark scripts share."""
from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)
