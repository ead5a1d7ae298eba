"""The web app's configuration, read from the environment in this one place."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# The data folder and the runs folder are read where they are defined; the app's modules find them here too.
from storage.settings import data_dir
from workers.settings import SettingError, positive_int, runs_dir  # noqa: F401 (runs_dir: for the app's modules)


def host() -> str:
    """MORA_HOST: 127.0.0.1 unless told otherwise; binding wider is the operator's explicit choice."""
    return os.environ.get("MORA_HOST", "127.0.0.1")


def port() -> int:
    return positive_int("MORA_PORT", 7860, maximum=65535)


def auth() -> Optional[tuple[str, str]]:
    """MORA_AUTH=user:password turns on the login page."""
    value = os.environ.get("MORA_AUTH", "")
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SettingError("MORA_AUTH must be user:password")
    return user, password


def max_upload_mb() -> int:
    return positive_int("MORA_MAX_UPLOAD_MB", 512)


def datasets_dir() -> Path:
    return data_dir() / "datasets"


def logs_dir() -> Path:
    return data_dir() / "logs"


def presets_dir() -> Path:
    return data_dir() / "presets"


def exports_dir() -> Path:
    return data_dir() / "exports"


def allowed_hosts() -> list[str]:
    """MORA_ALLOWED_HOSTS: comma-separated extra names the studio answers to (name or name:port; '*' for any), besides
    127.0.0.1, localhost and [::1] at MORA_PORT and MORA_HOST; a request naming another host gets 403."""
    names = [name.strip() for name in os.environ.get("MORA_ALLOWED_HOSTS", "").split(",") if name.strip()]
    for name in names:
        if "/" in name or "@" in name or " " in name:
            raise SettingError(f"MORA_ALLOWED_HOSTS: {name!r} is not a host name; give names or name:port, without "
                             "scheme or path (e.g. studio.example.com,10.0.0.5:7860)")
    return names


def upload_cache_s() -> int:
    """MORA_UPLOAD_CACHE_S (default 3600): Gradio's copies of uploads older than this are deleted, checked as often."""
    return positive_int("MORA_UPLOAD_CACHE_S", 3600)
