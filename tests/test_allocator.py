"""harness.allocator: glibc malloc told to keep freed memory (no mmap, no trim) once per process, and
said so; elsewhere a no-op that says so. Timing is measured by scripts/bench_training_cost.py, not here."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


def test_keep_freed_memory_reports_what_it_did():
    from harness.allocator import keep_freed_memory

    outcome = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert outcome == "glibc: no mmap, no trim"
    else:
        assert outcome.startswith("system default")
    assert keep_freed_memory() is outcome  # once per process


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_no_longer_come_from_mmap():
    """After the call a 64 MiB allocation comes from the heap, not a fresh mapping: the process's count of
    memory mappings does not grow while the block is alive (it does without the call)."""
    probe = (
        "import ctypes, sys\n"
        "from pathlib import Path\n"
        "if sys.argv[1] == 'keep':\n"
        "    from harness.allocator import keep_freed_memory; keep_freed_memory()\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
        "maps = lambda: len(Path('/proc/self/maps').read_text().splitlines())\n"
        "before = maps(); block = libc.malloc(64 << 20); after = maps(); libc.free(ctypes.c_void_p(block))\n"
        "print(after - before)\n"
    )
    grown = {
        mode: int(
            subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
        )
        for mode in ("default", "keep")
    }
    assert grown["default"] >= 1 and grown["keep"] == 0
