"""Alembic's entry point: migrate the connection `storage.db.migrate` hands over, or the configured URL."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from storage.models import Base

config = context.config


def run_migrations(connection) -> None:
    # Batch mode lets a later migration alter a column on SQLite, which has almost no ALTER TABLE.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run_migrations(config.attributes["connection"])
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as connection:
        run_migrations(connection)
