"""Schema migrations on real SQLite and real PostgreSQL: the revisions build exactly what fleet/models.py declares,
an older fleet's create_all database is stamped and upgraded with its rows kept, databases this fleet cannot
migrate are refused untouched, fleet processes starting together take turns, and `slmops fleet db` works."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from fleet import migrate
from fleet.db import open_database
from fleet.errors import SchemaError
from fleet.models import Base
from slmops.cli import build_app

from .conftest import NOW

ROOT = Path(__file__).resolve().parents[2]


def test_models_and_migrations_agree(db_url: str) -> None:
    """Fails when fleet/models.py changes without a revision (or a revision without the model): write one with
    `slmops fleet db revision -m '...'` (fleet/migrations/README.md)."""
    db = open_database(db_url)
    try:
        assert migrate.current(db.engine) == migrate.head()
        assert migrate.compare(db.engine) == []
        assert set(inspect(db.engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        db.close()


def test_every_revision_downgrades_and_upgrades_again(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            command.downgrade(migrate.config(conn), "base")
            conn.commit()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert migrate.upgrade(engine).after == migrate.head()
        assert migrate.compare(engine) == []
    finally:
        engine.dispose()


def _legacy(url: str, *, drop_column: str | None = None) -> None:
    """A database as an older fleet's create_all left it: the baseline's tables with a device in them, no
    alembic_version table."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            command.upgrade(migrate.config(conn), migrate.BASELINE)
            conn.commit()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
            conn.execute(text("INSERT INTO devices (id, registered_at, online, agent_version) VALUES ('old-1', :t, :f, '')"),
                         {"t": NOW.replace(tzinfo=None), "f": False})
            if drop_column:
                conn.execute(text(f"ALTER TABLE devices DROP COLUMN {drop_column}"))
    finally:
        engine.dispose()


def test_an_older_fleets_database_is_stamped_and_upgraded_with_its_rows(db_url: str) -> None:
    _legacy(db_url)
    engine = create_engine(db_url)
    try:
        done = migrate.upgrade(engine)
        assert (done.before, done.after, done.stamped_legacy) == (None, migrate.head(), True)
        assert migrate.compare(engine) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM devices")).scalars().all() == ["old-1"]
        again = migrate.upgrade(engine)
        assert (again.before, again.after, again.stamped_legacy) == (migrate.head(), migrate.head(), False)
    finally:
        engine.dispose()


def _state(url: str) -> tuple[list[str], set[str], list[str]]:
    engine = create_engine(url)
    try:
        found = inspect(engine)
        tables = sorted(found.get_table_names())
        columns = {c["name"] for c in found.get_columns("devices")}
        with engine.connect() as conn:
            versions = (conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
                        if "alembic_version" in tables else [])
        return tables, columns, versions
    finally:
        engine.dispose()


def _unknown_revision(url: str) -> None:
    _legacy(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
            conn.execute(text("INSERT INTO alembic_version VALUES ('9999')"))
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda url: _legacy(url, drop_column="revoked_at"), "lacks devices.revoked_at of revision 0001"),
        (_unknown_revision, "a revision this fleet does not know"),
    ],
    ids=["legacy_without_a_column", "revision_from_a_newer_fleet"],
)
def test_a_database_this_fleet_cannot_migrate_is_refused_untouched(db_url: str, make, message: str) -> None:
    make(db_url)
    before = _state(db_url)
    with pytest.raises(SchemaError, match=message):
        open_database(db_url)
    assert _state(db_url) == before


STARTER = """
import sys, time
from pathlib import Path
from fleet import migrate
from fleet.db import open_database
ready, go, url = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ready.touch()
while not go.exists():
    time.sleep(0.001)
db = open_database(url)
print(migrate.current(db.engine))
db.close()
"""


def test_fleet_processes_starting_together_on_an_empty_database_take_turns(db_url: str, tmp_path: Path) -> None:
    """Four fleet processes open one empty database at the same moment: each waits for the migration lock, one
    builds the schema, the others find it at head; none fails."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / f"ready-{i}"), str(go), db_url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(4)
    ]
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{i}").exists() for i in range(4)) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outcomes = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outcomes)] == [(0, migrate.head())] * 4, outcomes
    assert _state(db_url)[2] == [migrate.head()]


def test_the_db_commands_upgrade_and_report_the_revision(db_url: str) -> None:
    runner = CliRunner()

    def run(*args: str):
        argv = ["fleet", "db", *args]
        return runner.invoke(build_app(argv), argv)

    behind = run("current", "--database-url", db_url)
    assert behind.exit_code == 1 and "(none)" in behind.output and "slmops fleet db upgrade" in behind.output
    up = run("upgrade", "--database-url", db_url)
    assert up.exit_code == 0 and f"(empty) -> {migrate.head()}" in up.output
    now = run("current", "--database-url", db_url)
    assert now.exit_code == 0 and f"{migrate.head()} (newest)" in now.output
    assert "password" not in now.output
    listed = run("history")
    assert listed.exit_code == 0 and "(base) -> 0001" in listed.output
    assert [line.split()[2] for line in listed.output.splitlines()] == [r.revision for r in migrate.history()]


def test_deployments_made_before_rollouts_stay_each_devices_desired_bundle(db_url: str) -> None:
    """Revision 0003: a target an older fleet sent at once is marked released, so a device that comes back online
    after the upgrade is still sent its unfinished deployment."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            command.upgrade(migrate.config(conn), "0002")
            conn.commit()
        t = NOW.replace(tzinfo=None)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO devices (id, registered_at, online, agent_version) VALUES ('d', :t, :f, '')"),
                         {"t": t, "f": False})
            conn.execute(text("INSERT INTO deployments (id, bundle_name, bundle_version, target_kind, target_value, "
                              "created_at) VALUES ('dep1', 'tiny', 1, 'device', 'd', :t)"), {"t": t})
            conn.execute(text("INSERT INTO deployment_targets (deployment_id, device_id, state, detail, last_seq, "
                              "created_at, updated_at) VALUES ('dep1', 'd', 'pending', '', -1, :t, :t)"), {"t": t})
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    db = open_database(db_url)
    try:
        from fleet import crud

        with db.sessions() as s:
            target = crud.desired_target(s, device_id="d")
            assert target is not None and target.deployment_id == "dep1"
            assert target.released_at == NOW and target.attempts == 1 and target.wave is None
    finally:
        db.close()
