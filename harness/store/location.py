"""Where the local tracking store lives: SQLite under results/ (the MLflow file store is deprecated),
artifacts beside it in results/mlartifacts/. HARNESS_RESULTS_DIR moves results/; MLFLOW_TRACKING_URI
or --tracking-uri points elsewhere altogether, and a SQLite store named that way keeps its artifacts
beside its own database (<its folder>/mlartifacts/), never in the working directory's results/."""

from __future__ import annotations

import os
from pathlib import Path

SQLITE = "sqlite:///"


def results_dir() -> Path:
    return Path(os.environ.get("HARNESS_RESULTS_DIR", "results"))


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{(results_dir() / 'mlflow.db').resolve()}"


def sqlite_database(uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI; None for any other store."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def artifact_folder(uri: str | None = None) -> Path | None:
    """Where the runs of the tracking store `uri` (default: the local one) keep their artifacts: the
    mlartifacts/ folder beside a SQLite database; None for a server, which decides for itself."""
    database = sqlite_database(uri or default_tracking_uri())
    return None if database is None else (database.parent / "mlartifacts").resolve()


def artifact_root(uri: str | None = None) -> str | None:
    """artifact_folder as a file:// URI, the form MLflow records."""
    folder = artifact_folder(uri)
    return None if folder is None else folder.as_uri()
