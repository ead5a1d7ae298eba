"""The store's configuration, read from the environment in this one place (ARCHITECTURE.md, "Configuration").

Both are functions rather than constants, so a value set after import (a test, a CLI flag) still takes effect.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """MORA_DATA_DIR (default ./data): where the SQLite file lives unless MORA_DB_URL says otherwise."""
    return Path(os.environ.get("MORA_DATA_DIR", "data")).expanduser().resolve()


def db_url() -> str:
    """MORA_DB_URL (default sqlite:///$MORA_DATA_DIR/studio.db): any SQLAlchemy URL for SQLite or PostgreSQL."""
    return os.environ.get("MORA_DB_URL") or f"sqlite:///{data_dir() / 'studio.db'}"
