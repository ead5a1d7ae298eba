"""The store's configuration, read from the environment in this one place (ARCHITECTURE.md, "Configuration").

Both are functions rather than constants, so a value set after import (a test, a CLI flag) still takes effect.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """MORA_DATA_DIR (default ./data): the studio's data folder (datasets, runs, adapters, models, logs, and the
    SQLite file unless MORA_DB_URL says otherwise), shared between hosts when scaling out. Read here only: this module
    imports nothing but the standard library, so the workers' and the web app's settings take it from here."""
    return Path(os.environ.get("MORA_DATA_DIR", "data")).expanduser().resolve()


def db_url() -> str:
    """MORA_DB_URL (default sqlite:///$MORA_DATA_DIR/studio.db): any SQLAlchemy URL for SQLite or PostgreSQL."""
    return os.environ.get("MORA_DB_URL") or f"sqlite:///{data_dir() / 'studio.db'}"
