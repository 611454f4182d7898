"""Sequence-mixing kernels: each GPU kernel has a pure-torch twin (any device) and a slow oracle for tests.

Importing this package imports torch only; mamba-ssm, causal-conv1d and triton are imported lazily, and only
when a CUDA backend is requested or chosen by "auto" (see backends.py).
"""

from .backends import (
    BACKEND_NAMES,
    GPU_BACKEND,
    KERNELS,
    KernelBackendError,
    describe_backends,
    parse_backend_request,
    resolve_backend,
)
from .causal_conv import causal_conv1d, causal_conv1d_cpp, causal_conv1d_reference, causal_conv1d_torch
from .cross_entropy import tied_cross_entropy, tied_cross_entropy_reference
from .rmsnorm_gated import GatedRMSNorm, rms_norm_gated, rms_norm_gated_torch
from .selective_scan import selective_scan, selective_scan_cpp, selective_scan_reference, selective_scan_torch
from .ssd_scan import ssd_scan, ssd_scan_at, ssd_scan_packed, ssd_scan_reference, ssd_scan_torch

__all__ = [
    "BACKEND_NAMES",
    "GPU_BACKEND",
    "KERNELS",
    "GatedRMSNorm",
    "KernelBackendError",
    "causal_conv1d",
    "causal_conv1d_cpp",
    "causal_conv1d_reference",
    "causal_conv1d_torch",
    "describe_backends",
    "parse_backend_request",
    "resolve_backend",
    "rms_norm_gated",
    "rms_norm_gated_torch",
    "selective_scan",
    "selective_scan_cpp",
    "selective_scan_reference",
    "selective_scan_torch",
    "ssd_scan",
    "ssd_scan_at",
    "ssd_scan_packed",
    "ssd_scan_reference",
    "ssd_scan_torch",
    "tied_cross_entropy",
    "tied_cross_entropy_reference",
]
