"""`ui`: the MLflow UI on 127.0.0.1 against the project's tracking store."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def register(sub) -> None:
    parser = sub.add_parser(
        "ui",
        help="start the MLflow UI (127.0.0.1) on the project's tracking store",
        description="Start `mlflow server` on the project's store (default sqlite under results/, "
        "artifacts in mlartifacts/ beside the database) with one worker and job execution off; Ctrl-C or "
        "SIGTERM stops it and its children. A port already in use is refused before starting. Prints a link "
        "per experiment that opens the UI's model-training side on the runs table, on the harness's saved "
        "view of the tested runs (also under 'Views' on the runs page): docs/ui.md.",
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1, local only)")
    parser.add_argument("--tracking-uri", help="backend store URI (default: sqlite under results/)")
    parser.set_defaults(handler=run)


def command(args: argparse.Namespace) -> list[str]:
    from harness.store.checks import checked_uri
    from harness.store.location import artifact_root, default_tracking_uri, sqlite_database

    # a wrong URI or a damaged database is one line here, not a server that fails after starting
    uri = checked_uri(args.tracking_uri or default_tracking_uri(), reading=False)
    database = sqlite_database(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    artifacts = artifact_root(uri)  # beside the database; a server store keeps its own
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        *(["--default-artifact-root", artifacts] if artifacts else []),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]


def require_free_port(host: str, port: int) -> None:
    """One line now if the server could not listen on host:port (the server itself would log the
    bind error and still exit 0). SO_REUSEADDR as uvicorn sets it, so a port merely in TIME_WAIT
    counts as free and only a listening socket makes it busy."""
    import socket

    from harness.errors import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"port {port} on {host} is not available ({err.strerror}); another "
                "server holds it: stop that one or choose another with --port"
            ) from None


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    require_free_port(args.host, args.port)
    from harness.store.ui_view import runs_link

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = command(args)
    viewed = _open_on_the_runs_table(cmd[5])
    base = f"http://{_link_host(args.host)}:{args.port}"
    print(f"MLflow UI on {base} (store {cmd[5]}); Ctrl-C stops it", flush=True)
    # links, because the UI opens its GenAI side unless the link (or the browser's last choice) asks
    # for model training, and shows no metric column unless a view names them
    width = max((len(name) for name, _ in viewed), default=0)
    lines = [f"  {name:<{width}}  {runs_link(base, experiment_id)}" for name, experiment_id in viewed]
    if lines:
        print("runs tables (the harness's view: tested runs, objective and test metrics):", *lines, sep="\n")
    print(
        "from the UI's home page: switch to 'Model training' (top left) once, the browser keeps it; "
        "on an experiment's runs page, Views > 'harness: tested runs'",
        flush=True,
    )
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(signum=None, frame=None):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        return _shutdown(proc)
    # nobody asked it to stop: it failed (a port taken between the check and the bind, a bad store)
    print(
        f"error: the MLflow server stopped by itself (exit code {code}); its log is above", file=sys.stderr, flush=True
    )
    return code or 1


def _open_on_the_runs_table(uri: str) -> list[tuple[str, str]]:
    """Tag experiments made before the harness tagged their kind, and write or refresh each one's
    saved view (harness.store.ui_view), in a local store that exists (a server's experiments are
    its own business). Returns (name, experiment id) of the experiments with a view, by name."""
    from harness.store.location import sqlite_database

    database = sqlite_database(uri)
    if database is None or not database.is_file():
        return []
    from mlflow.tracking import MlflowClient

    from harness.store.contract import UI_VIEW_ID, UI_VIEW_TAG_PREFIX
    from harness.store.ui_view import write_view
    from harness.store.writer import mark_model_training, retrying

    client = MlflowClient(uri)
    viewed, writable = [], True
    for experiment in sorted(client.search_experiments(), key=lambda e: e.name):
        has_view = UI_VIEW_TAG_PREFIX + UI_VIEW_ID in experiment.tags
        if writable:  # retried while a running study holds the SQLite write lock
            try:
                retrying(mark_model_training, client, experiment)
                has_view = retrying(write_view, client, experiment.experiment_id)
            except Exception as err:  # a store this user may only read: browse it as it is
                print(f"note: the store's views were not brought up to date ({err})", flush=True)
                writable = False
        if has_view:
            viewed.append((experiment.name, experiment.experiment_id))
    return viewed


def _link_host(host: str) -> str:
    """The host part of a link to a server listening on `host` (all interfaces: this machine)."""
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _shutdown(proc: subprocess.Popen) -> int:
    """Stop the server's whole process group (it runs as two processes), politely first. SIGTERM,
    not SIGINT: uvicorn re-raises the signal it caught once it has shut down, and a SIGINT then
    ends asyncio with a KeyboardInterrupt traceback, where SIGTERM ends the process quietly."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader for a moment: make sure nothing is left
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print("MLflow UI stopped", flush=True)
    return 0
