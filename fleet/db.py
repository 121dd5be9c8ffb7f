"""Engine and sessions: `open_database(url)` makes the engine, creates missing tables and returns a session factory.

Callers open one short session per unit of work (`with factory() as s, s.begin(): ...`): an HTTP request, one
inbound MQTT message. SQLite runs in WAL mode with a busy timeout so the MQTT thread and the HTTP workers can
write side by side; foreign keys are switched on for SQLite, which leaves them off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from protocol.errors import ConfigError

from .models import Base

SQLITE_BUSY_TIMEOUT_MS = 10_000  # milliseconds a writer waits for another's lock before failing


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url {url!r} is not a database URL: {exc}") from exc
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return Database(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
