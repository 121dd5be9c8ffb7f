import os

import pytest

for _var in ("ORT_DISABLE_TELEMETRY", "OLIVE_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_models"]


# ---- databases: SQLite always, PostgreSQL where installed (required when CI is set) ---------------------------

DB_BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):  # type: ignore[no-untyped-def]
    """A test that asks for `db_url`, or is marked `both_databases`, runs once per backend (ids sqlite/postgresql)."""
    wants = "db_url" in metafunc.fixturenames or metafunc.definition.get_closest_marker("both_databases")
    if wants and "db_backend" in metafunc.fixturenames:
        metafunc.parametrize("db_backend", DB_BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """Admin URL of a PostgreSQL server for this test session: SLMOPS_TEST_POSTGRES_URL, else a throwaway cluster
    (tests/pg.py) started once and stopped at the end. Missing PostgreSQL skips, except under CI, where it fails."""
    given = os.environ.get("SLMOPS_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    from tests.pg import PgServer

    server = PgServer.find()
    if server is None:
        why = "PostgreSQL is not installed (no /usr/lib/postgresql/<major>/bin/initdb): apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the PostgreSQL tests (.ci/run installs it)", pytrace=False)
        pytest.skip(why)
    server.start()
    try:
        yield server.admin_url
    finally:
        server.stop()


@pytest.fixture
def db_backend(request) -> str:  # type: ignore[no-untyped-def]
    """"sqlite" unless the test is parametrised over both backends (see pytest_generate_tests)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def backend_url(db_backend: str, tmp_path, request):  # type: ignore[no-untyped-def]
    """A URL of an empty database of `db_backend`: a SQLite file in tmp_path, or a new PostgreSQL database that is
    dropped after the test."""
    if db_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet-test.db'}"
        return
    from tests.pg import fresh_database

    url, drop = fresh_database(request.getfixturevalue("postgres"))
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def db_url(backend_url: str) -> str:
    """An empty database on SQLite and, in a second run of the test, on PostgreSQL."""
    return backend_url
