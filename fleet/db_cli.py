"""`slmops fleet db`: the fleet database's schema, for an operator who migrates explicitly.

    upgrade     bring the database to the newest revision (the fleet also does this when it starts)
    current     the database's revision, and whether it is the newest this slmops knows
    history     every revision this slmops ships, oldest first
    revision    write a new revision script from the difference between fleet/models.py and a database at head
                (developers, in a source checkout; see fleet/migrations/README.md)

The database is `--database-url`, else SLMOPS_FLEET_DATABASE_URL, else the SQLite file in the data folder, as
`slmops fleet serve` finds it. The work is done by fleet/migrate.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .cli import _errors, out

app = typer.Typer(help="The fleet database's schema: upgrade, current, history, revision.", no_args_is_help=True)
UrlOpt = Annotated[Optional[str], typer.Option(
    "--database-url", envvar="SLMOPS_FLEET_DATABASE_URL", show_default=False,
    help="SQLAlchemy URL: sqlite:///path/fleet.db or postgresql+psycopg://user:pw@host/db (env SLMOPS_FLEET_DATABASE_URL)")]
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="SLMOPS_FLEET_DATA_DIR", show_default=False,
    help="without --database-url: the fleet's data folder, whose fleet.db is used (default ./fleet-data)")]


def _url(database_url: str | None, data_dir: Path | None) -> str:
    if database_url:
        return database_url
    return f"sqlite:///{((data_dir or Path('./fleet-data')) / 'fleet.db').as_posix()}"


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return escape(make_url(url).render_as_string(hide_password=True))


@app.command()
def upgrade(database_url: UrlOpt = None, data_dir: DataOpt = None) -> None:
    """Bring the database's schema to the newest revision (under the migration lock)."""
    with _errors():
        from . import migrate
        from .db import open_database

        url = _url(database_url, data_dir)
        db = open_database(url, upgrade=False)
        try:
            done = migrate.upgrade(db.engine)
        finally:
            db.close()
        if done.stamped_legacy:
            out.print(f"found an older fleet's tables without a revision: stamped {migrate.BASELINE}")
        if done.before == done.after:
            out.print(f"{_shown(url)}: already at {done.after} (newest)")
        else:
            out.print(f"{_shown(url)}: upgraded {done.before or '(empty)'} -> {done.after}")


@app.command()
def current(database_url: UrlOpt = None, data_dir: DataOpt = None) -> None:
    """Print the database's revision; exit code 1 when it is behind the newest."""
    with _errors():
        from . import migrate
        from .db import open_database

        url = _url(database_url, data_dir)
        db = open_database(url, upgrade=False)
        try:
            rev = migrate.current(db.engine)
        finally:
            db.close()
        newest = migrate.head()
        state = "newest" if rev == newest else f"behind: run 'slmops fleet db upgrade' to reach {newest}"
        out.print(f"{rev or '(none)'} ({state})")
        if rev != newest:
            raise typer.Exit(1)


@app.command()
def history() -> None:
    """List the revisions this slmops ships, oldest first."""
    with _errors():
        from . import migrate

        for r in migrate.history():
            out.print(f"{r.down_revision or '(base)'} -> {r.revision}  {escape(r.message.splitlines()[0] if r.message else '')}")


@app.command()
def revision(
    message: Annotated[str, typer.Option("-m", "--message", help="what the revision changes, a few words")],
    database_url: UrlOpt = None,
    data_dir: DataOpt = None,
    empty: Annotated[bool, typer.Option(help="write an empty revision instead of comparing with the models")] = False,
) -> None:
    """Write fleet/migrations/versions/NNNN_<message>.py: what fleet/models.py has that the database (at head) lacks."""
    with _errors():
        from . import migrate
        from .db import open_database

        if empty:
            path = migrate.new_revision(message, autogenerate=False)
        else:
            db = open_database(_url(database_url, data_dir))  # at head first: the diff is then only the new models
            try:
                path = migrate.new_revision(message, engine=db.engine)
            finally:
                db.close()
        out.print(f"wrote {escape(str(path))}: read it, fix what autogenerate cannot see (renames, data), commit it")
