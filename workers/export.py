"""Exports: a finished run's result in the forms other tools load.

- `merged`: a plain transformers folder (safetensors, config, generation config, tokenizer, chat template) with the
  adapter merged into the weights: `AutoModelForCausalLM.from_pretrained`, vLLM, TGI, any transformers tool. A run
  that saved a whole model (full fine-tuning, ReMoRA) is that folder, copied.
- `adapter`: the run's adapter folder as a zip: peft's LoRA format for LoRA, the `mora` format for MoRA.
- `lora`: a LoRA folder in peft's format. A MoRA adapter of the sharing family is written as an exact LoRA of rank
  r̂ (`mora.lora_export`); a LoRA run's adapter is itself. Refused, with the reason, where no LoRA can hold the
  update: rope and decouple (block-diagonal, up to n·r̂), full fine-tuning and ReMoRA (full-rank).
- `gguf`: one GGUF file, f16 or q8_0, of the merged model (Llama family) with its tokenizer and chat template, and an
  Ollama `Modelfile` beside it (`workers.gguf_writer`).

The command line writes to the `--out` the user names (`export_to`); the Runs tab asks the utility worker
(`start_export`, a utility call) to write one zip into `$MORA_DATA_DIR/exports/` for the browser to download
(`export_for_download`), one export at a time per worker, refusing the next while one runs. Either way: every check
that needs no model (the run, the format, the output path) runs first; the export is written into a hidden sibling
and renamed at the end, so a failure leaves nothing half-written; an existing output is replaced only with `force`,
and then only if it is a file, an empty folder or an earlier export (it holds `mora_export.json`); nothing is ever
written inside, or over, the run's folder or the base model's. Merged and LoRA exports check themselves before they
are kept: the exported weights give the adapted model's logits on a probe prompt.

This module imports no torch until an export runs, so the web process can build requests with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from workers.formatting import format_bytes
from workers.gguf_writer import GGUF_TYPES, GGUFError, gguf_problem, ollama_modelfile
from workers.models import ModelError, resolve_model
from workers.settings import data_dir, redis_url

log = logging.getLogger(__name__)

FORMATS = {
    "merged": "a transformers folder with the adapter merged (transformers, vLLM, TGI)",
    "adapter": "the adapter folder as a zip (peft format for LoRA, the mora format for MoRA)",
    "lora": "an exact LoRA in peft format (vLLM and other LoRA servers; MoRA of the sharing family)",
    "gguf": "a GGUF file and an Ollama Modelfile (llama.cpp, Ollama; Llama-family models)",
}
MARKER = "mora_export.json"
MAX_CONCURRENT_EXPORTS = 1  # per worker process: an export holds a whole model in memory
PROBE_TEXT = "The capital of France is Paris. Translate to French: thank you."
CHECK_TOLERANCE = 1e-3  # float32 merge or factorisation; measured differences are about 1e-6 (README, "Export")
_EXPORT_NAME = "export"


class ExportError(ValueError):
    """An export that cannot be made, with what to do instead; one line for the user."""


@dataclass(frozen=True)
class ExportRequest:
    """Everything an export needs to know about a run, as plain values (it crosses the queue as JSON)."""

    run_id: str
    run_name: str
    run_dir: str
    output_dir: str
    output_kind: str
    """"adapter" (base + adapter folder) or "model" (a whole model: full fine-tuning, ReMoRA)."""
    base_model: Optional[str]
    adapter: str
    variant: Optional[str]
    remora: bool
    format: str
    gguf_type: str = "f16"
    quantization: str = "none"
    """The base the adapter trained on: none, or nf4/int8 (workers.quantization), which an export dequantises."""

    @classmethod
    def from_dict(cls, values: Any) -> "ExportRequest":
        if not isinstance(values, dict):
            raise ExportError(f"an export request is a mapping, got {type(values).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(values) - {"gguf_type", "quantization"})
        if missing:
            raise ExportError(f"the export request lacks {', '.join(missing)}")
        request = cls(**{key: values[key] for key in names if key in values})
        for key in ("run_id", "run_name", "run_dir", "output_dir", "output_kind", "adapter"):
            if not isinstance(getattr(request, key), str):
                raise ExportError(f"the export request's {key} must be a string")
        check_format(request.format, request.gguf_type)
        return request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        return f"{self.format}" + (f" ({self.gguf_type})" if self.format == "gguf" else "")


@dataclass
class ExportResult:
    path: str
    format: str
    size_bytes: int
    files: list[str]
    check: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        checked = ""
        if "max_abs_logit_difference" in self.check:
            checked = (f"; checked: logits within {self.check['max_abs_logit_difference']:.1e} of the adapted "
                       f"model's")
        return f"wrote {self.path} ({format_bytes(self.size_bytes)}: {', '.join(self.files)}){checked}"


# ---- checks that need no model --------------------------------------------------------------------------------

def check_format(format: Any, gguf_type: Any = "f16") -> None:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: the formats are {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}: expected {' or '.join(GGUF_TYPES)}")


def request_for_run(run, format: str, gguf_type: str = "f16") -> ExportRequest:
    """The request for a stored run (a `storage.records.RunRecord`): only a succeeded run with its result on disk."""
    check_format(format, gguf_type)
    if run.status != "succeeded":
        raise ExportError(f"run {run.id} ({run.name}) is {run.status}; only a succeeded run can be exported")
    if not run.output_dir or not Path(run.output_dir).is_dir():
        raise ExportError(f"run {run.id} ({run.name}) has no result folder on disk (expected {run.output_dir})")
    kind = run.output_kind or ("model" if Path(run.output_dir).name == "model" else "adapter")
    config = run.config or {}
    return ExportRequest(run_id=run.id, run_name=run.name, run_dir=run.run_dir or str(Path(run.output_dir).parent),
                         output_dir=run.output_dir, output_kind=kind, base_model=config.get("model") or run.model or None,
                         adapter=run.adapter, variant=run.variant, remora=bool(config.get("remora_steps")),
                         format=format, gguf_type=gguf_type, quantization=config.get("quantization") or "none")


def _base_folder(request: ExportRequest) -> Optional[Path]:
    """The base model's folder, or None for a default model not converted yet (it is, when the export loads it)."""
    try:
        info = resolve_model(request.base_model)
    except ModelError as error:
        raise ExportError(str(error)) from None
    return info.path if info.prepared else None


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def preflight(request: ExportRequest) -> None:
    """What can be refused before a model loads: formats that do not fit this run, and folders that are gone."""
    whole = request.output_kind == "model"
    how = "ReMoRA" if request.remora else "full fine-tuning"
    if request.format == "adapter" and whole:
        raise ExportError(f"run {request.run_id} ({how}) saved a whole model, not an adapter: export it as merged "
                          f"or gguf")
    if request.format == "lora" and whole:
        reason = ("ReMoRA folded a new update into the base weights at every restart, so the sum is not one rank-r̂ "
                  "product" if request.remora else "full fine-tuning changes every weight, a full-rank update")
        raise ExportError(f"run {request.run_id}: no LoRA holds this update ({reason}); merge it instead "
                          f"(format merged or gguf)")
    if request.format == "lora" and request.adapter == "mora":
        from mora.lora_export import lora_problem

        problem = lora_problem(request.variant or "sharing")
        if problem:
            raise ExportError(f"run {request.run_id}: {problem}")
    if request.format == "gguf":
        folder = Path(request.output_dir) if whole else _base_folder(request)
        if folder is not None:
            problem = gguf_problem(_read_json(folder / "config.json") or {}, _read_json(folder / "tokenizer.json"))
            if problem:
                raise ExportError(f"run {request.run_id}: {problem}")
    if not whole:
        _base_folder(request)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_path(request: ExportRequest, out: Path) -> Path:
    """Where the export goes: `out` itself, or `out.zip` for the adapter zip when `out` has no .zip suffix."""
    out = Path(out).expanduser().resolve()
    if request.format == "adapter" and out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    return out


def check_output(request: ExportRequest, out: Path, force: bool) -> None:
    """Refuse an output that exists (unless `force`, and then only a file, an empty folder or an earlier export),
    and any output inside or above the run's folder or the base model's."""
    protected = [("run", Path(request.run_dir).resolve()), ("run", Path(request.output_dir).resolve())]
    if request.output_kind != "model":
        base = _base_folder(request)
        if base is not None:
            protected.append(("base model", base.resolve()))
    for what, folder in protected:
        if _inside(out, folder):
            raise ExportError(f"{out} is inside the {what}'s folder {folder}; write the export somewhere else")
        if _inside(folder, out):
            raise ExportError(f"{out} holds the {what}'s folder {folder}; write the export somewhere else")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out} exists; pass --force to replace it, or choose another --out")
    if out.is_symlink() or (out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file()):
        raise ExportError(f"{out} is a folder that is not an earlier export (it has no {MARKER}); refusing to "
                          f"replace it: choose another --out")


# ---- writing ----------------------------------------------------------------------------------------------------

def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp"


def _replace(staging: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    staging.rename(out)


def _marker(request: ExportRequest, check: dict[str, Any], extra: dict[str, Any]) -> str:
    return json.dumps({"format": request.format, "gguf_type": request.gguf_type if request.format == "gguf" else None,
                       "run_id": request.run_id, "run_name": request.run_name, "adapter": request.adapter,
                       "variant": request.variant, "base_model": request.base_model, "check": check,
                       "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}, indent=2) + "\n"


def _copy_files(source: Path, target: Path) -> None:
    """The regular files of a saved folder (an adapter, a whole model); links and subfolders are not followed."""
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and not item.is_symlink():
            shutil.copy2(item, target / item.name)


def _load(request: ExportRequest):
    """(model, tokenizer, adapter name or None): the run's whole model, or its base with the adapter loaded."""
    import mora
    from workers.model_loading import load_model

    try:
        if request.output_kind == "model":
            model, tokenizer = load_model(request.output_dir)
            return model.eval(), tokenizer, None
        if request.quantization == "none":
            model, tokenizer = load_model(request.base_model)
        else:
            model, tokenizer = _dequantized_base(request)
        name = mora.load_adapter(model, request.output_dir, name=_EXPORT_NAME)
    except (ModelError, mora.AdapterFormatError) as error:
        raise ExportError(f"run {request.run_id}: {error}") from None
    return model.eval(), tokenizer, name


def _dequantized_base(request: ExportRequest):
    """The base as the run's quantised training held it, dequantised to plain bfloat16 layers: merged onto it, the
    adapter gives exactly the function that trained (onto the original weights it would not)."""
    import torch

    from workers import quantization

    problem = quantization.backend_problem()
    if problem:
        raise ExportError(f"run {request.run_id} trained on a {request.quantization} base, which an export "
                          f"dequantises with bitsandbytes: {problem}; export it as format adapter, or from a GPU "
                          f"worker")
    model, tokenizer = load_model(request.base_model, dtype=torch.bfloat16, device="cuda:0",
                                  quantization=request.quantization)
    quantization.dequantize_model(model, torch.bfloat16)
    return model, tokenizer


def _logits(model, tokenizer):
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :64].to(model.device)
    with torch.no_grad():
        return model(ids).logits.float()


def _checked(before, after, what: str) -> dict[str, Any]:
    difference = (after - before).abs().max().item()
    scale = before.abs().max().item()
    if not difference <= CHECK_TOLERANCE * max(1.0, scale):
        raise ExportError(f"the {what} does not reproduce the adapted model (logits differ by {difference:.3g}); "
                          f"nothing was written")
    return {"max_abs_logit_difference": difference, "probe": PROBE_TEXT}


def _merged_model(request: ExportRequest):
    """(plain merged model, tokenizer, check): the adapter merged into the base, checked against the unmerged."""
    import mora

    model, tokenizer, name = _load(request)
    if name is None:
        return model, tokenizer, {}
    before = _logits(model, tokenizer)
    model = mora.merge_and_unload(model, [name])
    return model, tokenizer, _checked(before, _logits(model, tokenizer), "merged model")


def _write_merged(request: ExportRequest, folder: Path) -> dict[str, Any]:
    if request.output_kind == "model":
        _copy_files(Path(request.output_dir), folder)
        return {}
    model, tokenizer, check = _merged_model(request)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return check


def _write_lora(request: ExportRequest, folder: Path) -> dict[str, Any]:
    import mora

    if request.adapter == "lora":
        _copy_files(Path(request.output_dir), folder)
        return {}
    model, tokenizer, name = _load(request)
    before = _logits(model, tokenizer)
    try:
        info = mora.add_exact_lora(model, name, "lora")
    except mora.NotExactLoRA as error:
        raise ExportError(f"run {request.run_id}: {error}") from None
    mora.set_active_adapter(model, "lora")
    check = _checked(before, _logits(model, tokenizer), "LoRA")
    mora.save_adapter(model, "lora", folder, base_model_name_or_path=str(request.base_model or ""))
    return {**check, "lora_rank": info.r}


def _write_gguf(request: ExportRequest, folder: Path) -> dict[str, Any]:
    from workers.gguf_writer import write_gguf

    model, tokenizer, check = _merged_model(request)
    folder.mkdir(parents=True)
    tokenizer_dir = folder / ".tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)  # the writer reads tokenizer.json, merges and the chat template
    file_name = f"{_slug(request.run_name)}-{request.gguf_type}.gguf"
    try:
        info = write_gguf(model, tokenizer_dir, folder / file_name, request.gguf_type, request.run_name)
    except GGUFError as error:
        raise ExportError(f"run {request.run_id}: {error}") from None
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    (folder / "Modelfile").write_text(ollama_modelfile(file_name, tokenizer.chat_template, tokenizer.eos_token))
    return {**check, "gguf": {"file": file_name, **{k: v for k, v in info.items() if k != "size_bytes"}}}


_WRITERS = {"merged": _write_merged, "lora": _write_lora, "gguf": _write_gguf}


def _write_adapter_zip(request: ExportRequest, target: Path) -> dict[str, Any]:
    folder = Path(request.output_dir)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in sorted(folder.iterdir()):
            if item.is_file() and not item.is_symlink():
                archive.write(item, item.name)
        archive.writestr(MARKER, _marker(request, {}, {}))
    return {}


def zip_folder(folder: Path, target: Path) -> None:
    """A folder's files (one level: exports are flat) into one zip; weights are stored, text is deflated."""
    with zipfile.ZipFile(target, "w") as archive:
        for item in sorted(folder.iterdir()):
            stored = item.suffix in (".safetensors", ".gguf")
            archive.write(item, item.name, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _files(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(item.name for item in path.iterdir())
    with zipfile.ZipFile(path) as archive:
        return sorted(archive.namelist())


def _total_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.iterdir()) if path.is_dir() else path.stat().st_size


def export_to(request: ExportRequest, out: Path, force: bool = False, as_zip: bool = False) -> ExportResult:
    """Write the export at `out` (a folder; a zip for the adapter format, or for any format with `as_zip`)."""
    check_format(request.format, request.gguf_type)
    out = output_path(request, out) if not as_zip else Path(out).expanduser().resolve()
    try:
        check_output(request, out, force)
        preflight(request)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot write the export to {out}: {error.strerror or error}") from None
    staging = _staging(out)
    folder = staging.with_name(staging.name + "-dir") if as_zip and request.format != "adapter" else staging
    try:
        if request.format == "adapter":
            check = _write_adapter_zip(request, staging)
        else:
            check = _WRITERS[request.format](request, folder)
            (folder / MARKER).write_text(_marker(request, check, {}))
            if folder != staging:
                zip_folder(folder, staging)
        _replace(staging, out)
    except OSError as error:
        raise ExportError(f"cannot write the export to {out}: {error.strerror or error}") from None
    finally:
        for leftover in {staging, folder}:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
    return ExportResult(path=str(out), format=request.label, size_bytes=_total_size(out), files=_files(out),
                        check=check)


# ---- the Runs tab: one zip in the data folder, made by the utility worker ---------------------------------------

def exports_dir() -> Path:
    return data_dir() / "exports"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-_")[:60].strip("-_") or "run"


def download_path(request: ExportRequest) -> Path:
    """`$MORA_DATA_DIR/exports/<run name>-<run id>-<format>.zip`: one file per run and format, replaced when the
    same export is made again, so repeated clicks do not fill the disk."""
    suffix = f"gguf-{request.gguf_type}" if request.format == "gguf" else request.format
    return exports_dir() / f"{_slug(request.run_name)}-{_slug(request.run_id)}-{suffix}.zip"


def _clear_stale_staging(folder: Path) -> None:
    """Remove hidden staging entries this host left behind in a process that has died (a killed worker)."""
    host = socket.gethostname()
    for item in folder.glob(".*.tmp*"):
        match = re.search(rf"\.{re.escape(host)}-(\d+)-", item.name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_for_download(request: ExportRequest) -> ExportResult:
    target = download_path(request)
    root = exports_dir().resolve()
    if target.resolve().parent != root:
        raise ExportError(f"the export would land outside {root}; refusing")
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale_staging(root)
    return export_to(request, target, force=True, as_zip=True)


_slots = threading.BoundedSemaphore(MAX_CONCURRENT_EXPORTS)
_running: dict[str, str] = {}


def start_export(payload: dict[str, Any]) -> dict[str, Any]:
    """The utility call `"export"`, payload `{"export_id": hex, "request": ExportRequest as a dict}`: checks what
    needs no model, then exports on a thread of this worker and pushes `ExportResult` as a dict (or `{"error"}`)
    onto the reply list of `export_id`. Answers at once `{"started": export_id}`, or `{"error": ...}`: a refused
    request, or another export already running here."""
    export_id = payload.get("export_id")
    if not isinstance(export_id, str) or not re.fullmatch(r"[0-9a-f]{32}", export_id):
        return {"error": "the export call needs an 'export_id' of 32 hex digits"}
    url = redis_url()
    if not url:
        return {"error": "this worker has no REDIS_URL to send the export's result on"}
    try:
        request = ExportRequest.from_dict(payload.get("request"))
        for folder in (request.run_dir, request.output_dir):
            if not _inside(Path(folder).resolve(), data_dir().resolve()):
                raise ExportError(f"run {request.run_id}'s folder {folder} is outside the data folder {data_dir()}; "
                                  f"refusing")
        preflight(request)
    except (ExportError, TypeError) as error:
        return {"error": str(error)}
    if not _slots.acquire(blocking=False):
        busy = ", ".join(_running.values()) or "another export"
        return {"error": f"this worker is already exporting ({busy}); one export at a time: try again when it "
                         f"finishes"}
    _running[export_id] = f"run {request.run_id} as {request.label}"
    threading.Thread(target=_export_and_reply, args=(url, export_id, request), daemon=True,
                     name=f"export-{export_id[:8]}").start()
    return {"started": export_id}


def _export_and_reply(url: str, export_id: str, request: ExportRequest) -> None:
    import gc

    from workers import bus

    try:
        reply = asdict(export_for_download(request))
        reply["summary"] = f"exported run {request.run_id} as {request.label}: {format_bytes(reply['size_bytes'])}"
    except ExportError as error:
        reply = {"error": str(error)}
    except Exception as error:  # replied, so the page hears of it at once instead of waiting for its timeout
        log.exception("export of run %s failed", request.run_id)
        reply = {"error": f"the export failed ({type(error).__name__}: {error})"}
    finally:
        _running.pop(export_id, None)
        _slots.release()
        gc.collect()  # the model is gone with the export's frames; give its memory back now
    bus.push_reply(bus.connect(url), export_id, reply)
