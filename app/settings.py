"""The web app's configuration, read from the environment in this one place."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# The data folder and the runs folder are read where they are defined; the app's modules find them here too.
from storage.settings import data_dir
from workers.settings import (SettingError, heartbeat_ttl_s, positive_int,  # noqa: F401 (runs_dir: for the app's modules)
                              runs_dir, worker_lost_after_s)


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


def api_keys() -> list[str]:
    """MORA_API_KEYS: comma-separated bearer tokens, one of which every OpenAI-compatible API request must carry
    (`Authorization: Bearer KEY`). Unset, the API answers only clients on this machine (loopback) and only while the
    studio has no login (MORA_AUTH)."""
    keys = [key.strip() for key in os.environ.get("MORA_API_KEYS", "").split(",") if key.strip()]
    for key in keys:
        if len(key) < 8 or not key.isascii() or not key.isprintable() or " " in key:
            raise SettingError("MORA_API_KEYS: each key must be at least 8 printable ASCII characters without spaces "
                               "(keys are comma-separated)")
    return keys


def api_max_body_kb() -> int:
    """MORA_API_MAX_BODY_KB (default 1024): the largest API request body; a larger one gets 413."""
    return positive_int("MORA_API_MAX_BODY_KB", 1024, maximum=65_536)


def api_max_pending() -> int:
    """MORA_API_MAX_PENDING (default 64): the most API requests the web process follows at once; past it, 429."""
    return positive_int("MORA_API_MAX_PENDING", 64, maximum=4096)


def check_web() -> None:
    """Reads every web setting once, so that a bad one is refused in about a second, before Gradio's two seconds of
    imports (and before `up` starts anything); each reader raises SettingError naming its variable."""
    for reader in (host, port, auth, max_upload_mb, allowed_hosts, upload_cache_s, api_keys, api_max_body_kb,
                   api_max_pending, worker_lost_after_s, heartbeat_ttl_s):  # the last: `up` hands it to its workers
        reader()
