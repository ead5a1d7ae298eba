"""The model registry: which local transformers folders the studio can train and chat with.

Models are folders, never hub ids (ARCHITECTURE.md, "Models"). The registry lists the default model, every folder
in `models_dir()` that holds a `config.json`, and the folders a user added, recorded in `models_dir()/registry.json`.
Listing and resolving read only JSON and safetensors headers, so the web process lists models without importing
torch. Loading a model is `workers.model_loading`; the default model's one-time preparation (installing its PyPI
package and converting its GGUF file) is `workers.default_model`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from workers.formatting import format_parameters
from workers.settings import models_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# What the converted default model is, measured on it, so the registry can describe it before it exists.
_DEFAULT_MODEL_FACTS = dict(architecture="LlamaForCausalLM", parameters=134_515_008, context_length=8192,
                            has_chat_template=True, dtype="float32")

REGISTRY_NAME = "registry.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}
_MAX_HEADER_BYTES = 100_000_000


class ModelError(ValueError):
    """A model the studio cannot list, resolve or load, with the folder and what is wrong with it."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    architecture: str            # the transformers class, e.g. "LlamaForCausalLM"
    parameters: int              # counted from the safetensors headers, without loading a weight
    context_length: Optional[int]  # max_position_embeddings
    has_chat_template: bool
    is_default: bool
    prepared: bool               # False only for the default model before its one-time conversion
    dtype: str                   # of the weights on disk, e.g. "float32"


# ---- the registry -----------------------------------------------------------------------------------------------

def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def list_models() -> list[ModelInfo]:
    """The default model first, then the folders in `models_dir()`, then the ones the user added.

    A folder that cannot be used is left out with a warning in the log, so one broken folder never hides the rest;
    `resolve_model` on it says what is wrong."""
    models = []
    for name, path in _registered_paths().items():
        try:
            models.append(_describe(name, path))
        except ModelError as error:
            log.warning("model %r left out of the list: %s", name, error)
    return models


def resolve_model(name_or_path: Union[str, os.PathLike, None] = None) -> ModelInfo:
    """None → the default model; a name from `list_models()`; or a model folder."""
    if name_or_path is None:
        return _describe(DEFAULT_MODEL_NAME, default_model_dir())
    paths = _registered_paths()
    if str(name_or_path) in paths:
        return _describe(str(name_or_path), paths[str(name_or_path)])
    folder = Path(name_or_path).expanduser().resolve()
    if folder.is_dir():
        name = next((name for name, path in paths.items() if path == folder), folder.name)
        return _describe(name, folder)
    raise ModelError(f"unknown model {str(name_or_path)!r}: neither a model name nor a folder. "
                     f"Available: {', '.join(paths)}")


def add_model(path: Union[str, os.PathLike], name: Optional[str] = None) -> ModelInfo:
    """Check the folder at `path` and record it in the registry under `name` (default: the folder's name)."""
    folder = Path(path).expanduser().resolve()
    name = name or folder.name
    info = _describe(name, folder)
    _check_config_loads(folder)
    with exclusive_lock(_registry_file().with_suffix(".lock")):
        paths = _registered_paths()
        if name in paths:
            raise ModelError(f"the name {name!r} is taken (by {paths[name]}); choose another with name=...")
        already = next((known for known, known_path in paths.items() if known_path == folder), None)
        if already:
            raise ModelError(f"{folder} is already listed as {already!r}")
        added = _read_registry()
        added[name] = str(folder)
        _write_registry(added)
    return info


def remove_model(name: str) -> None:
    """Forget a model the user added; its folder stays untouched."""
    with exclusive_lock(_registry_file().with_suffix(".lock")):
        added = _read_registry()
        if name not in added:
            if name == DEFAULT_MODEL_NAME:
                raise ModelError(f"{name!r} is the default model; it cannot be removed")
            if (models_dir() / name / "config.json").is_file():
                raise ModelError(f"{name!r} is the folder {models_dir() / name}; delete the folder to remove it")
            raise ModelError(f"no added model named {name!r}. Added models: {', '.join(added) or 'none'}")
        del added[name]
        _write_registry(added)


def describe_models_table(models: list[ModelInfo]) -> str:
    """An aligned text table of `models` for the command line."""
    header = ("name", "architecture", "parameters", "context", "chat template", "dtype", "path")
    rows = [header]
    for model in models:
        path = str(model.path) if model.prepared else f"{model.path} (prepared on first use)"
        rows.append((model.name + (" (default)" if model.is_default else ""), model.architecture,
                     format_parameters(model.parameters), str(model.context_length or "?"),
                     "yes" if model.has_chat_template else "no", model.dtype, path))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "\n".join("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]])
                     for row in rows)


def _registered_paths() -> dict[str, Path]:
    """Every known name and its folder, in listing order; on a clash the first one wins."""
    paths = {DEFAULT_MODEL_NAME: default_model_dir()}
    folder = models_dir()
    if folder.is_dir():
        for candidate in sorted(folder.iterdir()):
            # Hidden folders are conversions in progress.
            if not candidate.name.startswith(".") and (candidate / "config.json").is_file():
                paths.setdefault(candidate.name, candidate)
    for name, path in _read_registry().items():
        if name in paths:
            log.warning("added model %r (%s) is hidden by %s of the same name", name, path, paths[name])
        else:
            paths[name] = Path(path)
    return paths


def _registry_file() -> Path:
    return models_dir() / REGISTRY_NAME


def _read_registry() -> dict[str, str]:
    file = _registry_file()
    if not file.is_file():
        return {}
    try:
        return {entry["name"]: entry["path"] for entry in json.loads(file.read_text())["models"]}
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{file} is damaged ({error}); fix it or delete it and add the models again") from error


def _write_registry(added: dict[str, str]) -> None:
    file = _registry_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    staging = file.with_suffix(".tmp")
    staging.write_text(json.dumps({"models": [{"name": n, "path": p} for n, p in added.items()]}, indent=2) + "\n")
    os.replace(staging, file)


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file`: other processes (and threads) wait until it is released."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# ---- describing a folder ----------------------------------------------------------------------------------------

def _describe(name: str, folder: Path) -> ModelInfo:
    """The ModelInfo of a model folder, or a ModelError naming the folder and what is missing from it."""
    is_default = folder == default_model_dir()
    if is_default and not folder.exists():
        return ModelInfo(name=name, path=folder, is_default=True, prepared=False, **_DEFAULT_MODEL_FACTS)
    config = _read_config(folder)
    weights = _read_safetensors_headers(_weight_files(folder))
    if not any((folder / file).is_file() for file in _TOKENIZER_FILES):
        raise ModelError(f"{folder}: no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    element_counts = Counter()
    for tensor in weights:
        element_counts[tensor["dtype"]] += math.prod(tensor["shape"])
    disk_dtype = element_counts.most_common(1)[0][0] if element_counts else "?"
    architectures = config.get("architectures") or [config["model_type"]]
    return ModelInfo(
        name=name, path=folder, architecture=architectures[0], parameters=sum(element_counts.values()),
        context_length=next((config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int)), None),
        has_chat_template=_has_chat_template(folder), is_default=is_default, prepared=True,
        dtype=_SAFETENSORS_DTYPES.get(disk_dtype, disk_dtype.lower()),
    )


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder")
    file = folder / "config.json"
    if not file.is_file():
        raise ModelError(f"{folder}: no config.json, so this is not a transformers model folder")
    try:
        config = json.loads(file.read_text())
    except (ValueError, OSError) as error:
        raise ModelError(f"{folder}: config.json is not readable JSON ({error})") from error
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"{folder}: config.json has no model_type, so transformers cannot tell what model it is")
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will load: `model.safetensors`, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text())["weight_map"].values()
        except (ValueError, KeyError, AttributeError) as error:
            raise ModelError(f"{folder}: model.safetensors.index.json is damaged ({error})") from error
        return [folder / shard for shard in sorted(set(shards))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickled = sorted(file.name for pattern in _PICKLED_WEIGHTS for file in folder.glob(pattern))
    if pickled:
        raise ModelError(f"{folder}: only pickled weights ({', '.join(pickled)}), which the studio never loads "
                         f"because unpickling can run code; save the model with "
                         f"save_pretrained(..., safe_serialization=True) to get model.safetensors")
    raise ModelError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def _read_safetensors_headers(files: list[Path]) -> list[dict]:
    """The tensor entries (dtype, shape) of each file's header; the weights themselves are never read."""
    tensors = []
    for file in files:
        try:
            with open(file, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > _MAX_HEADER_BYTES:
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(handle.read(size))
            tensors.extend(entry for key, entry in header.items() if key != "__metadata__")
        except FileNotFoundError as error:
            raise ModelError(f"{file.parent}: weight file {file.name} is missing") from error
        except (OSError, ValueError, struct.error, AttributeError) as error:
            raise ModelError(f"{file.parent}: {file.name} is not a readable safetensors file ({error})") from error
    return tensors


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _check_config_loads(folder: Path) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises several kinds; all mean the same thing to the user
        raise ModelError(f"{folder}: transformers cannot read config.json ({error})") from error
