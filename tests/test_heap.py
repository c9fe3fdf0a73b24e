"""HeapTrimmer: returns freed heap pages to the OS at most every `every_s` seconds."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from embgeom._heap import HeapTrimmer, _malloc_trim


def test_trims_only_when_due():
    never = HeapTrimmer(every_s=1e9)
    for _ in range(5):
        never()
    assert never.trims == 0
    never(force=True)
    assert never.trims == (1 if _malloc_trim() else 0)
    always = HeapTrimmer(every_s=0.0)
    always()
    always()
    assert always.trims == (2 if _malloc_trim() else 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_returns_freed_heap_pages():
    """64 MiB of small blocks (heap, below the mmap threshold), freed except the last
    one (which pins the heap's top): they stay resident until trimmed."""
    if not _malloc_trim():
        pytest.skip("no malloc_trim (not glibc)")

    def rss_mib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024

    blocks = [np.ones(4096) for _ in range(2048)]  # 32 KiB each, written: resident
    last = blocks[-1]
    del blocks
    before = rss_mib()
    HeapTrimmer(every_s=0.0)()
    after = rss_mib()
    assert before - after > 32, (before, after)
    assert last.sum() == 4096
