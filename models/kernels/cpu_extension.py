"""Compiled CPU kernels: C++ sources next to this file, built on first use with torch's extension loader.

A kernel whose torch twin is bound by per-step Python and memory traffic (the Mamba1 selective scan: a dozen
whole-state passes per time step; the SSD scan: chunk-by-chunk decay and score tensors) gets a C++ twin that
keeps one sequence's state in registers or the L1 cache; the depthwise
causal convolution gets one because oneDNN's backward pass is slow at the models' sizes, TiSASRec's per-pair
time terms one that redraws their dropout masks instead of materialising them, every model's dropout one that
does the same in one pass over memory, the gated RMSNorm one that keeps a group of features in cache instead
of seven whole-tensor passes, and the training loss one for the softmax of each block of scores (three passes
over a row instead of seven). Each is built once
per machine into torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions; about a
minute on a 2-core machine) and loaded from there afterwards; processes that start together wait on the build's
lock (`build_lock`) instead of building twice.

The build needs a C++ compiler (g++, or $CXX) and ninja (a project dependency). Where either is missing or the build fails, the kernel
reports why (`cpu_extension_problem`) and "auto" keeps the torch twin.

The module name carries the hash of the source, the flags and the torch version, and the instruction set it was
compiled for, so a changed source, another torch, or a cache shared between machines with different CPUs never
loads a stale or foreign binary.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

#: kernel -> its C++ source, in this folder
SOURCES = {
    "selective_scan": "selective_scan_cpu.cpp",
    "ssd_scan": "ssd_scan_cpu.cpp",
    "causal_conv1d": "causal_conv_cpu.cpp",
    "rmsnorm_gated": "rmsnorm_gated_cpu.cpp",
    "time_pairs": "time_pairs_cpu.cpp",
    "dropout": "dropout_cpu.cpp",
    "cross_entropy": "cross_entropy_cpu.cpp",
}

#: kernels compiled into another kernel's module (kernel -> that kernel): the FFNs' activation fused with their
#: dropout lives in the dropout's source, which both share one build
SAME_MODULE = {"activation_dropout": "dropout"}

#: the header every source includes: part of each module's hash, so a change to it rebuilds every kernel
_COMMON_HEADER = "cpu_common.h"

# Vector instructions per torch CPU capability. -ffast-math lets GCC call glibc's vectorised exp (libmvec) in
# the loops over the state axis. It also lets the compiler assume no NaN or infinity: the kernels must never test
# for them (no isnan, clamps or max), and a NaN input still propagates through their arithmetic. Never add it to
# the link flags: linking crtfastmath would set flush-to-zero for the whole process.
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def module_name(kernel: str) -> str:
    """harness_<kernel>_<capability>_<hash of source, shared header, flags and torch version>: one cache entry
    per source version, instruction set and torch ABI."""
    folder = Path(__file__).parent
    source = (folder / SOURCES[kernel]).read_bytes() + (folder / _COMMON_HEADER).read_bytes()
    digest = hashlib.sha256(source + " ".join([*_FLAGS, torch.__version__]).encode()).hexdigest()[:12]
    return f"harness_{kernel}_{_capability().lower()}_{digest}"


def _toolchain_problem() -> str | None:
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r}; set CXX)"
    if shutil.which("ninja") is None:
        # The project's own ninja (a dependency) sits beside this interpreter; torch's loader finds ninja on PATH
        # only, which lacks that folder when a virtual environment's python runs without activation.
        scripts = str(Path(sys.executable).parent)
        if shutil.which("ninja", path=scripts) is None:
            return "ninja is not installed (pip install ninja, or apt install ninja-build)"
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return None


@contextlib.contextmanager
def build_lock(build_dir: str | Path) -> Iterator[None]:
    """Hold this build directory for one process at a time, and clear a lock file left by a killed build.

    torch's loader marks a build with a `lock` file and makes every other process wait until it disappears,
    with no timeout: a process killed while building (a stopped study worker, say) leaves it behind and every
    later load hangs. Loads here take an flock first, which the kernel releases when its holder dies, so under
    it no live build can own a `lock` file and one that exists is dead.
    """
    with open(Path(build_dir) / "harness.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        dead = Path(build_dir) / "lock"
        if dead.exists():
            log.warning("removing the build lock %s left by a killed build", dead)
            dead.unlink(missing_ok=True)
        yield  # closing the file releases the flock


@functools.cache
def _load(kernel: str) -> ModuleType | str:
    """The built extension module, or one sentence saying why it could not be built or loaded."""
    problem = _toolchain_problem()
    if problem is not None:
        return problem
    from torch.utils import cpp_extension

    flags = _FLAGS + _ARCH_FLAGS.get(_capability(), [])
    name = module_name(kernel)
    try:
        with build_lock(cpp_extension._get_build_directory(name, verbose=False)):
            return cpp_extension.load(
                name=name,
                sources=[str(Path(__file__).with_name(SOURCES[kernel]))],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as exc:  # a compiler or linker error, or a broken cache entry
        log.debug("building %s failed", name, exc_info=True)  # the compiler's full output
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"building the C++ {kernel} failed ({first_line}; run with debug logging for the compiler output)"


def has_cpu_twin(kernel: str) -> bool:
    """Whether `kernel` has a C++ source here (its own or, per SAME_MODULE, another kernel's)."""
    return SAME_MODULE.get(kernel, kernel) in SOURCES


def cpu_extension_problem(kernel: str) -> str | None:
    """None when `kernel` has a compiled CPU twin that loads here, else why not (builds it on first call)."""
    if not has_cpu_twin(kernel):
        return f"{kernel} has no compiled CPU kernel"
    loaded = _load(SAME_MODULE.get(kernel, kernel))
    return loaded if isinstance(loaded, str) else None


def cpu_extension(kernel: str) -> ModuleType:
    """The compiled module of `kernel`; call only after cpu_extension_problem(kernel) returned None."""
    loaded = _load(SAME_MODULE.get(kernel, kernel))
    if isinstance(loaded, str):
        raise RuntimeError(loaded)
    return loaded


def unit_channel_stride(t):
    """t with unit stride along its last (channel) axis, the layout the C++ kernels read: itself when it has it
    (a copy only when it has not)."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def time_major_view(t):
    """[batch, channels, seqlen] as the C++ kernels read it, a [batch, seqlen, channels] view with unit channel
    stride: the models' sequence tensors are transposed views of that layout, so no copy."""
    return unit_channel_stride(t.transpose(1, 2))
