"""The workers' configuration, read from the environment in this one place (ARCHITECTURE.md, "Configuration")."""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """MORA_DATA_DIR (default ./data): datasets, runs and adapters; shared between hosts when scaling out."""
    return Path(os.environ.get("MORA_DATA_DIR", "data")).expanduser().resolve()


def models_dir() -> Path:
    """MORA_MODELS_DIR (default $MORA_DATA_DIR/models): local transformers folders, one per model."""
    configured = os.environ.get("MORA_MODELS_DIR")
    return Path(configured).expanduser().resolve() if configured else data_dir() / "models"


def runs_dir() -> Path:
    return data_dir() / "runs"


def redis_url() -> str | None:
    """REDIS_URL: the broker and event bus shared by every host. Unset, the embedded Redis of a running
    `mora-studio up` on this data folder (its address is in the data folder), so `submit`, `cancel`... find it."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    published = embedded_redis_file()
    return published.read_text().strip() or None if published.exists() else None


def embedded_redis_file() -> Path:
    return data_dir() / "redis.url"


def worker_gpus() -> list[str]:
    """MORA_GPUS (set by `mora-studio worker --gpus`): the GPU indices this worker host trains on."""
    value = os.environ.get("MORA_GPUS", "").strip()
    return [g for g in value.split(",") if g]
