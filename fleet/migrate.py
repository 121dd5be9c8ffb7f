"""Schema migrations of the fleet database (Alembic, configured in code; the scripts live in fleet/migrations/).

Workflow: `open_database` calls `upgrade(engine)` before anything else touches the database. `upgrade` takes the
migration lock and opens one transaction (`_locked`), then:
  1. reads the current revision (the `alembic_version` table);
  2. none, but the fleet's tables are there: a database made by an older fleet with `create_all`. Its columns are
     checked against revision 0001 (built on a scratch in-memory SQLite) and it is stamped at 0001;
  3. runs every revision up to head in that same transaction and commits.
The lock makes two fleet processes starting on one empty database take turns: on PostgreSQL a transaction-level
advisory lock (`pg_advisory_xact_lock`, released at commit or rollback); on SQLite `BEGIN IMMEDIATE` (the database's
write lock, waited for up to the busy timeout). The second process then finds the schema at head and does nothing.
PostgreSQL and SQLite both run DDL inside transactions, so a failed upgrade leaves the database as it was.

`current`, `history` and `new_revision` back `slmops fleet db current|history|revision` (fleet/db_cli.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, inspect

from .errors import SchemaError

SCRIPT_LOCATION = "fleet:migrations"  # package resource: ships inside the wheel, no alembic.ini needed
BASELINE = "0001"  # the schema every fleet made with create_all before migrations existed
LEGACY_MARKER_TABLE = "devices"  # present without alembic_version: an older fleet's database
PG_LOCK_KEY = 0x736C6D6F7073  # "slmops" in ASCII: the advisory lock every fleet process migrates under


@dataclass(frozen=True)
class Upgrade:
    """What one `upgrade` did: the revision before (None: empty or legacy database), after, and whether a legacy
    create_all database was stamped at the baseline first."""

    before: str | None
    after: str | None
    stamped_legacy: bool


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    message: str


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code: the packaged scripts, and the connection env.py migrates on."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this fleet knows."""
    heads = ScriptDirectory.from_config(config()).get_heads()
    if len(heads) != 1:  # two revisions with the same down_revision: a merge left two branches
        raise SchemaError(f"fleet/migrations has {len(heads)} heads {heads}: give one revision the other as down_revision")
    return heads[0]


def history() -> list[Revision]:
    """Every revision, oldest first."""
    scripts = ScriptDirectory.from_config(config())
    revs = [
        Revision(r.revision, r.down_revision if isinstance(r.down_revision, str) else None, (r.doc or "").strip())
        for r in scripts.walk_revisions()
    ]
    return list(reversed(revs))


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty database or one made by an older fleet (see `upgrade`)."""
    with engine.connect() as conn:
        return _current(conn)


def upgrade(engine: Engine, revision: str = "head") -> Upgrade:
    """Bring the database to `revision` (default: head) under the migration lock; see the module docstring."""
    with _locked(engine) as conn:
        before = _current(conn)
        legacy = before is None and inspect(conn).has_table(LEGACY_MARKER_TABLE)
        cfg = config(conn)
        try:
            if legacy:
                _check_legacy(conn)
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, revision)
        except CommandError as exc:
            raise SchemaError(
                f"cannot migrate the database from revision {before!r} to {revision!r}: {exc}; a revision this fleet "
                "does not know was written by a newer slmops: run that version, or restore a backup"
            ) from exc
        return Upgrade(before=before, after=_current(conn), stamped_legacy=legacy)


def new_revision(message: str, *, engine: Engine | None = None, autogenerate: bool = True) -> Path:
    """Write a new revision script into fleet/migrations/versions (a source checkout): with `autogenerate`, the
    difference between fleet/models.py and `engine`'s database (which must be at head). Returns its path."""
    number = f"{len(history()) + 1:04d}"
    if engine is None or not autogenerate:
        script = command.revision(config(), message=message, rev_id=number)
    else:
        with engine.connect() as conn:
            script = command.revision(config(conn), message=message, autogenerate=True, rev_id=number)
    assert script is not None and not isinstance(script, list)
    return Path(script.path)


def compare(engine: Engine) -> list[object]:
    """Differences between fleet/models.py and the database (alembic autogenerate's diff; empty: they agree)."""
    from alembic.autogenerate import compare_metadata

    from .models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")
        elif dialect == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite starts no transaction for DDL on its own
        else:
            conn.begin()
        yield conn
        conn.commit()  # an exception skips this; closing the connection rolls back (and frees the lock)


def _columns(conn: Connection) -> dict[str, set[str]]:
    found = inspect(conn)
    return {t: {c["name"] for c in found.get_columns(t)} for t in found.get_table_names() if t != "alembic_version"}


def _check_legacy(conn: Connection) -> None:
    """Refuse to stamp a create_all database that lacks tables or columns of the baseline revision."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.connect() as s:
            command.upgrade(config(s), BASELINE)
            want = _columns(s)
    finally:
        scratch.dispose()
    have = _columns(conn)
    missing = sorted(f"{t}.{c}" for t, cols in want.items() for c in cols - have.get(t, set()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SchemaError(
            f"the database has an older fleet's tables but lacks {shown} of revision {BASELINE}: it predates the "
            "fleet this baseline was taken from; export what you need and start from an empty database"
        )
