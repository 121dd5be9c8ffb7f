"""A throwaway PostgreSQL server for tests: `SLMOPS_TEST_POSTGRES_URL` when set, else a fresh cluster started with
the installed `initdb`/`pg_ctl` on a free loopback port (as user `postgres` when run as root), stopped afterwards.
`postgres_url()` is a context manager yielding a SQLAlchemy URL (psycopg 3), or None with the reason it cannot."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slmops.story import free_port


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


@contextlib.contextmanager
def postgres_url() -> Iterator[tuple[str | None, str]]:
    """(url, "") or (None, why not)."""
    given = os.environ.get("SLMOPS_TEST_POSTGRES_URL")
    if given:
        yield given, ""
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield None, "psycopg is not installed"
        return
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        yield None, "PostgreSQL (initdb, pg_ctl) is not installed"
        return
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
    work = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
    data, port = work / "data", free_port()
    if as_user:
        shutil.chown(work, "postgres")
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "slmops", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(work / "log"), "-w", "-t", "30", "-o",
                        f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        yield None, f"could not start a PostgreSQL server: {exc}"
        return
    try:
        yield f"postgresql+psycopg://slmops@127.0.0.1:{port}/postgres", ""
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
