"""The Runs tab's export: pick a format, click Export, download one zip.

The web process imports no torch, so the export is made by the utility worker (`workers.export.start_export`) into
`$MORA_DATA_DIR/exports/`, one at a time per worker; this view waits for it and hands the file to a `gr.File`, which
Gradio serves from that folder only (the app's `allowed_paths`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import redis
from kombu.exceptions import OperationalError

from app import settings
from app.service import ServiceError, StudioService
from storage.repo import StorageError
from workers.api import WorkerUnavailable

CHOICES = [
    ("merged: a transformers folder (transformers, vLLM)", "merged"),
    ("adapter: the adapter folder (peft format for LoRA, mora for MoRA)", "adapter"),
    ("lora: an exact LoRA, peft format (vLLM, LoRA servers)", "lora"),
    ("gguf f16: llama.cpp, Ollama", "gguf:f16"),
    ("gguf q8_0: llama.cpp, Ollama, half the size", "gguf:q8_0"),
]
_FAILURES = (ServiceError, StorageError, WorkerUnavailable, redis.RedisError, OperationalError, OSError)


def parse_choice(choice: str) -> tuple[str, str]:
    """"gguf:q8_0" → ("gguf", "q8_0"); "merged" → ("merged", "f16") (the GGUF type is not used then)."""
    format, _, gguf_type = (choice or "").partition(":")
    return format, gguf_type or "f16"


def export_run(service: StudioService, run_id: Optional[str], choice: str) -> Iterator[tuple[str, Optional[str]]]:
    """(message, file path or None) as the export goes: a note that it started, then the file or the reason."""
    if not run_id:
        yield "Choose a run first.", None
        return
    format, gguf_type = parse_choice(choice)
    yield (f"Exporting run `{run_id}` as {choice} on a worker… (a merged, LoRA or GGUF export loads the model: "
           f"seconds for a small one, about a minute for a 1B model)"), None
    try:
        reply = service.export_download(run_id, format, gguf_type)
    except _FAILURES as error:
        yield f"⚠️ {error}", None
        return
    if "error" in reply:
        yield f"⚠️ {reply['error']}", None
        return
    path = Path(reply["path"]).resolve()
    if path.parent != settings.exports_dir().resolve() or not path.is_file():
        yield f"⚠️ the worker's file {path} is not in {settings.exports_dir()}; nothing to download", None
        return
    yield f"{reply['summary']}: **{path.name}**, download it below", str(path)
