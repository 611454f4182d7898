"""`python -m harness <command>`: every command lives in harness/commands/<name>.py and exposes
`register(subparsers)` (adds its parser, sets `handler`). User errors become one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import UserError

COMMANDS = (
    "datasets",
    "train",
    "run",
    "worker",
    "report",
    "export",
    "import_store",
    "bench",
    "bench_kernels",
    "ui",
    "dashboard",
)


def _is_user_error(err: BaseException) -> bool:
    """A UserError, or models/' configuration error (models/ never imports harness/, so it is the
    one kind outside the base). Looked up only if models/ was imported: importing it here would
    import torch, seconds before a one-line error that never needed it."""
    if isinstance(err, UserError):
        return True
    base = sys.modules.get("models.base")
    return base is not None and isinstance(err, base.ModelConfigError)


def output_console():
    """The rich Console a command prints with. On a terminal, rich's own (its width, colours). In a
    log or a pipe rich assumes 80 columns and would break every longer line in two; there a line
    stays one line (soft wrap) and tables get 200 columns to lay out in."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Benchmark and AutoML harness for sequential recommenders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"harness.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"harness.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except Exception as err:
        if not _is_user_error(err):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
