"""`compile`: run a model's encoder through torch.compile (TorchInductor), or not.

Inductor fuses the elementwise chains of a layer (dropout, gates, norms, the SSD scan's decay
arithmetic) into generated kernels: Triton on a GPU, C++/OpenMP on a CPU. Measured on the 2-core
CPU machine (reports/bench_cpu/compile; `harness bench --compile eager,compiled`), the compiled
encoder was not faster than the hand-trimmed eager one and every new batch shape cost 10-35 s of
compilation, so `auto` compiles on CUDA only; `compile: true` forces it anywhere, `false` never.

Only `encode` is compiled (the loss is one matrix product plus the fused cross-entropy). Shapes are
kept few and static: batch widths are padded up to a multiple of 8 (capped at max_len) for models
whose real positions ignore trailing padding, and cut back after, so bucketed batches of any width
meet at most max_len / 8 compiled widths (a width a model picks inside encode, TiM4Rec's trimmed
item path, is rounded the same way: `width_multiple`); the batch dimension is marked dynamic, so the last, short
batch of a bucket reuses its graph. (Letting dynamo make the width symbolic hits an inductor stride
bug on the SSD scan in torch 2.13: "cannot determine truth value of Relational".)

Compiled code must compute what eager code computes: `fallback_random` makes inductor draw dropout
masks from the same generator calls as eager, so a compiled run differs from an eager one only by
float rounding (tests/test_compile.py holds them to 1e-5 relative on forward and gradients).

On CPU the C++ kernels (models/kernels/*_cpu.cpp: the scans, convolution, gated norm, dropout
and the FFNs' activation with it) are
opaque calls that dynamo does not trace (torch.compiler.disable): a compiled CPU encoder breaks its
graph at each of them and fuses only what lies between; `kernel_backend=torch` hands inductor the
whole layer instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import Literal

import torch

from models.base import round_up_width

#: the `compile` setting: True, False or "auto" (compile on CUDA only)
CompileSetting = bool | Literal["auto"]

EAGER = "eager"
INDUCTOR = "inductor"
#: compiled batch widths are multiples of this (or max_len)
WIDTH_MULTIPLE = 8

log = logging.getLogger(__name__)


def missing_toolchain(device: torch.device) -> str | None:
    """Why inductor cannot generate code for `device` here, or None when it can."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(c) for c in compilers):
        return f"no C++ compiler found (looked for {', '.join(compilers)}; set CXX)"
    return None


def wants_compile(setting: CompileSetting, device: torch.device) -> bool:
    return setting is True or (setting == "auto" and device.type == "cuda")


def compile_encoder(model: torch.nn.Module, setting: CompileSetting, device: torch.device) -> str:
    """Compile `model.encode` in place when `setting` asks for it and the toolchain exists; returns
    the backend that will run it ("inductor" or "eager"), which runs record as a tag. Without a
    toolchain it warns once and stays eager rather than failing a run that would work uncompiled."""
    if not wants_compile(setting, device):
        return EAGER
    reason = missing_toolchain(device)
    if reason:
        log.warning("compile: %s; running eager", reason)
        return EAGER
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    dynamo_config.automatic_dynamic_shapes = False
    # widths (<= max_len / 8 + 1) x batch kinds (train, eval) x graph pieces, with room to spare
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    compiled = torch.compile(model.encode, backend=INDUCTOR)
    pads = model.trims_padding
    limit = model.max_len
    model.width_multiple = WIDTH_MULTIPLE  # widths chosen inside encode too (TiM4Rec's item path)

    def encode(items, timestamps, at=None):
        width = items.size(1)
        padded = round_up_width(width, WIDTH_MULTIPLE, limit) if pads else width
        if padded > width:  # trailing padding id 0 / time 0, as gather pads a short row
            items = torch.nn.functional.pad(items, (0, padded - width))
            if timestamps is not None:
                timestamps = torch.nn.functional.pad(timestamps, (0, padded - width))
        for tensor in (items, timestamps, at):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        out = compiled(items, timestamps, at)
        return out if at is not None else out[:, :width]

    # an instance attribute shadows the method: last_hidden (prefix training, evaluation) and
    # all_positions training both reach the compiled function; state_dict keys are unchanged
    model.encode = encode
    return INDUCTOR
