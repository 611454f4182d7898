"""Which implementation runs each kernel: the pure-torch twin or the GPU library.

Every kernel has a torch implementation that runs anywhere and, on CUDA, an optional GPU implementation from
mamba-ssm (Triton SSD scan and gated RMSNorm, compiled selective scan) or causal-conv1d (compiled depthwise
convolution). The GPU libraries are imported here lazily, only when a CUDA device asks for them, so the CPU path
never pays for (or breaks on) their import.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from typing import Callable, Mapping

import torch

log = logging.getLogger(__name__)

KERNELS = ("ssd_scan", "selective_scan", "causal_conv1d", "rmsnorm_gated")
BACKEND_NAMES = ("auto", "torch", "triton", "cuda")

# The name recorded for a kernel's GPU path says what actually runs: Triton kernels for the SSD scan and the
# gated norm, compiled CUDA extensions for the selective scan and the convolution. Users may request either
# "triton" or "cuda"; both mean "the GPU path".
GPU_BACKEND = {
    "ssd_scan": "triton",
    "selective_scan": "cuda",
    "causal_conv1d": "cuda",
    "rmsnorm_gated": "triton",
}

# (module, attribute) of each kernel's GPU entry point.
_GPU_ENTRY = {
    "ssd_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "rmsnorm_gated": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
}

_INSTALL_HINT = "install the GPU extra with `pip install .[gpu]` (mamba-ssm, causal-conv1d, triton)"


class KernelBackendError(ValueError):
    """A kernel backend was requested that does not exist or cannot run here."""


def _stub_selective_scan_cuda() -> types.ModuleType:
    """A placeholder for mamba-ssm's compiled extension.

    mamba-ssm wheels built with MAMBA_SKIP_CUDA_BUILD ship the Triton kernels but not `selective_scan_cuda`, and
    `import mamba_ssm` imports that extension unconditionally. The stub lets the Triton half import; any use of
    the missing compiled scan fails loudly instead of silently.
    """
    stub = types.ModuleType("selective_scan_cuda")
    stub.__kernel_stub__ = True

    def __getattr__(name: str):
        raise AttributeError(
            f"selective_scan_cuda.{name}: mamba-ssm was installed without its compiled selective scan"
        )

    stub.__getattr__ = __getattr__  # module-level __getattr__ (PEP 562)
    return stub


@functools.lru_cache(maxsize=None)
def _mamba_ssm_problem() -> str | None:
    """Import mamba-ssm once; return None when it imports, else why not."""
    stub_installed = False
    if "selective_scan_cuda" not in sys.modules:
        try:
            importlib.import_module("selective_scan_cuda")
        except ImportError:
            sys.modules["selective_scan_cuda"] = _stub_selective_scan_cuda()
            stub_installed = True
    try:
        importlib.import_module("mamba_ssm")
    except Exception as exc:  # ImportError, or a CUDA/Triton error raised while importing
        if stub_installed:
            del sys.modules["selective_scan_cuda"]  # leave no trace of a failed attempt
        return f"mamba-ssm could not be imported ({type(exc).__name__}: {exc})"
    return None


def has_compiled_selective_scan() -> bool:
    """Whether the real compiled Mamba1 selective scan extension is present (not our stub)."""
    if _mamba_ssm_problem() is not None:
        return False
    # The real extension exposes `fwd`; the stub raises AttributeError, which hasattr turns into False.
    return hasattr(sys.modules.get("selective_scan_cuda"), "fwd")


@functools.lru_cache(maxsize=None)
def gpu_backend_problem(kernel: str) -> str | None:
    """None when the kernel's GPU implementation can be loaded, else one sentence saying why not."""
    module_name, attr = _GPU_ENTRY[kernel]
    if module_name.startswith("mamba_ssm"):
        problem = _mamba_ssm_problem()
        if problem is not None:
            return problem
        if kernel == "selective_scan" and not has_compiled_selective_scan():
            return "mamba-ssm was built without its compiled selective scan extension (selective_scan_cuda)"
    try:
        getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        return f"{module_name}.{attr} could not be imported ({type(exc).__name__}: {exc})"
    return None


def gpu_kernel(kernel: str) -> Callable:
    """The GPU entry point of a kernel; call only after resolve_backend chose the GPU backend."""
    problem = gpu_backend_problem(kernel)
    if problem is not None:
        raise KernelBackendError(f"the GPU backend of {kernel} is unavailable: {problem}; {_INSTALL_HINT}.")
    module_name, attr = _GPU_ENTRY[kernel]
    return getattr(importlib.import_module(module_name), attr)


@functools.lru_cache(maxsize=None)
def _log_fallback(kernel: str) -> None:
    """Say once per kernel (not once per call) why "auto" did not pick the GPU path on a CUDA device."""
    log.warning("%s uses the torch backend on CUDA: %s", kernel, gpu_backend_problem(kernel))


def resolve_backend(kernel: str, requested: str, device: torch.device | str) -> str:
    """Turn a requested backend into the one that will run: "torch" or the kernel's GPU backend name.

    "auto" picks the GPU path on a CUDA device when its library imports and the torch twin otherwise; an
    explicit "triton"/"cuda" request that cannot be honoured is an error, never a silent fallback.
    """
    if kernel not in KERNELS:
        raise KernelBackendError(f"unknown kernel {kernel!r}; known kernels are {', '.join(KERNELS)}.")
    name = str(requested).lower()
    if name not in BACKEND_NAMES:
        raise KernelBackendError(
            f"unknown kernel backend {requested!r} for {kernel}; choose one of {', '.join(BACKEND_NAMES)}."
        )
    if name == "torch":
        return "torch"
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda and gpu_backend_problem(kernel) is None:
            return GPU_BACKEND[kernel]
        if on_cuda:
            _log_fallback(kernel)
        return "torch"
    if not on_cuda:
        raise KernelBackendError(
            f"backend {requested!r} for {kernel} needs a CUDA device but the inputs are on {device}; "
            "use 'torch' or 'auto' there."
        )
    problem = gpu_backend_problem(kernel)
    if problem is not None:
        raise KernelBackendError(f"backend {requested!r} for {kernel} is unavailable: {problem}; {_INSTALL_HINT}.")
    return GPU_BACKEND[kernel]


def describe_backends(
    device: torch.device | str, requested: str | Mapping[str, str] = "auto"
) -> dict[str, str]:
    """The backend each kernel will use on `device`, for logging and for recording with a run."""
    if isinstance(requested, str):
        requested = {kernel: requested for kernel in KERNELS}
    return {kernel: resolve_backend(kernel, requested.get(kernel, "auto"), device) for kernel in KERNELS}
