"""The functional core of MoRA: the size of M, the adapter branch, and its dense delta weight.

Everything here is a pure function of tensors, like `torch.nn.functional`, so that the layers, the merge code and
the tests all compute the same thing. Notation follows MORA_SPEC.md: the frozen layer maps `k = in_features` to
`d = out_features`, the trainable matrix `M` is `r̂ × r̂`, the input is cut into `n = ceil(k / r̂)` chunks and padded
to `L = n·r̂` by wrap-around (`x̃[t] = x[t mod k]`).

No function loops in Python over features or chunks: compression is a reshape and a sum, decompression a view or a
gather, and the rotation variant folds each chunk's rotation into `M` once (`A_i = M R_i`) and runs one batched
matmul, which is cheaper than rotating every token's activations.

Which variant computes how is `mora.variants`' registry; this module gives the built-in variants their parts there
(at the end) and dispatches through it, so a registered variant needs nothing added here.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mora import variants
from mora.fused import decouple_add, rope_add, rotated_blocks, rotated_pieces, sharing_add, used_chunks
from mora.variants import (VariantName as Variant, default_variant, lora_parameter_count, mora_parameter_count,
                           normalize_variant, r_hat, reference_type)

# ---------------------------------------------------------------------------------------------------------------
# Index helpers, cached per shape and device: they are constants of a layer, rebuilt never on the hot path.


@functools.lru_cache(maxsize=512)
def _group_index(length: int, groups: int, device: torch.device) -> torch.Tensor:
    """Group of each position when `length` items fall into `groups` contiguous groups, the first `s` one longer."""
    q, s = divmod(length, groups)
    sizes = torch.full((groups,), q, dtype=torch.long)
    sizes[:s] += 1
    return torch.repeat_interleave(torch.arange(groups), sizes).to(device)


def _wrap_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """`x̃[t] = x[t mod k]` for `t < length`: wrap-around padding (or a plain cut when `length ≤ k`)."""
    k = x.shape[-1]
    if length <= k:
        return x[..., :length]
    repeats = -(-length // k)
    return x.repeat(*([1] * (x.dim() - 1)), repeats)[..., :length]


def _tile(z: torch.Tensor, length: int) -> torch.Tensor:
    """`y[o] = z[o mod m]` for `o < length`, built as an expanded view (one copy at the final reshape)."""
    m = z.shape[-1]
    if length <= m:
        return z[..., :length]
    repeats = -(-length // m)
    tiled = z.unsqueeze(-2).expand(*z.shape[:-1], repeats, m).reshape(*z.shape[:-1], repeats * m)
    return tiled[..., :length]


def _strided_sum(x: torch.Tensor, side: int) -> torch.Tensor:
    """Sharing's compression: wrap-pad to `L = n·r̂` and sum the `n` chunks (`c[j] = Σ_{t ≡ j mod r̂} x̃[t]`)."""
    chunks = -(-x.shape[-1] // side)
    return _wrap_pad(x, chunks * side).reshape(*x.shape[:-1], chunks, side).sum(-2)


def _contiguous_sum(x: torch.Tensor, side: int) -> torch.Tensor:
    """Types 2 and 3: sum `r̂` contiguous groups of uneven length (first `s` of `q + 1`, then `q`), no padding."""
    q, s = divmod(x.shape[-1], side)
    lead = x.shape[:-1]
    long_groups = x[..., : s * (q + 1)].reshape(*lead, s, q + 1).sum(-1)
    short_groups = x[..., s * (q + 1):].reshape(*lead, side - s, q).sum(-1)
    return torch.cat([long_groups, short_groups], dim=-1)


def _repeat_interleave(z: torch.Tensor, length: int) -> torch.Tensor:
    """Output `o` takes `z[G(o)]`, `G` the uneven contiguous grouping of `length` outputs into `r̂` groups."""
    return z.index_select(-1, _group_index(length, z.shape[-1], z.device))


# ---------------------------------------------------------------------------------------------------------------
# Forward of each variant: x [..., k] -> adapter branch [..., d]. M is cast to x's dtype by the caller.


def _linear(c: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`c Mᵀ`. A stacked `M` (`[A, o, i]`, several adapters of one shape) multiplies each leading block of `c`
    (`[A, ..., i]`) by its own matrix, in one batched product; it is fastest as the transpose of a contiguous
    `[A, i, o]` (`stack_matrices`): a batched product with a transposed operand runs up to 6× slower on the CPU."""
    if M.dim() == 2:
        return F.linear(c, M)
    return torch.bmm(c.reshape(M.shape[0], -1, M.shape[2]), M.mT).view(*c.shape[:-1], M.shape[1])


def _forward_grouped(compress: Callable, decompress: Callable) -> Callable:
    def forward(x: torch.Tensor, M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        return decompress(_linear(compress(x, M.shape[-1]), M), out_features)

    return forward


def _forward_truncation(x: torch.Tensor, M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Eq. 4: `f_comp(x) = x[:r̂]`, `f_decomp(z) = [z; 0]`; only the rows and columns that survive are used."""
    side = M.shape[-1]
    kept_in, kept_out = min(in_features, side), min(out_features, side)
    z = _linear(x[..., :kept_in], M[..., :kept_out, :kept_in])
    return F.pad(z, (0, out_features - kept_out))


def _truncate_in(x: torch.Tensor, side: int) -> torch.Tensor:
    """Truncation's compression as a map (`x[:r̂]`, zeros past `k`), for code that needs the maps themselves: the
    forward above uses only the rows and columns that survive."""
    return F.pad(x[..., :side], (0, max(0, side - x.shape[-1])))


def _zeros_out(z: torch.Tensor, length: int) -> torch.Tensor:
    """Truncation's decompression as a map: `[z; 0]` cut or padded to `length`."""
    return F.pad(z[..., :length], (0, max(0, length - z.shape[-1])))


def _forward_chunked(rotate: bool) -> Callable:
    def forward(x: torch.Tensor, M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        """Eq. 9 (rope) or Eq. 8 (decouple): one M per chunk, rotated by the chunk's angle, then cut or tiled."""
        side = M.shape[-1]
        chunks, used = used_chunks(in_features, out_features, side)
        lead = x.shape[:-1]
        pieces = _wrap_pad(x, used * side).reshape(*lead, used, side)
        if rotate and used > 1 and (M.dim() == 3 or pieces.numel() < M.numel() * used):
            # stacked adapters, or fewer rows than r̂: rotate the rows rather than M, then one product with M
            z = _linear(rotated_pieces(pieces), M)
        elif rotate and used > 1:
            z = torch.einsum("...ni,noi->...no", pieces, rotated_blocks(M, used, rotate=True))
        else:
            z = _linear(pieces, M)
        u = z.reshape(*lead, used * side)
        return u[..., :out_features] if used * side >= out_features else _tile(u, out_features)

    return forward


def _check_shapes(M: torch.Tensor, spec: variants.VariantSpec) -> None:
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    if spec.even_side and M.shape[0] % 2:
        raise ValueError(f"the {spec.name} variant pairs dimensions j and j + r̂/2, so r̂ must be even, "
                         f"got {M.shape[0]}")


def _branch(spec: variants.VariantSpec) -> Callable:
    """The variant's forward: its own, or the simple form `decompress(M · compress(x))` from its two maps."""
    if spec.forward is not None:
        return spec.forward
    if spec.compress is None or spec.decompress is None:
        raise ValueError(f"the {spec.name} variant has neither a forward nor compress and decompress maps")
    return _forward_grouped(spec.compress, spec.decompress)


def mora_forward(
    x: torch.Tensor, M: torch.Tensor, in_features: int, out_features: int, variant: Variant = "sharing"
) -> torch.Tensor:
    """The adapter branch `f_decomp(M · f_comp(x))`, shape `[..., out_features]`, computed in x's dtype."""
    spec = variants.get_variant(variant)
    _check_shapes(M, spec)
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    return _branch(spec)(x, M.to(x.dtype), in_features, out_features)


def stacks(variant: Variant) -> bool:
    """Whether the variant's branch takes several adapters' matrices at once (`mora_forward_stacked`)."""
    spec = variants.get_variant(variant)
    return spec.forward is None or spec.stacks


def stack_matrices(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several adapters' matrices as the stacked `M` that `mora_forward_stacked` multiplies fastest."""
    return torch.stack([matrix.T for matrix in matrices]).mT


def mora_forward_stacked(
    x: torch.Tensor, Ms: torch.Tensor, in_features: int, out_features: int, variant: Variant = "sharing"
) -> torch.Tensor:
    """`A` adapters of one variant and shape at once: `x` is `[A, N, k]` and block `a` goes through `Ms[a]`, giving
    `[A, N, d]`. Each step of the branch runs once for all of them (one batched product where a loop would run `A`),
    which is what lets one forward serve many adapters at nearly the cost of one (batched chat, serving, evaluation)."""
    spec = variants.get_variant(variant)
    if not stacks(variant):
        raise ValueError(f"the {spec.name} variant's forward does not take stacked matrices")
    if Ms.dim() != 3 or Ms.shape[1] != Ms.shape[2] or x.dim() != 3 or x.shape[0] != Ms.shape[0]:
        raise ValueError(f"expected x [A, N, k] and Ms [A, r̂, r̂], got {tuple(x.shape)} and {tuple(Ms.shape)}")
    _check_shapes(Ms[0], spec)
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    return _branch(spec)(x, Ms.to(x.dtype), in_features, out_features)


# ---------------------------------------------------------------------------------------------------------------
# Delta weights: the dense `d × k` matrix with `x ΔWᵀ` equal to the branch, from the same tables as the forward.


def _fold_columns(padded: torch.Tensor, in_features: int) -> torch.Tensor:
    """Fold padded columns `t` onto input `t mod k`: the transpose of wrap-around padding."""
    length = padded.shape[-1]
    if length == in_features:
        return padded
    source = torch.arange(length, device=padded.device) % in_features
    return padded.new_zeros(padded.shape[0], in_features).index_add(1, source, padded)


def _tiled_slots(length: int, side: int, device: torch.device) -> torch.Tensor:
    """Which of the `r̂` values each of `length` positions takes when tiling (or wrap-padding): `o mod r̂`."""
    return torch.arange(length, device=device) % side


def _delta_grouped(contiguous_in: bool, tiled_out: bool) -> Callable:
    """ΔW of a grouped variant, by gathering M's rows and columns: the group each output takes its value from
    (tiled: `o mod r̂`; repeat-interleaved: its contiguous group) and each input feeds (strided sum through the
    wrap-padding, or its contiguous group)."""
    def delta(M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        side = M.shape[0]
        slots = (_tiled_slots if tiled_out else _group_index)(out_features, side, M.device)
        rows = M.index_select(0, slots)
        if contiguous_in:
            return rows.index_select(1, _group_index(in_features, side, M.device))
        length = -(-in_features // side) * side
        padded = rows.index_select(1, _tiled_slots(length, side, M.device))
        return _fold_columns(padded, in_features)

    return delta


def _delta_truncation(M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    side = M.shape[0]
    kept_in, kept_out = min(in_features, side), min(out_features, side)
    return F.pad(M[:kept_out, :kept_in], (0, in_features - kept_in, 0, out_features - kept_out))


def _delta_chunked(rotate: bool) -> Callable:
    def delta(M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        """`T · blockdiag(M R_0, …) · P`: scatter each block onto its diagonal, fold the padding, tile the rows."""
        side = M.shape[0]
        chunks, used = used_chunks(in_features, out_features, side)
        blocks = rotated_blocks(M, used, rotate)
        offsets = torch.arange(used, device=M.device).view(used, 1, 1) * side
        local = torch.arange(side, device=M.device)
        rows = (offsets + local.view(1, side, 1)).expand(used, side, side)
        cols = ((offsets + local.view(1, 1, side)) % in_features).expand(used, side, side)
        folded = M.new_zeros(used * side, in_features).index_put((rows, cols), blocks, accumulate=True)
        if used * side >= out_features:
            return folded[:out_features]
        return folded.index_select(0, torch.arange(out_features, device=M.device) % (used * side))

    return delta


def mora_delta_weight(M: torch.Tensor, in_features: int, out_features: int, variant: Variant = "sharing") -> torch.Tensor:
    """The dense update `ΔW` (`[out_features, in_features]`) such that `mora_forward(x) == x @ ΔW.T`.

    A variant without a delta of its own gets the spec's generic one, `F(I_k)ᵀ`: the branch applied to the rows of
    the identity (exact, but it costs a forward over k rows; the built-in variants gather M's entries instead)."""
    spec = variants.get_variant(variant)
    _check_shapes(M, spec)
    if spec.delta is not None:
        return spec.delta(M, in_features, out_features)
    identity = torch.eye(in_features, dtype=M.dtype, device=M.device)
    return _branch(spec)(identity, M, in_features, out_features).T


# ---------------------------------------------------------------------------------------------------------------
# The built-in variants' parts, attached to their registry entries (MORA_SPEC.md §2).

for _name, _contiguous_in, _tiled_out in (("sharing", False, True), ("type2", True, False), ("type3", True, True),
                                          ("type4", False, False)):
    variants.attach(_name, compress=_contiguous_sum if _contiguous_in else _strided_sum,
                    decompress=_tile if _tiled_out else _repeat_interleave,
                    delta=_delta_grouped(_contiguous_in, _tiled_out))
variants.attach("sharing", fused_add=sharing_add)
variants.attach("truncation", forward=_forward_truncation, delta=_delta_truncation, compress=_truncate_in,
                decompress=_zeros_out, stacks=True)
variants.attach("rope", forward=_forward_chunked(rotate=True), delta=_delta_chunked(rotate=True), fused_add=rope_add,
                stacks=True)
variants.attach("decouple", forward=_forward_chunked(rotate=False), delta=_delta_chunked(rotate=False),
                fused_add=decouple_add, stacks=True)
del _name, _contiguous_in, _tiled_out
