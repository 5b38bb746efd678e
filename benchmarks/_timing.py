"""The one timing rule of the benchmarks: the median wall time of a call, after untimed warm-up calls."""

import statistics
import time


def median_seconds(fn, repeats, *, warmup=0, calls=1, sync=None):
    """Median over `repeats` rounds of the seconds one call of `fn` takes, after `warmup` untimed calls.

    With `calls` > 1 a round queues that many calls and waits once (`sync`, e.g. `torch.cuda.synchronize`), so
    asynchronous back ends are timed with their launch overhead amortised as in a stream of calls.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
