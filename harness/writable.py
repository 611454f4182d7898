"""Fail before any work when a place the run must write to cannot take files.

A read-only results/ (a mounted share, a copied tree, another user's checkout) used to surface as a
traceback from SQLite when MLflow opened its store, or from torch.save after a whole epoch of
training. These checks run first and name the folder in one line. They probe by creating and
deleting a file, because permission bits say nothing about read-only mounts or about root.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness.errors import UserError


class NotWritableError(UserError, OSError):
    """A folder the harness must write to cannot take files."""


def require_writable(directory: str | Path, what: str) -> None:
    """Prove that `directory` can take files, or raise NotWritableError. Nothing is left behind:
    a folder that does not exist yet is probed in its nearest existing parent (where it would be
    created), with a file that is removed at once."""
    directory = Path(directory).absolute()
    probe_in = directory
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe_in))
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".harness-write-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise NotWritableError(
            f"{what} {directory} is not writable ({reason}); make it writable or point the run "
            "elsewhere (HARNESS_RESULTS_DIR, --tracking-uri, --checkpoint-dir)"
        ) from None


def require_writable_store(tracking_uri: str, artifacts: str | Path | None) -> None:
    """A local SQLite tracking store and its artifact folder must take files (SQLite writes its
    journal beside the database); remote stores are the server's business."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        require_writable(database.parent, "the tracking store's folder")
        if database.exists():
            try:
                with open(database, "r+b"):
                    pass
            except OSError as err:
                raise NotWritableError(
                    f"the tracking store {database} is not writable ({err.strerror}); make it "
                    "writable or choose another with --tracking-uri"
                ) from None
    if artifacts is not None:
        require_writable(artifacts, "the artifact folder")
