"""MoRA's variants: one registry entry each, from which everything else derives.

A variant is a way to compress a layer's `k` inputs to `r̂` and decompress `r̂` outputs to `d` (MORA_SPEC.md §2).
Its entry says everything the rest of the code needs to know about it: its name, the reference implementation's type
number, whether `r̂` must be even, the grouping ReMoRA moves to after it, whether the paper's Table 4 ablates it,
and how it computes. The forward, the delta weight, the layers, ReMoRA, the config checks (here and in the studio),
the UI's choices and the ablation all read this table, so a new variant is one `register_variant` call.

This module imports no torch, so that code that only needs the names (a training config checked in the web process)
can import it. The computing parts are callables the entry holds:

- `compress(x, side)` → `[..., r̂]` and `decompress(z, out_features)` → `[..., d]`: the simple form,
  `branch = decompress(M · compress(x))`, enough for a new variant;
- or `forward(x, M, in_features, out_features)` → `[..., d]` for variants that are not of that form (rope uses a
  rotated copy of M per chunk);
- `delta(M, in_features, out_features)` → `ΔW`, optional: without it the delta weight is computed generically as
  the spec's `F(I_k)ᵀ`, the branch applied to the rows of the identity;
- `fused_add(result, x, M)` → `result + branch(x)`, optional: a faster path that adds into `result` in place;
- `stacks`: whether its own `forward` also takes several adapters' matrices stacked (`M` `[A, r̂, r̂]` against `x`
  `[A, N, k]`), so that rows of different adapters run as one batched product; the simple form always can.

The built-in variants' callables live in `mora.functional` (they need torch), which attaches them on import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

VariantName = Union[str, int]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    description: str
    reference_type: Optional[int] = None
    """The reference implementation's `mora_type`, which its users pass and its saved folders hold."""
    even_side: bool = False
    """True when dimension j pairs with j + r̂/2 (rotation), so r̂ is rounded down to an even number."""
    remora_next: Optional[str] = None
    """The grouping ReMoRA switches to after this one (MORA_SPEC.md §4); None: ReMoRA cannot use this variant."""
    ablation: Optional[int] = None
    """Its row in the paper's Table 4 (which compares compressions at small r), or None if the table has none."""
    per_chunk: bool = False
    """True when the branch cuts all k inputs into chunks of r̂ with one M per chunk instead of compressing them to
    r̂, so what it keeps for the backward grows with k, not r̂ (the memory estimate before launch reads it)."""
    compress: Optional[Callable[..., Any]] = None
    decompress: Optional[Callable[..., Any]] = None
    forward: Optional[Callable[..., Any]] = None
    delta: Optional[Callable[..., Any]] = None
    fused_add: Optional[Callable[..., Any]] = None
    stacks: bool = False
    """True when `forward` also takes stacked matrices (see the module's docstring); the simple form always does."""


_REGISTRY: dict[str, VariantSpec] = {}


def register_variant(spec: VariantSpec, replace_existing: bool = False) -> VariantSpec:
    """Add a variant (or, with `replace_existing`, redefine one); its name and type number must be new."""
    name = spec.name.strip().lower()
    if not name or name.isdigit():
        raise ValueError(f"a variant needs a name that is not a number, got {spec.name!r}")
    if name in _REGISTRY and not replace_existing:
        raise ValueError(f"a variant named {name!r} is already registered")
    taken = {v.reference_type: v.name for v in _REGISTRY.values() if v.name != name}
    if spec.reference_type is not None and spec.reference_type in taken:
        raise ValueError(f"reference type {spec.reference_type} is already {taken[spec.reference_type]!r}")
    if spec.remora_next is not None and spec.remora_next not in _REGISTRY and spec.remora_next != name:
        raise ValueError(f"{name}: ReMoRA successor {spec.remora_next!r} is not a registered variant")
    _REGISTRY[name] = replace(spec, name=name)
    return _REGISTRY[name]


def unregister_variant(name: str) -> None:
    """Remove a variant (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def attach(name: str, **parts: Any) -> None:
    """Set fields of a registered variant: how `mora.functional` gives the built-in ones their computing parts."""
    _REGISTRY[name] = replace(_REGISTRY[name], **parts)


def get_variant(variant: VariantName) -> VariantSpec:
    return _REGISTRY[normalize_variant(variant)]


def variant_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def reference_types() -> dict[int, str]:
    return {v.reference_type: v.name for v in _REGISTRY.values() if v.reference_type is not None}


def ablation_variants() -> tuple[str, ...]:
    """The variants of the paper's Table 4, in its order."""
    return tuple(v.name for v in sorted(_REGISTRY.values(), key=lambda v: v.ablation or 0) if v.ablation)


def remora_variants() -> tuple[str, ...]:
    return tuple(v.name for v in _REGISTRY.values() if v.remora_next is not None)


def _expected() -> str:
    return f"{', '.join(_REGISTRY)} or {', '.join(str(n) for n in sorted(reference_types()))}"


def normalize_variant(variant: VariantName) -> str:
    """A variant's name or the reference's type number (as an int or a string of digits) to its canonical name."""
    if isinstance(variant, bool):
        raise ValueError(f"unknown MoRA variant {variant!r}")
    if isinstance(variant, int) or (isinstance(variant, str) and variant.strip().isdigit()):
        number, types = int(variant), reference_types()
        if number not in types:
            raise ValueError(f"unknown MoRA type {number}: the reference types are {sorted(types)}")
        return types[number]
    name = str(variant).strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown MoRA variant {variant!r}: expected one of {_expected()}")
    return name


def reference_type(variant: VariantName) -> Optional[int]:
    """The reference implementation's `mora_type` for a variant, or None for the paper-only ablations."""
    return get_variant(variant).reference_type


def default_variant(r: int) -> str:
    """The paper's recommendation: rotation for small ranks, sharing for large ones (MORA_SPEC.md §5)."""
    return "rope" if r <= 32 else "sharing"


def r_hat(in_features: int, out_features: int, r: int, variant: VariantName = "sharing") -> int:
    """Side of M that spends LoRA's parameter budget `(k + d)·r`, rounded to nearest (even for rotation), §1."""
    if r < 1 or in_features < 1 or out_features < 1:
        raise ValueError(f"r, in_features and out_features must be positive, got {r}, {in_features}, {out_features}")
    side = int(math.floor(math.sqrt((in_features + out_features) * r) + 0.5))
    if get_variant(variant).even_side:
        side = max(2, side // 2 * 2)
    return side


def mora_parameter_count(in_features: int, out_features: int, r: int, variant: VariantName = "sharing") -> int:
    """Trainable parameters of one MoRA layer (`r̂²`)."""
    return r_hat(in_features, out_features, r, variant) ** 2


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of one LoRA layer at the same `r`, for the side-by-side budget."""
    return (in_features + out_features) * r


# The built-in variants, in the order the UI offers them. Successors are registered before the variants naming them.
for _spec in (
    VariantSpec("type4", "strided sum in, repeat-interleave out (ReMoRA)", reference_type=4),
    VariantSpec("type3", "contiguous-group sum in, tile out (ReMoRA)", reference_type=3, remora_next="type4"),
    VariantSpec("type2", "contiguous-group sum in, repeat-interleave out (ReMoRA)", reference_type=2,
                remora_next="type3"),
    VariantSpec("sharing", "Eq. 6: strided sum in, tile out; the paper's choice at large r", reference_type=1,
                remora_next="type2", ablation=2),
    VariantSpec("rope", "Eq. 9: one M per chunk, each chunk rotated; the paper's choice at small r",
                reference_type=6, even_side=True, ablation=4, per_chunk=True),
    VariantSpec("truncation", "Eq. 4: the first r̂ inputs in, zeros out", ablation=1),
    VariantSpec("decouple", "Eq. 8: one M per chunk, no rotation", ablation=3, per_chunk=True),
):
    register_variant(_spec)
attach("type4", remora_next="sharing")  # the reference's cycle closes: 1 → 2 → 3 → 4 → 1
_ORDER = ("rope", "sharing", "truncation", "decouple", "type2", "type3", "type4")
_REGISTRY = {name: _REGISTRY[name] for name in _ORDER}
del _spec
