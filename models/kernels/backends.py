"""Which implementation runs each kernel: the pure-torch twin, a compiled CPU twin, or the GPU library.

Every kernel has a torch implementation that runs anywhere and, on CUDA, an optional GPU implementation from
mamba-ssm (Triton SSD scan and gated RMSNorm, compiled selective scan) or causal-conv1d (compiled depthwise
convolution). The GPU libraries are imported here lazily, only when a CUDA device asks for them, so the CPU path
never pays for (or breaks on) their import. On CPU, every kernel (both scans, the convolution, the gated norm,
TiSASRec's per-pair time terms, every model's dropout and the FFNs' activation fused with it, and the softmax of
the training loss) also has a C++ twin ("cpp", cpu_extension.py), built on
first use; a kernel without one would run its torch twin there.

mamba-ssm's kernels are imported from their own modules, never through `import mamba_ssm`: the package's
`__init__` imports its language-model classes, which need transformers and huggingface_hub, and a mamba-ssm
installed with `--no-deps` (the documented way) has neither. See `_register_bare_mamba_ssm`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping

import torch

from .cpu_extension import cpu_extension_problem, has_cpu_twin

log = logging.getLogger(__name__)

KERNELS = (
    "ssd_scan",
    "selective_scan",
    "causal_conv1d",
    "rmsnorm_gated",
    "time_pairs",
    "dropout",
    "activation_dropout",  # the FFNs' activation and the dropout after it, one kernel (else: the two steps)
    "cross_entropy",  # the training loss's softmax, block by block (else torch ops; off CPU torch's own loss)
)
BACKEND_NAMES = ("auto", "torch", "cpp", "triton", "cuda")
#: the compiled CPU backend; only the kernels with a source in cpu_extension have one
CPU_BACKEND = "cpp"

# The name recorded for a kernel's GPU path says what actually runs: Triton kernels for the SSD scan and the
# gated norm, compiled CUDA extensions for the selective scan and the convolution. Users may request either
# "triton" or "cuda"; both mean "the GPU path". A kernel missing here (TiSASRec's time_pairs) has no GPU path:
# its torch twin runs on a GPU.
GPU_BACKEND = {
    "ssd_scan": "triton",
    "selective_scan": "cuda",
    "causal_conv1d": "cuda",
    "rmsnorm_gated": "triton",
}
#: kernels whose GPU path is torch's own CUDA kernels (nn.Dropout's and the activation before it, F.cross_entropy): a GPU request runs their torch twin, so
#: the dropout every model has never refuses "triton"/"cuda" on a GPU (TiSASRec still does: its time_pairs have
#: no GPU path at all)
TORCH_IS_GPU_PATH = frozenset({"dropout", "activation_dropout", "cross_entropy"})

# (module, attribute) of each kernel's GPU entry point.
GPU_ENTRY = {
    "ssd_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "rmsnorm_gated": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
}

_INSTALL_HINT = "install the GPU extra with `pip install .[gpu]` (mamba-ssm, causal-conv1d, triton)"

# Calls into each GPU entry point in this process: lets a check tell a kernel that ran from one only chosen.
_gpu_calls: collections.Counter[str] = collections.Counter()

# Set only inside `triton_interpreter()`: lets the Triton kernels take CPU tensors (see there).
_interpreter_allowed = False


class KernelBackendError(ValueError):
    """A kernel backend was requested that does not exist or cannot run here."""


def _bare_package_getattr(name: str):
    raise AttributeError(
        f"mamba_ssm.{name}: the harness registered mamba_ssm without running its __init__ (which needs "
        "transformers), so only its kernel modules (mamba_ssm.ops...) can be imported"
    )


@functools.cache
def _register_bare_mamba_ssm() -> str | None:
    """Make `mamba_ssm.ops...` importable without executing `mamba_ssm/__init__.py`; None, or why not.

    Python imports a package's `__init__` before any of its submodules. Registering the package module made
    from its spec, unexecuted, in sys.modules lets the kernel modules import with only their own needs (torch,
    triton, einops, packaging). A mamba_ssm already in sys.modules (imported in full by the user, say) is used
    as it is. The bare package raises a clear AttributeError for the names its __init__ would have defined.
    """
    if "mamba_ssm" in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError) as exc:
        return f"mamba-ssm could not be located ({type(exc).__name__}: {exc})"
    if spec is None or spec.submodule_search_locations is None:
        return "mamba-ssm is not installed (no package mamba_ssm on sys.path)"
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = _bare_package_getattr  # module-level __getattr__ (PEP 562)
    sys.modules["mamba_ssm"] = package
    return None


def _import_problem(module_name: str, attr: str, exc: BaseException) -> str:
    problem = f"`from {module_name} import {attr}` failed ({type(exc).__name__}: {exc})"
    if getattr(exc, "name", None) == "selective_scan_cuda":
        problem += "; mamba-ssm was built without its compiled selective scan (MAMBA_SKIP_CUDA_BUILD)"
    return problem


@functools.cache
def gpu_backend_problem(kernel: str) -> str | None:
    """None when the kernel's GPU implementation can be loaded, else one sentence naming the failed import."""
    if kernel not in GPU_ENTRY:
        return f"{kernel} has no GPU kernel"
    module_name, attr = GPU_ENTRY[kernel]
    if module_name.startswith("mamba_ssm."):
        problem = _register_bare_mamba_ssm()
        if problem is not None:
            return problem
    try:
        getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, or a CUDA/Triton error raised while importing
        return _import_problem(module_name, attr, exc)
    return None


def gpu_kernel(kernel: str) -> Callable:
    """The GPU entry point of a kernel; call only after resolve_backend chose the GPU backend."""
    problem = gpu_backend_problem(kernel)
    if problem is not None:
        raise KernelBackendError(f"the GPU backend of {kernel} is unavailable: {problem}; {_INSTALL_HINT}.")
    module_name, attr = GPU_ENTRY[kernel]
    _gpu_calls[kernel] += 1
    return getattr(importlib.import_module(module_name), attr)


def gpu_calls() -> dict[str, int]:
    """How many times each kernel's GPU entry point was called in this process (kernels never called: 0)."""
    return {kernel: _gpu_calls[kernel] for kernel in KERNELS}


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """Inside this block an explicit "triton" request runs the Triton kernels on CPU tensors.

    For the interpreter test tier only. Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)
    executes the same kernel code with numpy on the CPU, so the harness's calls into mamba-ssm's Triton kernels
    can be checked against the torch twins without a GPU. Outside this block resolve_backend refuses the GPU
    backends for CPU tensors, deliberately: on CPU the twin is the fast path. The compiled CUDA kernels
    (selective scan, causal-conv1d) have no interpreter and stay refused.
    """
    global _interpreter_allowed
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelBackendError(
            "triton_interpreter() needs TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    previous, _interpreter_allowed = _interpreter_allowed, True
    try:
        yield
    finally:
        _interpreter_allowed = previous


@functools.cache
def _log_fallback(kernel: str) -> None:
    """Say once per kernel (not once per call) why "auto" did not pick the GPU path on a CUDA device."""
    log.warning("%s uses the torch backend on CUDA: %s", kernel, gpu_backend_problem(kernel))


@functools.cache
def _log_cpu_fallback(kernel: str) -> None:
    """Say once per kernel why "auto" kept the torch twin where a compiled CPU twin exists."""
    log.warning("%s uses the torch backend on CPU: %s", kernel, cpu_extension_problem(kernel))


def _resolve_cpu(kernel: str, name: str) -> str:
    """The CPU side of resolve_backend for "auto" and "cpp" on a CPU device."""
    if not has_cpu_twin(kernel):
        return "torch"  # the torch twin is this kernel's CPU implementation
    problem = cpu_extension_problem(kernel)
    if problem is None:
        return CPU_BACKEND
    if name == "auto":
        _log_cpu_fallback(kernel)
        return "torch"
    raise KernelBackendError(f"backend 'cpp' for {kernel} is unavailable: {problem}.")


def resolve_backend(kernel: str, requested: str, device: torch.device | str) -> str:
    """Turn a requested backend into the one that will run: "torch", "cpp" or the kernel's GPU backend name.

    "auto" picks the GPU path on a CUDA device when its library imports, the compiled CPU twin on a CPU device
    when the kernel has one and it builds, and the torch twin otherwise. "cpp" asks for the compiled CPU twins:
    kernels without one run their torch twin. An explicit request that cannot be honoured (a GPU backend without
    its library or device, "cpp" where the build fails) is an error, never a silent fallback.
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
    if name == CPU_BACKEND and device.type != "cpu":
        raise KernelBackendError(
            f"backend 'cpp' for {kernel} runs on CPU tensors but the inputs are on {device}; use 'auto' there."
        )
    if device.type == "cpu" and name in ("auto", CPU_BACKEND):
        return _resolve_cpu(kernel, name)
    if kernel not in GPU_BACKEND:
        if name == "auto" or (on_cuda and kernel in TORCH_IS_GPU_PATH):
            return "torch"
        if kernel not in TORCH_IS_GPU_PATH:
            raise KernelBackendError(f"{kernel} has no GPU kernel: use 'torch' or 'auto' on {device}.")
    if name == "auto":
        if on_cuda and gpu_backend_problem(kernel) is None:
            return GPU_BACKEND[kernel]
        if on_cuda:
            _log_fallback(kernel)
        return "torch"
    interpreted = _interpreter_allowed and GPU_BACKEND.get(kernel) == "triton" and device.type == "cpu"
    if not on_cuda and not interpreted:
        raise KernelBackendError(
            f"backend {requested!r} for {kernel} needs a CUDA device but the inputs are on {device}; "
            "use 'torch' or 'auto' there."
        )
    problem = gpu_backend_problem(kernel)
    if problem is not None:
        raise KernelBackendError(f"backend {requested!r} for {kernel} is unavailable: {problem}; {_INSTALL_HINT}.")
    return GPU_BACKEND[kernel]


def parse_backend_request(text: str) -> tuple[str, dict[str, str]]:
    """A kernel-backend request, one backend for every kernel with optional per-kernel overrides:
    "cpp" -> ("cpp", {}); "cpp:dropout=torch" -> ("cpp", {"dropout": "torch"}) (the C++ kernels except the
    dropout, e.g. to train on torch's dropout masks). Names are checked here; whether they run, by resolve_backend."""
    base, *overrides = str(text).lower().split(":")
    if base not in BACKEND_NAMES:
        raise KernelBackendError(f"unknown kernel backend {base!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    chosen = {}
    for override in overrides:
        kernel, equals, backend = override.partition("=")
        if not equals or kernel not in KERNELS or backend not in BACKEND_NAMES:
            raise KernelBackendError(
                f"bad kernel override {override!r} in {text!r}: write KERNEL=BACKEND with a kernel of "
                f"{', '.join(KERNELS)} and a backend of {', '.join(BACKEND_NAMES)}."
            )
        if kernel in chosen:
            raise KernelBackendError(f"kernel {kernel} overridden twice in {text!r}")
        chosen[kernel] = backend
    return base, chosen


def describe_backends(device: torch.device | str, requested: str | Mapping[str, str] = "auto") -> dict[str, str]:
    """The backend each kernel will use on `device`, for logging and for recording with a run."""
    if isinstance(requested, str):
        requested = {kernel: requested for kernel in KERNELS}
    return {kernel: resolve_backend(kernel, requested.get(kernel, "auto"), device) for kernel in KERNELS}
