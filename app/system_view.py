"""The System tab: which workers are connected and on what device, how long the queues are, what the data uses."""
from __future__ import annotations

import time
from pathlib import Path

from workers import api

WORKER_COLUMNS = ("worker", "queues", "device", "memory", "last seen")


def workers_rows() -> list[list]:
    try:
        workers = api.workers()
    except Exception as error:  # Redis unreachable: say so in the table rather than failing the page
        return [[f"Redis unreachable: {error}", "", "", "", ""]]
    now = time.time()
    return [[w["name"], ", ".join(w.get("queues", [])), w.get("device", "?"), f"{w.get('memory_gb', '?')} GiB",
             f"{now - w.get('seen', now):.0f} s ago"] for w in workers]


def queues_markdown() -> str:
    try:
        lengths = api.queue_lengths()
    except Exception as error:
        return f"Queues: unavailable ({error})"
    return "Queued jobs — " + " · ".join(f"**{name}**: {count}" for name, count in lengths.items())


def usage_rows(data_dir: Path) -> list[list]:
    rows = []
    for folder in sorted(p for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).exists() else []:
        files = [f for f in folder.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        rows.append([folder.name, len(files), f"{size / 2**20:,.1f} MiB"])
    return rows
