"""New MLflow databases copied from an empty one made once, instead of built from scratch each time.

MLflow builds a new SQLite database by running its whole migration history, which takes 5-10 s of
CPU -- every time a report or an import loads a text-format store into a temporary database, and
the first time a results folder is used. The result is always the same empty database, so it is made
once per MLflow version, kept in the harness cache (HARNESS_CACHE_DIR, default ~/.cache/harness),
and copied (a copy opens in a tenth of a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _cache_dir() -> Path:
    value = os.environ.get("HARNESS_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "harness"


def empty_database() -> Path | None:
    """The cached empty database of this MLflow version (made now if missing); None when the
    cache cannot take it (then callers let MLflow build theirs)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = _cache_dir() / "mlflow" / f"empty-{mlflow.__version__}.db"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            building = Path(scratch, "mlflow.db")
            MlflowClient(f"sqlite:///{building}").search_experiments()  # runs the migrations
            os.replace(building, path)  # whole or absent, however many processes race here
    except OSError:
        return None
    return path


def create_database(path: Path) -> None:
    """Make `path` a new, empty MLflow database unless a file is already there (or appears
    meanwhile: another process's database is never overwritten)."""
    if path.exists():
        return
    template = empty_database()
    if template is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copyfile(template, staging)
        with contextlib.suppress(FileExistsError):  # another process's database won the race
            os.link(staging, path)  # appears whole, and never replaces a file
    finally:
        Path(staging).unlink(missing_ok=True)
