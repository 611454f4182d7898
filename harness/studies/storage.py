"""Where Optuna keeps a study, and a cross-process lock around the few steps that must not race.

- Default: an Optuna JournalStorage over a file, results/studies/<name>.journal. Its appends are
  locked, so any number of worker processes on one machine may share it.
- Any Optuna RDB URL (postgresql+psycopg2://..., mysql://..., sqlite:///...) for many machines.
  Several workers creating the schema of a fresh database at once race in SQLAlchemy's
  create_all and Optuna's version table: on PostgreSQL the creation runs under an advisory lock,
  elsewhere it is retried.

`StudyStorage.lock()` serialises study creation, grid enqueueing, the budget check + `ask` and
the reaping of dead workers' trials across processes: fcntl.flock on a side file for journal and
SQLite storage (released by the kernel when a process dies), pg_advisory_lock on PostgreSQL
(released when its connection drops), GET_LOCK on MySQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from harness.store.location import results_dir
from harness.studies.schema import StudySpecError

_HELD = threading.local()
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")


def default_storage_url(study_name: str) -> str:
    return str((results_dir() / "studies" / f"{study_name}.journal").resolve())


class StudyStorage:
    def __init__(self, url: str):
        self.raw = url
        scheme = urlsplit(url).scheme.split("+")[0].lower() if "://" in url else ""
        if url.startswith("journal:"):
            self.kind = "journal"
            location = url.removeprefix("journal:")
            location = "/" + location.lstrip("/") if location.startswith("//") else location
            self.path: Path | None = Path(location).expanduser().resolve()
        elif scheme in RDB_SCHEMES:
            self.kind = "rdb"
            self.dialect = "postgresql" if scheme == "postgres" else scheme
            self.path = None
            if self.dialect == "sqlite":
                db = url.split(":///", 1)[1] if ":///" in url else ""
                self.path = Path(db).expanduser().resolve() if db and db != ":memory:" else None
        elif scheme:
            raise StudySpecError(
                f"storage: unsupported URL scheme {scheme!r}; use a journal file path, "
                "journal:PATH, or an Optuna RDB URL (postgresql+psycopg2://..., sqlite:///...)"
            )
        else:
            self.kind = "journal"
            self.path = Path(url).expanduser().resolve()
        if self.kind == "journal":
            self.dialect = "journal"
        self._storage = None

    # ------------------------------------------------------------------ description
    @property
    def url(self) -> str:
        """A form other processes can be given (`--storage`)."""
        return str(self.path) if self.kind == "journal" else self.raw

    def describe(self) -> str:
        if self.kind == "journal":
            return f"journal file {self.path}"
        return f"{self.dialect} database {_redact(self.raw)}"

    def exists(self) -> bool:
        if self.kind == "journal" or (self.dialect == "sqlite" and self.path):
            return bool(self.path and self.path.exists() and self.path.stat().st_size > 0)
        return True  # a server: cannot tell without connecting

    @property
    def multi_machine(self) -> bool:
        return self.kind == "rdb" and self.dialect != "sqlite"

    # ------------------------------------------------------------------ the Optuna storage
    def open(self):
        if self._storage is not None:
            return self._storage
        import optuna

        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._storage = JournalStorage(JournalFileBackend(str(self.path)))
            return self._storage
        if self.dialect == "sqlite" and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for attempt in range(8):
            try:
                with self.lock():
                    self._storage = optuna.storages.RDBStorage(self.raw, engine_kwargs=self._engine_kwargs())
                return self._storage
            except ImportError as err:
                raise StudySpecError(f"storage: cannot open {self.describe()}: {err}") from None
            except Exception as err:  # schema-creation races: tables, types, version rows
                last_error = err
                if not _is_race(err):
                    raise StudySpecError(
                        f"storage: cannot open {self.describe()}: {str(err).splitlines()[0]}"
                    ) from None
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
        raise StudySpecError(f"storage: cannot open {self.describe()}: {last_error}")

    def _engine_kwargs(self) -> dict:
        if self.dialect == "sqlite":
            return {"connect_args": {"timeout": 60}}
        if self.dialect == "postgresql":  # an unreachable server is an error in seconds, not minutes
            return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        return {"pool_pre_ping": True}

    def heartbeat_storage(self, interval: int, grace: int):
        """The same database opened with Optuna's trial heartbeat (every `interval` s; a trial
        without one for `grace` s is stale), for the final-run claims of harness/studies/claims.py.
        Its schema exists: `open` made it, race-free."""
        import optuna

        self.open()
        return optuna.storages.RDBStorage(
            self.raw, engine_kwargs=self._engine_kwargs(), heartbeat_interval=interval, grace_period=grace
        )

    # ------------------------------------------------------------------ cross-process lock
    @contextlib.contextmanager
    def lock(self, name: str = "harness"):
        """Exclusive across processes; re-entrant within a thread (nested use is a no-op)."""
        held = getattr(_HELD, "names", None)
        if held is None:
            held = _HELD.names = set()
        key = (self.raw, name)
        if key in held:
            yield
            return
        held.add(key)
        try:
            if self.kind == "journal" or (self.dialect == "sqlite" and self.path):
                suffix = "" if name == "harness" else f"-{name}"
                with _flock(Path(f"{self.path}.harness{suffix}.lock")):
                    yield
            elif self.dialect == "postgresql":
                with _pg_lock(self.raw, _lock_key(name)):
                    yield
            elif self.dialect == "mysql":
                with _mysql_lock(self.raw, f"harness.{_lock_key(name)}"):
                    yield
            else:
                yield
        finally:
            held.discard(key)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return url.replace(parts.netloc, netloc)
    return url


def _is_race(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(
        s in text
        for s in (
            "already exists",
            "duplicate",
            "unique",
            "integrity",
            "database is locked",
            "deadlock",
            "could not serialize",
        )
    )


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _flock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _pg_lock(url: str, key: int):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _mysql_lock(url: str, name: str):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:n, -1)"), {"n": name[:64]})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": name[:64]})
    finally:
        engine.dispose()
