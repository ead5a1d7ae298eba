"""Dataset uploads: validate, copy under a generated name inside the data folder, record in the store.

An upload is validated before anything is stored, so a bad file leaves the store and the data folder as they were;
the file is stored under a name we generate (never the user's), so an upload can never escape the datasets folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from storage.records import DatasetRecord
from storage.repo import Store
from workers.data_readers import FORMATS, DatasetError
from workers.data_schemas import inspect_dataset
from workers.formatting import format_bytes


@dataclass
class UploadResult:
    dataset: Optional[DatasetRecord]
    message: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ingest_upload(store: Store, datasets_dir: Path, uploaded: Path, original_name: str,
                  max_bytes: Optional[int] = None) -> UploadResult:
    """Check an uploaded file and keep it; every refusal is a message naming the file and the problem, and leaves
    the datasets folder and the store as they were. The uploaded file itself is the caller's (see `discard_upload`)."""
    display = Path(original_name).name or "upload"
    suffix = Path(display).suffix.lower()
    if suffix not in FORMATS:
        return UploadResult(None, f"{display}: unsupported file type {suffix or '(none)'}; "
                                  f"upload one of {', '.join(FORMATS)}")
    size = Path(uploaded).stat().st_size
    if max_bytes is not None and size > max_bytes:
        return UploadResult(None, f"{display}: {format_bytes(size)} is over the {format_bytes(max_bytes)} "
                                  "limit on an upload; raise MORA_MAX_UPLOAD_MB to accept it")
    datasets_dir.mkdir(parents=True, exist_ok=True)
    staged = datasets_dir / f".{uuid.uuid4().hex}{suffix}"
    try:  # whatever happens, the staged copy goes: only a recorded dataset leaves a file in the folder
        shutil.copyfile(uploaded, staged)
        try:
            info = inspect_dataset(staged)
        except DatasetError as error:
            return UploadResult(None, str(error).replace(staged.name, display).replace(str(staged), display))
        sha256 = _sha256(staged)
        existing = store.find_dataset_by_hash(sha256)
        if existing is not None:
            return UploadResult(existing, f"{display} is already stored as '{existing.name}' ({existing.rows} rows)")
        final = datasets_dir / f"{uuid.uuid4().hex}{suffix}"
        staged.rename(final)
        try:
            dataset = store.add_dataset(
                name=Path(display).stem, path=str(final), original_filename=display, sha256=sha256,
                file_format=info.file_format, schema=info.schema, rows=info.rows, columns=list(info.columns),
                preview=[_jsonable(row) for row in info.preview_rows], size_bytes=size,
            )
        except BaseException:
            final.unlink(missing_ok=True)
            raise
    finally:
        staged.unlink(missing_ok=True)
    return UploadResult(dataset, f"{display}: {info.rows} rows, {info.file_format}, {info.schema} format")


def discard_upload(uploaded: Path) -> None:
    """Delete the web server's temporary copy of an upload once it is ingested, accepted or refused (a kept
    dataset has its own copy), and its folder if that is left empty, so uploads do not pile up in the temp dir."""
    uploaded.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        uploaded.parent.rmdir()


def _jsonable(row: dict) -> dict:
    return {str(k): (v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v))
            for k, v in row.items()}


def delete_dataset(store: Store, dataset_id: int) -> str:
    dataset = store.delete_dataset(dataset_id)
    Path(dataset.path).unlink(missing_ok=True)
    return f"deleted {dataset.name}"


def datasets_rows(store: Store) -> list[list]:
    return [[d.id, d.name, d.file_format, d.schema, d.rows, format_bytes(d.size_bytes),
             d.created_at.strftime("%Y-%m-%d %H:%M")] for d in store.list_datasets()]


def preview_html(examples: list[list[tuple[str, bool]]]) -> str:
    """Rendered examples with the trained tokens highlighted; text is escaped, so a dataset can't inject markup."""
    blocks = []
    for index, segments in enumerate(examples, start=1):
        spans = "".join(
            f'<span class="trained">{html.escape(text)}</span>' if trained else html.escape(text)
            for text, trained in segments)
        blocks.append(f'<div class="example"><div class="example-title">example {index}</div><pre>{spans}</pre></div>')
    legend = '<p class="legend"><span class="trained">highlighted</span>: tokens the loss is computed on</p>'
    return legend + "".join(blocks) if blocks else "<p>No examples to show.</p>"
