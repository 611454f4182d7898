"""Keep freed memory in the process on CPU, so training steps stop page-faulting their tensors in.

A training step on CPU allocates and frees the same large tensors (scores over every item, attention
maps, scan states: tens to hundreds of MB) every batch. glibc's malloc serves blocks above its mmap
threshold with a fresh mmap and returns them with munmap, and trims the top of the heap when much is
free, so every step touches new pages and pays a page fault per 4 KiB, in the kernel, single-threaded.
Turning both off (M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD huge: the heap is
never given back) lets the next step reuse the same pages: 1.2-1.5x faster epochs on amazon-beauty
(scripts/bench_training_cost.py), at the price of a resident size that stays at its peak (about
+1-2 GB per training process at batch 2048). Nothing numerical changes.

Only glibc has mallopt; elsewhere (macOS, musl) this is a no-op and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> str:
    """Configure glibc malloc once per process; returns what was done (recorded as a run tag)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = (
            libc.mallopt(_M_MMAP_MAX, 0)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            and libc.mallopt(_M_TOP_PAD, 256 << 20)
        )
    except (OSError, AttributeError):
        return "system default (mallopt unavailable)"
    return "glibc: no mmap, no trim" if applied else "system default (mallopt refused)"
