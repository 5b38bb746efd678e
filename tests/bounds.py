"""Running a reader on a hostile input under a time limit and a memory cap, for the property-based tests."""

import resource
import signal
import sys
import time
from contextlib import contextmanager

import pytest


class OverTime(Exception):
    pass


def _address_space():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextmanager
def within(seconds=5, megabytes=512):
    """Fail the test if the body takes longer than `seconds` or allocates more than `megabytes` beyond what the
    process maps now. The memory cap is an address-space limit (Linux only: macOS does not enforce RLIMIT_AS), so
    an allocation past it fails with MemoryError instead of exhausting the machine."""
    capped = sys.platform.startswith("linux")
    if capped:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _address_space() + megabytes * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def over_time(signum, frame):
        raise OverTime(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, over_time)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield
    except MemoryError:
        pytest.fail(f"allocated more than {megabytes} MB")
    except OverTime:
        pytest.fail(f"ran for more than {seconds} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.perf_counter() - start < seconds
