"""A tracking store checked before MLflow opens it, so that a wrong one costs one line and no damage.

MLflow opens whatever it is given: a URI with an unknown scheme fails deep in its registry with a
traceback, a file that is not a database (or a truncated copy of one) fails in SQLAlchemy, and an
empty file is a database without tables, into which MLflow writes its schema before reading
nothing -- a report "from" it succeeds, and the file is no longer what the user had. Here each of
those is a StoreError naming the file, raised before MLflow sees it. The checks read only the
first 100 bytes (SQLite's header) and the table names, through a read-only SQLite connection.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

from harness.errors import UserError
from harness.store.location import SQLITE, sqlite_database

#: the schemes MLflow has a tracking store for (a "+driver" suffix, as in postgresql+psycopg2, is allowed)
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc", "file")
#: what makes a SQLite database an MLflow tracking store
MLFLOW_TABLES = {"experiments", "runs"}
SQLITE_HEADER = b"SQLite format 3\x00"
HOW = "name a store as sqlite:///PATH, an http(s):// MLflow server, or the folder of an exported store"


class StoreError(UserError, ValueError):
    """The tracking store cannot be read as asked (missing or damaged file, unknown study)."""


def checked_uri(uri: str, reading: bool) -> str:
    """`uri` as MLflow should get it, or StoreError. A plain path to a file is a SQLite store (the
    `sqlite:///` is added); a SQLite database must be one MLflow made (when `reading`, it must
    exist and have its tables; a writer may also create it, or fill an empty file)."""
    if "://" not in uri:
        path = Path(uri)
        if path.is_dir():
            raise StoreError(f"{path} is a folder but not a tracking store (no experiments.json or mlflow.db in it)")
        if reading and not path.exists():
            raise StoreError(f"no tracking store at {path}; {HOW}")
        uri = f"{SQLITE}{path}"  # as given: a report names the store the way its user did
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if scheme not in SCHEMES:
        raise StoreError(f"tracking URI {uri!r}: MLflow has no store for the scheme {scheme!r}; {HOW}")
    if scheme == "file" and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        raise StoreError(
            f"tracking URI {uri!r}: MLflow's file store is retired (this MLflow refuses it); move it to "
            "SQLite with `mlflow migrate-filestore`, or set MLFLOW_ALLOW_FILE_STORE=true to read it as it is"
        )
    database = sqlite_database(uri)
    if database is not None:
        check_database(database, reading)
    quiet_schema_messages()
    return uri


def check_database(path: Path, reading: bool) -> None:
    """StoreError unless `path` is a whole MLflow SQLite database (or, for a writer, no file yet, an
    empty one, or a SQLite database without any table: MLflow sets those up)."""
    if not path.exists():
        if reading:
            raise StoreError(
                f"no tracking store at {path} (run some trainings or studies first, or pass --tracking-uri)"
            )
        return
    if path.is_dir():
        raise StoreError(f"tracking store {path} is a folder, not a SQLite database file")
    size = path.stat().st_size
    if size == 0:
        if reading:
            raise StoreError(f"tracking store {path} is empty (0 bytes): no runs to read; {HOW}")
        return
    with open(path, "rb") as file:
        header = file.read(100)
    if not header.startswith(SQLITE_HEADER):
        raise StoreError(f"tracking store {path} is not a SQLite database (it lacks SQLite's header); {HOW}")
    expected = _recorded_size(header)
    if len(header) < 100 or size < expected:
        raise StoreError(
            f"tracking store {path} is truncated: {size:,} of the {max(expected, 100):,} bytes its header "
            "records (a copy cut short?); restore it, or import its studies from an exported store"
        )
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        connection.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"tracking store {path} cannot be read as a SQLite database ({err})") from None
    if MLFLOW_TABLES <= tables or (not reading and not tables):
        return
    raise StoreError(
        f"{path} is a SQLite database but not an MLflow tracking store (it has no "
        f"{' and '.join(sorted(MLFLOW_TABLES - tables))} table); {HOW}"
    )


def quiet_schema_messages() -> None:
    """MLflow logs "Creating initial MLflow database tables..." at INFO whenever it opens a new
    database (a report's temporary one, the first run's store): not news to the user, and two
    lines before an `error:` line that should stand alone."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _recorded_size(header: bytes) -> int:
    """The file size a SQLite header records (page size x page count), or 0 when the count is not
    trustworthy: SQLite keeps it valid only while the two change counters agree."""
    if len(header) < 100 or header[24:28] != header[92:96]:
        return 0
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    return page_size * int.from_bytes(header[28:32], "big")
