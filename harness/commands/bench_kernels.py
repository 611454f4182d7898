"""`bench-kernels`: forward+backward timings of the sequence-mixing kernels (models.kernels.bench).

Every argument after `bench-kernels` is passed to the kernel benchmark unchanged, e.g.
`python -m harness bench-kernels --device cuda --backends torch cuda --seqlen 200`.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    parser = sub.add_parser(
        "bench-kernels",
        help="benchmark the GPU kernels against their torch twins",
        description="Forward+backward timings of the SSD chunk scan, the Mamba1 selective scan, the "
        "causal depthwise convolution, the gated RMSNorm and the training loss (fused and unfused), per "
        "backend, side by side. Arguments "
        "are those of `python -m models.kernels.bench` (see `bench-kernels --help`).",
        add_help=False,
        # '+' as the option prefix: every '-'/'--' argument is passed through untouched
        prefix_chars="+",
    )
    parser.add_argument("kernel_args", nargs="*", help="arguments for models.kernels.bench (--help shows them)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    from harness.errors import UserError

    try:
        bench = importlib.import_module("models.kernels.bench")
    except ModuleNotFoundError as err:
        if err.name in ("models.kernels.bench", "models.kernels"):
            raise UserError(
                "the kernel benchmark (models/kernels/bench.py) is not available in this checkout"
            ) from None
        raise
    main = getattr(bench, "main", None)
    if main is None:
        raise UserError("models.kernels.bench has no main(); the kernel benchmark is incomplete")
    argv = list(args.kernel_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        main(argv)
    except SystemExit as exit_:  # argparse --help or a usage error inside the kernel benchmark
        return int(exit_.code or 0)
    return 0
