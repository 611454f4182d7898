"""`python -m harness <command>`: every command lives in harness/commands/<name>.py and exposes
`register(subparsers)` (adds its parser, sets `handler`). User errors become one line + exit 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import UserError

COMMANDS = ("datasets", "train", "run", "worker", "report", "export", "import_store", "bench", "bench_kernels", "ui", "dashboard")


def _user_error_types() -> tuple[type[BaseException], ...]:
    # models/ never imports harness/, so its configuration errors are the one kind outside the base
    from models.base import ModelConfigError

    return (UserError, ModelConfigError)


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
    except _user_error_types() as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
