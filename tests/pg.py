"""A throwaway PostgreSQL server for the tests, and a fresh empty database per test.

Workflow: `PgServer.find()` locates Debian's PostgreSQL binaries (/usr/lib/postgresql/<major>/bin, newest first;
15 on this Debian), or returns None. `server.start()` runs initdb into a new temp folder and starts postgres on a
free loopback port, durability switched off (fsync, synchronous_commit, full_page_writes: a test cluster is
thrown away), `server.stop()` stops it and removes the folder. postgres refuses to run as root, so when euid is 0
every command runs as the `postgres` system user (`runuser -u postgres --`) and the folder is chowned to it.
`fresh_database(admin_url)` creates an empty database (CREATE DATABASE from template0; a few ms) and returns its
URL together with a callable that drops it; it works on this server's URL or on SLMOPS_TEST_POSTGRES_URL's.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from slmops.story import free_port

PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 30


@dataclass
class PgServer:
    bin_dir: Path
    folder: Path | None = None
    port: int = 0
    _as_postgres: list[str] = field(default_factory=list)

    @classmethod
    def find(cls) -> PgServer | None:
        """Debian's newest PostgreSQL (initdb, pg_ctl) on this machine, or None."""
        if not PG_ROOT.is_dir():
            return None
        majors = sorted((p for p in PG_ROOT.iterdir() if re.fullmatch(r"\d+", p.name)), key=lambda p: int(p.name))
        for major in reversed(majors):
            if (major / "bin" / "initdb").is_file() and (major / "bin" / "pg_ctl").is_file():
                return cls(bin_dir=major / "bin")
        return None

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C",
                  "--no-sync", "--no-instructions")
        self.port = free_port()
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.folder / "log"), "-o", options, "-w",
                  "-t", str(START_TIMEOUT_S), "start")

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def log_tail(self, chars: int = 2000) -> str:
        log = self.folder / "log" if self.folder else None
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as_postgres, str(self.bin_dir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30, cwd=self.folder)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-1500:]} {self.log_tail()}")


def fresh_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    """A new empty database on the server of `admin_url`: (its URL, a callable that drops it)."""
    name = f"t_{int(time.time())}_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        admin.dispose()

    def drop() -> None:
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            engine.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop
