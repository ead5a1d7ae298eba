"""A Llama-family transformers model as one GGUF file (what llama.cpp and Ollama run), written with the `gguf`
package's writer the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama: the same metadata keys, tensor names,
the query/key rows permuted into llama.cpp's rotary layout, 1-D tensors (norms) in float32, and the tokenizer
(vocabulary, token types, merges, special tokens, chat template) from the model folder's `tokenizer.json`.

Two tensor types: `f16`, and `q8_0` (blocks of 32 weights, one f16 scale each; a matrix whose rows are not a
multiple of 32 stays f16, as llama.cpp does). Only what this writer knows is accepted: a `llama` model with no biases,
SiLU, plain RoPE (no scaling), and a byte-level BPE tokenizer whose pre-tokenizer is GPT-2's, SmolLM's or Llama 3's;
anything else is refused with what was found, before anything is written.

`gguf_problem(config, tokenizer_json)` reads only JSON, so the web process can ask it; `write_gguf` needs torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

GGUF_TYPES = ("f16", "q8_0")
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


class GGUFError(ValueError):
    """A model or tokenizer this writer cannot turn into a GGUF file, with what was found."""


def _byte_level(step: dict[str, Any], use_regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex and not step.get(
        "add_prefix_space", False)


def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (`tokenizer.ggml.pre`), or GGUFError."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"the tokenizer is {model.get('type') or 'unknown'} without a byte-level decoder; the GGUF "
                        "export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3) only")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _byte_level(steps[1], use_regex=True)):
        return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and str((steps[0].get("pattern") or {}).get("Regex", "")).startswith(_LLAMA3_SPLIT)
            and _byte_level(steps[1], use_regex=False)):
        return "llama-bpe"
    found = " + ".join(step.get("type", "?") for step in steps) or "none"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({found}) is not one the GGUF export knows (GPT-2's byte-level, "
                    "SmolLM's digits + byte-level, Llama 3's split + byte-level)")


def gguf_problem(config: dict[str, Any], tokenizer_json: Optional[dict[str, Any]]) -> Optional[str]:
    """Why this model (its `config.json` and `tokenizer.json` as dicts) cannot be written as GGUF, or None."""
    if config.get("model_type") != "llama":
        return (f"GGUF export is for Llama-family models (model_type llama); this one is "
                f"{config.get('model_type') or 'of unknown type'}: export it as merged instead")
    unsupported = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']}")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope scaling {(config.get('rope_scaling') or rope).get('rope_type', '?')}")
    if unsupported:
        return f"this Llama has {', '.join(unsupported)}, which the GGUF export does not write: export it as merged"
    if tokenizer_json is None:
        return "the model folder has no tokenizer.json, which the GGUF export reads the vocabulary from"
    try:
        tokenizer_pre(tokenizer_json)
    except GGUFError as error:
        return str(error)
    return None


def _permute(weights, heads: int):
    """transformers' q/k rows → llama.cpp's rotary layout (the inverse of what transformers' GGUF reader undoes)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their types in id order, padded to the model's vocabulary as llama.cpp pads (`[PADn]`, unused)."""
    import gguf

    by_id = {index: token for token, index in tokenizer_json["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in tokenizer_json.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(by_id)}, past the model's vocabulary of {vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model, tokenizer_dir: Path, path: Path, gguf_type: str, name: str) -> dict[str, Any]:
    """Write `model` (a transformers LlamaForCausalLM, merged) and the tokenizer saved in `tokenizer_dir` to the
    GGUF file `path`; return `{"tensors": n, "types": {type: count}, "size_bytes": n}`."""
    import gguf
    import numpy as np
    import torch

    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"unknown GGUF type {gguf_type!r}: expected {' or '.join(GGUF_TYPES)}")
    config = model.config.to_dict()
    tokenizer_json = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    problem = gguf_problem(config, tokenizer_json)
    if problem:
        raise GGUFError(problem)
    c = model.config
    heads, kv_heads, layers = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    tokens, types = _vocabulary(tokenizer_json, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    counts: dict[str, int] = {}
    written = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied: llama.cpp uses token_embd, and transformers' reader ties when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"no GGUF name for the model's tensor {hf_name}: the GGUF export writes plain Llamas")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        if data.ndim == 1:
            kind = gguf.GGMLQuantizationType.F32
        elif gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
        else:
            kind = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(np.ascontiguousarray(data), kind)
        writer.add_tensor(gguf_name, packed, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        written += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"tensors": written, "types": counts, "size_bytes": Path(path).stat().st_size}


def ollama_modelfile(gguf_file: str, chat_template: Optional[str], eos_token: Optional[str]) -> str:
    """An Ollama `Modelfile` for the GGUF file beside it. A ChatML template (SmolLM2's, the tiny model's) gets its Go
    template spelled out; any other is left to Ollama, which reads the chat template stored in the GGUF file."""
    lines = ["# Ollama: `ollama create NAME -f Modelfile` in this folder, then `ollama run NAME`.",
             f"FROM ./{gguf_file}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',  # system messages are in .Messages
                  "{{ .Content }}<|im_end|>",
                  "{{ end }}<|im_start|>assistant", '"""',
                  'PARAMETER stop "<|im_end|>"']
    elif eos_token:
        lines.append(f"PARAMETER stop {json.dumps(eos_token)}")
    return "\n".join(lines) + "\n"
