"""The MLflow UI in a real headless browser: a tiny study's runs page shows its final runs and a test
metric column, and a screenshot of it is saved.

    python scripts/ui_check.py [--out results/ui_check/runs.png] [--chromium /usr/bin/chromium]

Needs Debian's chromium (`apt-get install chromium`) and Playwright (the test extra); Playwright
drives the installed browser, so `playwright install` (a download) is never needed. In a temporary
folder: a tiny study on the embedded ml-latest-small (SASRec, hidden 8 and 16, one epoch, one seed:
about 20 s), `python -m harness ui` on its store, the link that `ui` prints for the study opened in
the browser; checks that the link opens the runs table with every final run's name, the objective
and test_ndcg_at_10 columns and the group row of the study; screenshot; then SIGTERM to `ui`, which
must stop cleanly. Exit 0 when every check passes, 1 when one fails (its screenshot is saved too),
2 when the browser or Playwright is missing. .ci/ui_check.sh runs it in CI; docs/ui.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = "ui_check"
TEST_COLUMN = "test_ndcg_at_10"
OBJECTIVE_COLUMN = "selected_objective_0"  # a final run's copy of the objective it was selected by
# Chromium must not reach for the network (there is none here): no QUIC, background fetches,
# component updates or sync; a fresh profile each time
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TINY_STUDY = {
    "name": STUDY,
    "description": "the browser check's tiny study (scripts/ui_check.py)",
    "datasets": ["ml-latest-small"],
    "models": {"sasrec": {"params": {"n_heads": 1}}},
    "train": {
        "max_len": 10,
        "epochs": 1,
        "protocol": "all_positions",
        "min_user_inter": 20,
        "min_item_inter": 100,
        "batch_size": 1024,
        "threads": 1,
    },
    "space": {"hidden_size": [8, 16]},
    "sampler": "grid",
    "pruner": "none",
    "select_per": ["hidden_size"],
    "final": {"seeds": 1},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ui_check" / "runs.png", help="screenshot")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (Debian's chromium)")
    parser.add_argument("--wait", type=float, default=240, help="seconds to wait for the server and the page")
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        print(f"error: no browser at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 2
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        print("error: Playwright is missing: pip install -e '.[test]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ui_check-") as folder:
        return check(Path(folder), args)


def check(folder: Path, args) -> int:
    env = {
        **os.environ,
        "HARNESS_RESULTS_DIR": str(folder / "results"),
        "HARNESS_CACHE_DIR": str(folder / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    store = folder / "results" / "mlflow.db"
    spec = folder / f"{STUDY}.yaml"
    spec.write_text(yaml.safe_dump({**TINY_STUDY, "tracking_uri": f"sqlite:///{store}"}, sort_keys=False))
    began = time.time()
    study = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(spec), "--no-live"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if study.returncode != 0:
        print(study.stdout[-3000:], study.stderr[-3000:], sep="\n")
        return fail(f"the tiny study failed (exit code {study.returncode})")
    finals = final_run_names(store)
    print(f"tiny study {STUDY}: {len(finals)} final runs in {time.time() - began:.0f} s: {', '.join(finals)}")

    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "harness", "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{store}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []
    threading.Thread(target=collect, args=(ui.stdout, log), daemon=True).start()
    try:
        link = printed_link(ui, log, args.wait)
        wait_until_serving(ui, port, args.wait)
        print(f"ui serves on port {port}; opening {link}")
        problems = look(link, finals, args)
    finally:
        stopped = stop(ui)
    output = "".join(log)
    if not stopped or "Traceback" in output or not output.rstrip().endswith("MLflow UI stopped"):
        problems.append(f"`ui` did not stop cleanly on SIGTERM (exit code {ui.returncode}); its output:\n{output}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"ui check passed: the runs table shows the {len(finals)} final runs, {OBJECTIVE_COLUMN} and "
        f"{TEST_COLUMN}; screenshot {args.out}; `ui` stopped cleanly on SIGTERM"
    )
    return 0


def look(link: str, finals: list[str], args) -> list[str]:
    """Open the link, check what the runs table shows, save the screenshot; the problems found."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    problems = []
    wait_ms = args.wait * 1000
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="ui_check-profile-") as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=args.chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 900},
        )
        page = browser.new_page()
        page.goto(link)
        checks = [(f"final run {name!r}", page.get_by_text(name, exact=True)) for name in finals]
        checks += [
            (f"column {column!r}", page.locator(f'.ag-header-cell[col-id="metrics.`{column}`"]'))
            for column in (OBJECTIVE_COLUMN, TEST_COLUMN)
        ]
        checks.append((f"the group row of study {STUDY}", page.get_by_text(f"Group: {STUDY}", exact=True)))
        for what, locator in checks:
            try:
                locator.first.wait_for(state="visible", timeout=wait_ms)
            except PlaywrightTimeout:
                problems.append(f"{what} is not visible on {page.url}")
        # the assistant panel that the UI opens on a first visit covers a third of the table
        close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
        if close.count():
            close.first.click()
            page.wait_for_timeout(500)
        header = page.locator(f'.ag-header-cell[col-id="metrics.`{TEST_COLUMN}`"]')
        if header.count() and header.first.inner_text().strip() != TEST_COLUMN:
            problems.append(f"the {TEST_COLUMN} column is headed {header.first.inner_text()!r}")
        if "workflowType=machine_learning" not in page.url:
            problems.append(f"the page left the model-training side: {page.url}")
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"screenshot {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return problems


def final_run_names(store: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    from harness.store import contract as tc

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(STUDY)
    finals = f"tags.`{tc.KIND}` = '{tc.KIND_FINAL}'"
    return sorted(run.info.run_name for run in client.search_runs([experiment.experiment_id], finals))


def collect(stream, lines: list[str]) -> None:
    """`ui`'s output, line by line as it comes (so its pipe never fills)."""
    for line in stream:
        lines.append(line)


def printed_link(ui: subprocess.Popen, log: list[str], wait: float) -> str:
    """The link `ui` printed for the study: what a user clicks is what gets checked."""
    deadline = time.time() + wait
    while time.time() < deadline:
        for line in list(log):
            found = re.match(rf"^\s+{STUDY}\s+(http\S+)$", line)
            if found:
                return found[1]
        if ui.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(fail("`ui` printed no link for the study:\n" + "".join(log)))


def wait_until_serving(ui: subprocess.Popen, port: int, wait: float) -> None:
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            if ui.poll() is not None:
                break
            time.sleep(0.5)
    stop(ui)
    raise SystemExit(fail(f"the MLflow server did not come up on port {port} within {wait:.0f} s"))


def stop(ui: subprocess.Popen) -> bool:
    """SIGTERM, as a service manager would; True when `ui` exits 0 by itself."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGTERM)
    try:
        return ui.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fail(message: str) -> int:
    print(f"FAILED: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
