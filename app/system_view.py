"""The System tab: which workers are connected and on what device, how long the queues are, what the data uses."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from storage.records import RunRecord
from storage.repo import TERMINAL_STATUSES
from workers import api
from workers.formatting import format_bytes

WORKER_COLUMNS = ("worker", "queues", "device", "memory", "last seen")
USAGE_COLUMNS = ("folder", "files", "size")
DISK_TTL_S = 30.0
"""A folder's size is measured at most this often: the tabs refresh every second or two, and a data folder of many
runs (full fine-tunes write gigabytes each) is too many files to walk that often."""


def folder_usage(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`, links not followed; a file that vanishes while it is walked is skipped."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                continue
    return files, size


class FolderSizes:
    """Folder sizes measured at most once per `ttl_s` each, and only once for a folder marked `fixed` (a finished
    run's, which nothing writes to any more)."""

    def __init__(self, ttl_s: float = DISK_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._measured: dict[Path, tuple[float, bool, tuple[int, int]]] = {}

    def usage(self, folder: Path, fixed: bool = False) -> tuple[int, int]:
        folder = Path(folder)
        now = self.clock()
        cached = self._measured.get(folder)
        if cached is not None and ((fixed and cached[1]) or now - cached[0] < self.ttl_s):
            return cached[2]
        measured = folder_usage(folder)
        self._measured[folder] = (now, fixed, measured)
        return measured

    def forget_except(self, folders: set[Path]) -> None:
        """Drop the folders no longer shown (deleted runs), so the cache stays as small as the runs table."""
        for folder in [f for f in self._measured if f not in folders]:
            del self._measured[folder]


RUN_SIZES = FolderSizes()
"""The web process's caches: run folders for the Runs tab, the data folder's folders for the System tab."""
DATA_SIZES = FolderSizes()


def run_disk_use(runs: Sequence[RunRecord], sizes: FolderSizes = RUN_SIZES) -> dict[str, int]:
    """Bytes in each run's folder (checkpoints, adapter, logs), by run id; a run with no folder yet is left out."""
    use = {}
    for run in runs:
        if run.run_dir and Path(run.run_dir).is_dir():
            use[run.id] = sizes.usage(Path(run.run_dir), fixed=run.status in TERMINAL_STATUSES)[1]
    sizes.forget_except({Path(r.run_dir) for r in runs if r.run_dir})
    return use


def workers_rows() -> list[list]:
    try:
        workers = api.workers()
    except Exception as error:  # Redis unreachable: say so in the table rather than failing the page
        return [[f"Redis unreachable: {error}", "", "", "", ""]]
    now = time.time()
    return [[w["name"], ", ".join(w.get("queues", [])), w.get("device", "?"), _memory(w.get("memory_gb")),
             f"{now - w.get('seen', now):.0f} s ago"] for w in workers]


def _memory(gib: object) -> str:
    """A worker reports its device's memory in GiB."""
    return format_bytes(gib * 2**30) if isinstance(gib, (int, float)) else "?"


def queues_markdown() -> str:
    try:
        lengths = api.queue_lengths()
    except Exception as error:
        return f"Queues: unavailable ({error})"
    return "Queued jobs — " + " · ".join(f"**{name}**: {count}" for name, count in lengths.items())


def data_folders(data_dir: Path) -> list[Path]:
    return sorted(p for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).is_dir() else []


def usage_rows(data_dir: Path, sizes: FolderSizes = DATA_SIZES) -> list[list]:
    """One row per folder of the data folder, then the whole data folder; columns as USAGE_COLUMNS."""
    if not Path(data_dir).is_dir():
        return []
    rows, total_files, total_size = [], 0, 0
    for entry in os.scandir(data_dir):  # the files beside the folders: the store, its WAL, the Redis files
        if entry.is_file(follow_symlinks=False):
            total_files, total_size = total_files + 1, total_size + entry.stat(follow_symlinks=False).st_size
    for folder in data_folders(data_dir):
        files, size = sizes.usage(folder)
        rows.append([folder.name, files, format_bytes(size)])
        total_files, total_size = total_files + files, total_size + size
    rows.append([f"total ({data_dir})", total_files, format_bytes(total_size)])
    return rows
