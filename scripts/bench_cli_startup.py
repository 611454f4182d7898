"""How long a person waits for `--help` and for a one-line settings error: the median wall time of
fresh `python -m harness ...` processes, and the heavy libraries each one imported.

    python scripts/bench_cli_startup.py [--repeats 5]

The target (issue 24) is under a second for each: nothing heavy (torch, mlflow, optuna, pandas,
numpy: half a second on its own) is imported before a command needs it. tests/test_bad_input.py
checks the imports; this measures the time, which a unit test must not assert.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

COMMANDS = [
    ["--help"],
    ["train", "--help"],
    ["run", "--help"],
    ["report", "--help"],
    ["train", "--set", "lr=-1"],
    ["train", "--set", "topk=[20]"],
    ["train", "--config", "/nonexistent/c.yaml"],
]
HEAVY = ("torch", "mlflow", "optuna", "pandas", "numpy", "sqlalchemy")
PROBE = (
    "import sys\n"
    "from harness import cli\n"
    "try:\n"
    "    cli.main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="processes per command (default 5)")
    args = parser.parse_args()
    table = Table(title=f"python -m harness startup, median of {args.repeats} fresh processes")
    for column in ("command", "median s", "min s", "heavy imports"):
        table.add_column(column, justify="left" if column in ("command", "heavy imports") else "right")
    for argv in COMMANDS:
        seconds, heavy = [], ""
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
            seconds.append(time.perf_counter() - began)
            heavy = out.stderr.strip().splitlines()[-1].removeprefix("HEAVY").strip()
        table.add_row(" ".join(argv), f"{statistics.median(seconds):.2f}", f"{min(seconds):.2f}", heavy or "none")
    Console().print(table)


if __name__ == "__main__":
    main()
