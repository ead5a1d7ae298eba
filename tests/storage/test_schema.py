"""The database itself: migrations, the SQLite connection settings, configuration, and what `storage` imports."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from storage import settings
from storage.db import MIGRATIONS_DIR, alembic_config, create_store_engine
from storage.models import Base
from storage.repo import Store

TABLES = {"datasets", "runs", "metric_points", "run_logs", "artifacts", "chat_sessions", "chat_messages", "votes",
          "stream_positions", "evaluations", "evaluation_examples", "evaluation_answers", "evaluation_scores"}


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_open_migrates_every_table_once(store_url, caplog):
    with caplog.at_level(logging.INFO, logger="alembic"):
        Store(store_url).close()
    assert "Running upgrade  -> 0001" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alembic"):
        with Store(store_url) as reopened:
            assert reopened.list_runs() == []
    assert "Running upgrade" not in caplog.text

    engine = create_store_engine(store_url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [_head()]
            # The hand-written migrations and the models describe the same schema.
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        # The unique constraint doubles as the index that curve reads (run, name, ordered by step) use.
        unique = inspect(engine).get_unique_constraints("metric_points")
        assert [constraint["column_names"] for constraint in unique] == [["run_id", "name", "step"]]
        # The database itself refuses an unknown status, whoever writes it.
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO runs (id, name, tags, config, model, adapter, r, status, status_message, created_at,"
                " step, cancel_requested) VALUES ('x', 'x', '[]', '{}', 'm', 'lora', 8, 'done', '', :now, 0, false)"),
                {"now": datetime.now(timezone.utc)})
    finally:
        engine.dispose()


def test_reopening_keeps_data(store_url):
    with Store(store_url) as first:
        run_id = first.create_run({}, name="kept", model="m", adapter="lora", r=4).id
    with Store(store_url) as second:
        assert second.get_run(run_id).name == "kept"


def _four_stores_open_and_write_at_once(url: str) -> list[Exception]:
    """Four threads each open a Store on `url` and write one run; the errors they met. None may stay stuck."""
    errors = []

    def open_and_write(writer):
        try:
            with Store(url) as store:
                store.create_run({}, name=f"opened by {writer}", model="m", adapter="lora", r=4)
        except Exception as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=open_and_write, args=(writer,), daemon=True) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a writer is stuck"
    return errors


def test_many_new_sqlite_files_opened_by_four_stores_at_once_never_report_locked(tmp_path):
    """Switching a new file to WAL fails at once with "database is locked" while another connection holds the file
    (SQLite does not wait there); one such race in 60 new files was common before the switch was retried."""
    for index in range(40):
        errors = _four_stores_open_and_write_at_once(f"sqlite:///{tmp_path / str(index) / 'studio.db'}")
        assert errors == [], f"file {index}: {errors}"


def test_two_stores_opening_a_new_database_at_once_migrate_it_once(store_url):
    assert _four_stores_open_and_write_at_once(store_url) == []
    with Store(store_url) as store:
        assert len(store.list_runs()) == 4


def test_migrations_ship_inside_the_package():
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "__init__.py").is_file() and (MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    assert _head() == "0002"


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'nested' / 'studio.db'}"
    Store(url).close()  # creates the missing folders
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


def test_default_url_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MORA_DB_URL", raising=False)
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "studio-data"))
    assert settings.db_url() == f"sqlite:///{tmp_path / 'studio-data' / 'studio.db'}"
    with Store() as store:
        store.create_run({}, name="default", model="m", adapter="lora", r=2)
    assert (tmp_path / "studio-data" / "studio.db").is_file()
    monkeypatch.setenv("MORA_DB_URL", "sqlite:///elsewhere.db")
    assert settings.db_url() == "sqlite:///elsewhere.db"


def test_unsupported_database_is_refused():
    with pytest.raises(ValueError, match="url: the store supports sqlite and postgresql, not 'mysql'"):
        Store("mysql://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="url: "):
        Store("not a url")


def test_importing_the_store_does_not_import_torch():
    code = ("import sys, storage.repo; "
            "heavy = [m for m in ('torch', 'transformers', 'gradio', 'celery', 'mora', 'workers', 'app') "
            "if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
