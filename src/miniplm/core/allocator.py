"""Keep freed memory in the process instead of returning it to the kernel after every batch.

glibc serves allocations above its mmap threshold (adaptive, at most 32 MiB) with fresh mmap'd pages and
trims the heap top back to the kernel on free; a forward pass allocates and frees tensors of tens of MB
every batch, so the kernel zeroes and maps the same memory again and again. On the 2-core development
machine that was a third of the CPU time of a demo run (`time`: user 16 min, sys 9 min). Raising the
thresholds once per process keeps that memory reused: scoring went from 727 to 836 tok/s in
`bench/score.py` (SmolLM2, 24 instances of 512 tokens). Only the CLI and the benchmarks call this: it
changes process-wide allocator settings, which a library imported by someone else should not do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(_M_TOP_PAD, 256 << 20))
