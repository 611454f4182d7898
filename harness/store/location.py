"""Where the local tracking store lives: SQLite under results/ (the MLflow file store is deprecated),
artifacts beside it in results/mlartifacts/. HARNESS_RESULTS_DIR moves results/; MLFLOW_TRACKING_URI
points elsewhere altogether."""

from __future__ import annotations

import os
from pathlib import Path


def results_dir() -> Path:
    return Path(os.environ.get("HARNESS_RESULTS_DIR", "results"))


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(results_dir() / 'mlflow.db').resolve()}"


def artifact_root() -> str:
    return (results_dir() / "mlartifacts").resolve().as_uri()
