"""Engines and schema migration.

SQLite is the default store, written by the web process while the UI reads it, so every connection runs in WAL mode
(readers never block the writer) with a busy timeout (a second writer waits instead of failing), and foreign keys on
(SQLite ignores ON DELETE otherwise). sqlite3's own transaction handling is switched off so that SQLAlchemy emits the
BEGIN: a plain BEGIN for reads, BEGIN IMMEDIATE for writes, so a read-then-write unit takes the write lock first and
cannot fail half way with "database is locked".

The schema is migrated with Alembic on open, from `storage/migrations/`, with the configuration built here: no
alembic.ini is needed on disk, so an installed package migrates its own database.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Optional

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text

from storage import settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
WRITE = {"storage_write": True}
"""Execution options for a unit of work that writes: on SQLite it begins with BEGIN IMMEDIATE."""

# synchronous=NORMAL is SQLite's advice for WAL: no fsync per commit, still never corrupt; a power cut may lose the
# last commits, which the collector writes again when it replays the streams (every write it makes is idempotent).
# busy_timeout comes first, so that the pragmas after it wait for another connection instead of failing (the WAL
# switch still can fail at once, so it is retried: see _WAL_SWITCH_TRIES).
_SQLITE_PRAGMAS = ("PRAGMA busy_timeout=5000", "PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=ON",
                   "PRAGMA synchronous=NORMAL")
_WAL_SWITCH_TRIES = 100
"""Switching a new file to WAL needs it alone, and SQLite answers "database is locked" at once (no busy wait) when
other connections opening the same new file at that moment hold it: the switch is retried for up to about 5 s."""
# Any constant shared by every process; it serialises two stores migrating the same PostgreSQL database at once.
_MIGRATION_LOCK_KEY = 0x6D6F7261


def create_store_engine(url: Optional[str] = None) -> Engine:
    """An engine for `url` (default: MORA_DB_URL), set up as the module docstring says; does not migrate."""
    parsed = make_url(url or settings.db_url())
    engine = create_engine(parsed)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            _create_private_file(Path(database).expanduser())
        _configure_sqlite(engine)
    return engine


def _create_private_file(database: Path) -> None:
    """The SQLite file readable by its owner only (0600), in a new folder 0700: it holds every run, dataset name and
    chat. SQLite gives the -wal and -shm files the mode of the database file, so they are 0600 too. An empty file is
    what SQLite makes of a new database anyway."""
    if not database.parent.exists():
        database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(database, 0o600)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            _execute_pragma(cursor, pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection) -> None:
        writes = connection.get_execution_options().get("storage_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _execute_pragma(cursor, pragma: str) -> None:
    for attempt in range(_WAL_SWITCH_TRIES):
        try:
            cursor.execute(pragma)
            return
        except sqlite3.OperationalError as error:
            if "journal_mode" not in pragma or "locked" not in str(error) or attempt == _WAL_SWITCH_TRIES - 1:
                raise
            time.sleep(0.05)


def alembic_config(url: Optional[str] = None) -> Config:
    """The Alembic configuration in code; also what a developer passes to `alembic.command.revision`."""
    config = Config()
    # ConfigParser interpolates '%', which may appear in a path or a password.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("sqlalchemy.url", (url or settings.db_url()).replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; a no-op when it is there already.

    Runs in one transaction that first takes a lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL),
    so two processes opening a new database at once migrate it once.
    """
    with engine.connect().execution_options(**WRITE) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config = alembic_config(engine.url.render_as_string(hide_password=False))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
