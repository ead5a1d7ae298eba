"""Every storage test runs twice: on a real SQLite file and on PostgreSQL.

SQLite gets a new file in tmp_path each time. PostgreSQL gets one throwaway database per test session, dropped at the
end: `store_url` is a fresh, empty schema in it, for the tests of migration itself, and `store` is one migrated schema
shared by the session and emptied before each test (creating the tables costs PostgreSQL about 0.4 s, emptying them
5 ms).

Without a reachable server the PostgreSQL half is skipped, with the reason; with MORA_REQUIRE_POSTGRES=1 it fails
instead, so CI cannot pass unnoticed without it. MORA_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test)
names the server, and a database there to connect to while creating the throwaway one.
"""
from __future__ import annotations

import os
import secrets
from urllib.parse import quote

import pytest

from storage.db import create_store_engine
from storage.models import Base
from storage.repo import Store

ADMIN_URL = os.environ.get("MORA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


def _sqlalchemy_url(libpq_url: str, database: str) -> str:
    server = libpq_url.split("://", 1)[1].rsplit("/", 1)[0]
    return f"postgresql+psycopg://{server}/{database}"


@pytest.fixture(scope="session")
def postgres_database():
    """The SQLAlchemy URL of a new database, or a skip (a failure under MORA_REQUIRE_POSTGRES=1) saying why not."""
    import psycopg

    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=2)
    except psycopg.Error as error:
        reason = f"PostgreSQL not reachable at {ADMIN_URL} ({str(error).strip().splitlines()[0]})"
        if os.environ.get("MORA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and MORA_REQUIRE_POSTGRES=1 requires it", pytrace=False)
        pytest.skip(f"{reason}; set MORA_REQUIRE_POSTGRES=1 to make this a failure")
    database = f"mora_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        try:
            yield _sqlalchemy_url(ADMIN_URL, database)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _new_schema(base_url: str) -> str:
    import psycopg

    schema = f"test_{secrets.token_hex(4)}"
    with psycopg.connect(base_url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base_url}?options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, request, tmp_path) -> str:
    """A URL to an empty, never migrated database of each backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'studio.db'}"
    return _new_schema(request.getfixturevalue("postgres_database"))


@pytest.fixture(scope="session")
def postgres_store(postgres_database):
    """(the shared store, an engine on its schema to empty it with)."""
    url = _new_schema(postgres_database)
    engine = create_store_engine(url)
    with Store(url) as opened:
        yield opened, engine
    engine.dispose()


@pytest.fixture
def store(backend, request, tmp_path):
    """An open, migrated, empty store of each backend."""
    if backend == "sqlite":
        with Store(f"sqlite:///{tmp_path / 'data' / 'studio.db'}") as opened:
            yield opened
        return
    shared, engine = request.getfixturevalue("postgres_store")
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    yield shared


@pytest.fixture
def run(store):
    """A queued run to hang points, logs and artifacts on."""
    return store.create_run({"learning_rate": 2e-4, "seed": 0}, name="mora r8", model="tiny-llama", adapter="mora",
                            r=8, variant="sharing")
