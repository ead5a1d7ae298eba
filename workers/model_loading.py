"""Loading a model from the registry: safetensors only, no remote code, never the hub."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

from workers.default_model import ensure_default_model
from workers.models import ModelError, resolve_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(name_or_path: Union[str, os.PathLike, None] = None, dtype: Union[str, "torch.dtype", None] = None,
               device: str = "cpu", quantization: str = "none") -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a model and its tokenizer from a local folder: safetensors only, no remote code, never the hub.

    `dtype` None keeps the dtype on disk. The default model is converted first if it has not been yet.
    `quantization` nf4 or int8: the linear layers held by bitsandbytes on `device` (a CUDA device), computing in
    `dtype` (workers.quantization); refused with the reason where that cannot be."""
    info = resolve_model(name_or_path)
    if not info.prepared:
        ensure_default_model()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    quantized = {}
    if quantization != "none":
        from workers import quantization as quant

        quant.require_backend(quantization)
        quantized = {"quantization_config": quant.bnb_config(quantization, dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype="auto" if dtype is None else dtype,
                                                     local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True, **quantized)
    except Exception as error:  # any failure here is a property of the folder the user chose
        raise ModelError(f"{info.path}: cannot load the model ({type(error).__name__}: {error})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True, trust_remote_code=False)
    except Exception as error:
        raise ModelError(f"{info.path}: cannot load the tokenizer ({type(error).__name__}: {error})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    contiguous_head_input(model)
    return (model if quantized else model.to(device)), tokenizer  # a quantised model is placed as it loads


def contiguous_head_input(model) -> None:
    """Hand the output head a contiguous input.

    transformers computes only the last positions' logits (`logits_to_keep`: a generation's prefill, the evaluation's
    teacher-forced pass) from `hidden[:, -n:]`, a strided view; torch's CPU matmul then multiplies it as a batched
    product against the head's weight expanded per row, at SmolLM2's 49,152-word head 7-10x slower than the same
    product on a contiguous copy (32 rows: 211 against 29 ms for the last position, 604 against 56 ms for the last
    three). The copy is a few rows of hidden state; a tensor that is already contiguous passes through untouched."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)
