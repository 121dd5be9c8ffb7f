"""Engine and sessions: `open_database(url)` makes the engine, migrates the schema to head and returns a session factory.

Callers open one short session per unit of work (`with factory() as s, s.begin(): ...`): an HTTP request, one
inbound MQTT message. SQLite runs in WAL mode with a busy timeout so the MQTT thread and the HTTP workers can
write side by side; foreign keys are switched on for SQLite, which leaves them off by default. The schema comes
from the Alembic revisions in fleet/migrations (fleet/migrate.py runs them under a lock, so fleet processes that
start together on one database take turns). URLs: `sqlite:///path/fleet.db` (the default) or
`postgresql+psycopg://user:password@host:5432/dbname` (psycopg 3).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import ConfigError

from . import migrate

SQLITE_BUSY_TIMEOUT_MS = 10_000  # milliseconds a writer waits for another's lock before failing


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, upgrade: bool = True) -> Database:
    """The database at `url`, its schema brought to head first unless `upgrade` is False (`slmops fleet db`)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url {url!r} is not a database URL: {exc}") from exc
    if parsed.drivername == "postgresql":  # the driver slmops[fleet] installs (SQLAlchemy would pick psycopg2)
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, **kwargs)
    except (ImportError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"database_url {parsed.render_as_string(hide_password=True)!r} needs a driver that is not installed "
            f"({exc}): use sqlite:///... or postgresql+psycopg://... (pip install 'slmops[fleet]')"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if upgrade:
        try:
            migrate.upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
    return Database(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _wal(cur)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _wal(cur: Any) -> None:
    """Switch a new database to WAL. The switch needs the whole file: against another process's open write
    transaction (a fleet starting beside one that is migrating) SQLite may answer "database is locked" at once
    instead of waiting (each holds what the other needs), so try again, up to the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
