"""A model's layer shapes from its folder's `config.json` alone, and what follows from them: MoRA's r̂ per layer and
the MoRA/LoRA parameter budget.

The web process needs these figures (the Train tab's budget table, the memory estimate before launch) and must
import no torch, and asking a worker made them wait behind its queue. r̂ comes from `mora.variants`, which imports
no torch either. Only the Llama layout is described (Llama, Mistral, Qwen2, SmolLM2: q, k, v, o, gate, up, down in
each block); for any other `model_type`, `read_shapes` returns None and the caller asks a worker, which builds the
model on the meta device.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from workers.models import DEFAULT_MODEL_NAME, ModelError, resolve_model
from mora.variants import default_variant, r_hat
from workers.train_config import canonical_variant

LLAMA_LIKE = ("llama", "mistral", "qwen2")
_MAX_CONFIG_BYTES = 10_000_000


@dataclass(frozen=True)
class ModelShapes:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: Optional[int]
    tie_word_embeddings: bool
    attention_bias: bool = False

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> list[tuple[str, int, int]]:
        """`(path, in_features, out_features)` of every linear layer inside the blocks, in the model's own order
        (the adapters' default targets; the LM head is not one)."""
        h, f, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.kv_size
        block = (("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                 ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, f), ("mlp.up_proj", h, f), ("mlp.down_proj", f, h))
        return [(f"model.layers.{i}.{name}", k, d) for i in range(self.num_layers) for name, k, d in block]

    @property
    def parameters(self) -> int:
        """Every weight of the model: embeddings, the blocks' linears and norms, the final norm and (untied) head."""
        linears = sum(k * d for _, k, d in self.linear_layers())
        biases = self.num_layers * (self.num_heads * self.head_dim + 2 * self.kv_size) if self.attention_bias else 0
        norms = (2 * self.num_layers + 1) * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return linears + biases + norms + embeddings


# SmolLM2-135M-Instruct's config.json, so the default model's figures show before its one-time conversion.
DEFAULT_MODEL_SHAPES = ModelShapes(
    name=DEFAULT_MODEL_NAME, model_type="llama", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)


def read_shapes(folder: Path, name: str = "") -> Optional[ModelShapes]:
    """The shapes in `folder/config.json`, or None when the architecture is not Llama-like; a config that cannot
    be read raises ModelError naming the folder."""
    path = Path(folder) / "config.json"
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelError(f"{path}: {path.stat().st_size:,} bytes is too large for a model config")
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read the model config ({error})") from error
    if not isinstance(config, dict) or config.get("model_type") not in LLAMA_LIKE:
        return None
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelShapes(
            name=name or Path(folder).name, model_type=config["model_type"], hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=int(config["vocab_size"]),
            max_position_embeddings=_optional_int(config.get("max_position_embeddings")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config["model_type"] == "qwen2")))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path}: a Llama-like config needs hidden_size, intermediate_size, num_hidden_layers, "
                         f"num_attention_heads and vocab_size as numbers ({type(error).__name__}: {error})") from error


def _optional_int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shapes_for(model: Optional[str]) -> Optional[ModelShapes]:
    """The shapes of a model by name or folder (None: the default model, even before its conversion); None when
    its architecture is not described here. Raises ModelError for an unknown model."""
    info = resolve_model(model)
    if info.is_default and not info.prepared:
        return DEFAULT_MODEL_SHAPES
    return read_shapes(info.path, info.name)


def _targeted(path: str, target_modules: Optional[Sequence[str]]) -> bool:
    """As `mora.inject.matches_target` for a list of names: the last part of the path, or a dotted suffix."""
    return target_modules is None or any(path == name or path.endswith("." + name) for name in target_modules)


def parameter_budget(shapes: ModelShapes, r: int, variant: Optional[str] = None,
                     target_modules: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """What `workers.utility.parameter_budget` answers (the same keys and figures), from the shapes alone."""
    variant = canonical_variant(variant) if variant is not None else default_variant(r)
    layers = []
    for path, k, d in shapes.linear_layers():
        if _targeted(path, target_modules):
            side = r_hat(k, d, r, variant)
            layers.append({"layer": path, "in_features": k, "out_features": d, "r_hat": side,
                           "mora_parameters": side * side, "lora_parameters": (k + d) * r})
    if not layers:
        raise ModelError(f"target_modules: no layer of {shapes.name} matches {list(target_modules or [])}")
    return {"model": shapes.name, "r": r, "variant": variant, "base_parameters": shapes.parameters,
            "mora_parameters": sum(row["mora_parameters"] for row in layers),
            "lora_parameters": sum(row["lora_parameters"] for row in layers), "layers": layers}
