"""Small request/reply calls that the utility worker answers for the web process, which never imports torch or
transformers: what needs a tokenizer or a model's definition is computed here. They have their own queue and worker
process (started with every chat worker), so they never wait behind a generation.

`handle(kind, payload)` returns a JSON-able dict; a problem the user can fix comes back as `{"error": message}`.

- `"preview"`, payload `{path, model, max_length, n}`: the first `n` training examples as the model will see them,
  `{"examples": [[[text, trained], ...], ...], "has_chat_template": bool}` (see `workers.data.preview`).
- `"budget"`, payload `{model, r, variant, target_modules}` (variant and target_modules optional): trainable
  parameters of MoRA and of LoRA at the same r, in total and per layer, from the model's config alone (the model
  is built on the meta device: no weight is read).
- `"export"`, payload `{export_id, request}`: start exporting a run into the data folder's exports/ (a zip for the
  Runs tab to offer as a download); `{"started": export_id}` at once, the result later on `export_id`'s reply list
  (see `workers.export.start_export`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

import mora
from workers import bus
from workers.data import preview
from workers.data_readers import DatasetError
from workers.default_model import ensure_default_model
from workers.export import start_export
from workers.models import ModelError, ModelInfo, resolve_model

log = logging.getLogger(__name__)

_tokenizers: dict[tuple[Path, float], Any] = {}
_budgets: dict[tuple[Path, float, int, str, str], dict[str, Any]] = {}


class PayloadError(ValueError):
    """A call whose payload lacks a field or has one of the wrong type."""


def handle(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Answer one call; every error a user can act on is returned as `{"error": message}`."""
    handler = HANDLERS.get(kind)
    if handler is None:
        return {"error": f"unknown call {kind!r}: the calls are {', '.join(sorted(HANDLERS))}"}
    try:
        return handler(payload if isinstance(payload, dict) else {})
    except (PayloadError, DatasetError, ModelError) as error:
        return {"error": str(error)}


def _field(payload: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    value = payload.get(key, default)
    if value is ... or (value is None and default is ...):
        raise PayloadError(f"the payload needs {key!r}")
    if value is not None and not isinstance(value, kinds):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise PayloadError(f"{key!r} must be {expected}, found {type(value).__name__}")
    return value


def _model(name: Any) -> ModelInfo:
    info = resolve_model(name)
    if not info.prepared:
        ensure_default_model()
    return info


def _config_mtime(folder: Path) -> float:
    return (folder / "config.json").stat().st_mtime


def tokenizer_for(name: Any):
    """The model's tokenizer, loaded once per model folder (again if the folder changes)."""
    folder = _model(name).path
    key = (folder, _config_mtime(folder))
    if key not in _tokenizers:
        from transformers import AutoTokenizer

        try:
            _tokenizers[key] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as error:  # any failure here is a property of the folder
            raise ModelError(f"{folder}: cannot load the tokenizer ({type(error).__name__}: {error})") from error
    return _tokenizers[key]


def preview_examples(payload: dict[str, Any]) -> dict[str, Any]:
    path = _field(payload, "path", (str,))
    max_length, n = _field(payload, "max_length", (int,), 512), _field(payload, "n", (int,), 3)
    tokenizer = tokenizer_for(_field(payload, "model", (str,), None))
    examples = preview(path, tokenizer, max_length=max_length, n=n)
    return {"examples": [[[text, trained] for text, trained in segments] for segments in examples],
            "has_chat_template": bool(getattr(tokenizer, "chat_template", None))}


def parameter_budget(payload: dict[str, Any]) -> dict[str, Any]:
    info = _model(_field(payload, "model", (str,), None))
    r = _field(payload, "r", (int,))
    target_modules = payload.get("target_modules")
    try:
        config = mora.MoRAConfig(r=r, variant=_field(payload, "variant", (str, int), None),
                                 target_modules=target_modules)
    except ValueError as error:
        raise PayloadError(str(error)) from error
    key = (info.path, _config_mtime(info.path), r, config.variant, json.dumps(target_modules))
    if key not in _budgets:
        _budgets[key] = _budget(info, config)
    return _budgets[key]


def _budget(info: ModelInfo, config: mora.MoRAConfig) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = info.path
    try:
        model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:  # transformers raises several kinds; all mean the config cannot be built
        raise ModelError(f"{folder}: cannot build the model from config.json ({type(error).__name__}: {error})") \
            from error
    base_parameters = sum(p.numel() for p in model.parameters())
    try:
        mora.add_adapter(model, "budget", config)
    except ValueError as error:  # no layer matches target_modules
        raise PayloadError(str(error)) from error
    layers = []
    for path, layer in mora.adapted_layers(model).items():
        adapter = layer.adapters["budget"]
        layers.append({"layer": path, "in_features": layer.in_features, "out_features": layer.out_features,
                       "r_hat": adapter.r_hat, "mora_parameters": sum(p.numel() for p in adapter.parameters()),
                       "lora_parameters": adapter.lora_equivalent_parameters()})
    return {"model": info.name, "r": config.r, "variant": config.variant, "base_parameters": base_parameters,
            "mora_parameters": sum(row["mora_parameters"] for row in layers),
            "lora_parameters": sum(row["lora_parameters"] for row in layers), "layers": layers}


HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "preview": preview_examples,
    "budget": parameter_budget,
    "export": start_export,  # answers at once; the export runs on a thread of this worker (workers.export)
}


def run_queued_utility(url: str, request_id: str, kind: str, payload: dict[str, Any]) -> None:
    """Answer a call from the queue onto its reply list. An unexpected failure is replied too, so the caller hears
    of it at once instead of waiting for its timeout."""
    try:
        reply = handle(kind, payload)
    except Exception as error:
        log.exception("utility call %r failed", kind)
        reply = {"error": f"{kind} failed ({type(error).__name__}: {error})"}
    bus.push_reply(bus.connect(url), request_id, reply)
