"""Fused paths for the variants that training uses by default: sharing at large rank, rope (and decouple) at small.

Each is a `torch.autograd.Function` that adds the adapter branch into the base layer's output in place and writes
its own backward, doing the arithmetic of `mora.functional` without the copies its plain autograd graph makes.
`tests/mora/test_fused.py` checks both against `mora.functional` and with gradcheck.

Sharing spends LoRA's FLOPs in one square product, but the plain graph also materialises the padded input, the tiled
output and the zero-filled gradients of every slice; at r=256 that memory traffic cost about 10% over LoRA on the
CPU. Two helpers carry all of it: tiling (`y[o] = z[o mod p]`) and its transpose, folding
(`y[i] = Σ_{j ≡ i mod p} g[j]`). Compression is a fold (plus the wrapped tail) when `k ≥ r̂` and a tiling when
`k < r̂`; decompression is a tiling; each backward is the other one.

Rope cuts the input into chunks of r̂ and gives chunk i its own block `A_i = M R_i` (decouple: `A_i = M`). The
blocks are built once per step from float32 tables (`rotated_blocks`) and kept for the backward, whose gradient of M
is the transpose of that map (`rotated_blocks_transposed`). The chunks are strided views of x when they fit in it
(no padded copy), each chunk's product is written straight into its columns of the base output by one batched
multiply-add (`baddbmm_`), the chunk cut by `d` multiplies only the rows that survive, and the backward writes the
input gradient into its columns the same way. Only a tiled output (`d > n·r̂`) or a wrapped input (`n·r̂ > k`)
makes one copy of the product or the input.
"""
from __future__ import annotations

import functools

import torch


def _fold(values: torch.Tensor, period: int, width: int = 0) -> torch.Tensor:
    """`[N, m] -> [N, max(period, width)]`, summing every position into its residue mod `period`; the columns past
    `period` (a GEMM's padding) are zero."""
    q, s = divmod(values.shape[1], period)
    folded = values.new_empty(values.shape[0], max(period, width))
    head = folded[:, :period]
    if q:
        torch.sum(values[:, : q * period].view(-1, q, period), 1, out=head)
    else:
        head.zero_()
    if s:
        head[:, :s] += values[:, q * period:]
    if width > period:
        folded[:, period:].zero_()
    return folded


def _tile_into(out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`out[:, o] += values[:, o mod p]` in place, through broadcast views (no tiled copy)."""
    period = values.shape[1]
    q, s = divmod(out.shape[1], period)
    if q:
        out[:, : q * period].view(-1, q, period).add_(values.unsqueeze(1))
    if s:
        out[:, q * period:].add_(values[:, :s])
    return out


def _tile(values: torch.Tensor, length: int, width: int = 0) -> torch.Tensor:
    """`[N, p] -> [N, max(length, width)]` with `y[:, o] = values[:, o mod p]` for `o < length`, written once (no
    zero fill); the columns past `length` (a GEMM's padding) are zero."""
    period = values.shape[1]
    q, s = divmod(length, period)
    out = values.new_empty(values.shape[0], max(length, width))
    if q:
        out[:, : q * period].view(-1, q, period).copy_(values.unsqueeze(1))
    if s:
        out[:, q * period: length].copy_(values[:, :s])
    if width > length:
        out[:, length:].zero_()
    return out


def _gemm_side(side: int) -> int:
    """A size not a multiple of 4 rounded up to a multiple of 8. MKL multiplies such a square matrix up to a third
    slower than the next multiple of 8 on the development CPU (983: 49 ms, 984: 39 ms for 512 rows, forward and
    both gradients; 543: 11 ms, 544: 9 ms), while a multiple of 4 gains nothing (724 against 728), so sharing runs its
    product zero-padded to this size: the same result, a few zero multiply-adds more."""
    return side if side % 4 == 0 else -(-side // 8) * 8


def _compress(x: torch.Tensor, side: int, width: int = 0) -> torch.Tensor:
    """Sharing's `c[j] = Σ_{t ≡ j mod r̂} x̃[t]` for `k ≥ r̂`, with `x̃` the wrap-around padding of x to
    `L = ceil(k/r̂)·r̂`, as `[N, max(r̂, width)]` with zeros past r̂."""
    k = x.shape[1]
    c = _fold(x, side, width)
    rem = k % side
    if rem:  # the padded tail repeats x's first r̂ - rem features into the slots after rem
        c[:, rem:side] += x[:, : side - rem]
    return c


def _compress_transposed(grad_c: torch.Tensor, k: int) -> torch.Tensor:
    side = grad_c.shape[1]
    grad_x = _tile(grad_c, k)
    rem = k % side
    if rem:
        grad_x[:, : side - rem] += grad_c[:, rem:]
    return grad_x


def _padded(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`matrix` zero-padded to `[rows, cols]` (itself when it has that shape)."""
    if tuple(matrix.shape) == (rows, cols):
        return matrix
    return torch.nn.functional.pad(matrix, (0, cols - matrix.shape[1], 0, rows - matrix.shape[0]))


class _SharingAdd(torch.autograd.Function):
    """Only the product's live part is computed: the `min(d, r̂)` rows of M whose outputs survive the tiling to `d`,
    and, when `k < r̂` (c is x repeated), M's columns folded onto x's `k` inputs, so the branch costs
    `min(d, r̂)·min(k, r̂)` multiply-adds per token each way instead of `r̂²`."""

    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        side, k, d = M.shape[0], x.shape[-1], base_out.shape[-1]
        live, inputs = min(d, side), min(k, side)
        rows = x.reshape(-1, k)
        if k >= side:
            c, live_M = _compress(rows, side, _gemm_side(side)), M[:live]  # c: [N, width], zero past r̂
        else:  # one chunk: c[j] = x[j mod k], so M·c = fold(M's columns mod k)·x
            c, live_M = _padded(rows, rows.shape[0], _gemm_side(k)), _fold(M[:live], k)
        padded = _padded(live_M, _gemm_side(live), c.shape[1])
        _tile_into(base_out.view(-1, d), (c @ padded.t())[:, :live])
        ctx.save_for_backward(c, padded)
        ctx.shapes = (side, k, d, x.shape, x.dtype)
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        c, padded = ctx.saved_tensors
        side, k, d, x_shape, x_dtype = ctx.shapes
        live, inputs = min(d, side), min(k, side)
        grad = grad_out.reshape(-1, d).to(c.dtype)
        # [N, width], zero past the live rows: the tiling's transpose, or the output itself when d ≤ r̂
        grad_z = _fold(grad, side, padded.shape[0]) if d > side else _padded(grad, grad.shape[0], padded.shape[0])
        grad_x = grad_M = None
        if ctx.needs_input_grad[2]:
            grad_live = (grad_z.t() @ c)[:live, :inputs]
            if k < side:  # the column fold's transpose
                grad_live = _tile(grad_live, side)
            grad_M = _padded(grad_live, side, side).contiguous()
        if ctx.needs_input_grad[1]:
            grad_c = (grad_z @ padded)[:, :inputs]
            grad_x = (_compress_transposed(grad_c, k) if k >= side else grad_c).reshape(x_shape).to(x_dtype)
        return grad_out, grad_x, grad_M


def sharing_add(base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`base_out + mora_forward(x, M, k, d, "sharing")`, adding in place into `base_out` (a fresh layer output)."""
    return _SharingAdd.apply(base_out, x, M.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The chunked variants: rope (Eq. 9) and decouple (Eq. 8).


@functools.lru_cache(maxsize=512)
def rotation_tables(side: int, chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `φ_{i,j} = i·θ_j`, `θ_j = 10000^(-2j/r̂)`, in float32, shape `[chunks, r̂/2]`."""
    theta = 1.0 / (10000.0 ** (torch.arange(0, side, 2, dtype=torch.float32) / side))
    angles = torch.outer(torch.arange(chunks, dtype=torch.float32), theta)
    return angles.cos().to(device), angles.sin().to(device)


@functools.lru_cache(maxsize=512)
def _column_tables(side: int, chunks: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[2, chunks, 1, r̂]` in `dtype`: each column's cosine `[cos, cos]` and the sine that multiplies M with its
    halves swapped, `[sin, -sin]`, so that `A_i = M ⊙ C_i + roll(M, r̂/2) ⊙ S_i`."""
    cos, sin = rotation_tables(side, chunks, device)
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)]).to(dtype).unsqueeze(2)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (the tables' precision), float64 when the tensor is: a bf16 M must not round the angles."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def rotated_blocks(M: torch.Tensor, chunks: int, rotate: bool) -> torch.Tensor:
    """`A_i = M R_i` for each used chunk, shape `[chunks, r̂, r̂]`, computed from float32 tables.

    Column j of `M R_i` is `cos φ_{i,j}·M[:, j] + sin φ_{i,j}·M[:, j + r̂/2]` and column `j + r̂/2` is
    `cos φ_{i,j}·M[:, j + r̂/2] - sin φ_{i,j}·M[:, j]`: three small ops on M. Folding the rotation into M (n small
    products per step) replaces rotating every token's activations.
    """
    side = M.shape[-1]
    if not rotate:
        return M.unsqueeze(-3).expand(*M.shape[:-2], chunks, side, side)
    wide = _wide(M).unsqueeze(-3)  # a stacked M ([A, r̂, r̂]) gives [A, chunks, r̂, r̂]
    cos, sin = _column_tables(side, chunks, wide.dtype, M.device)
    return torch.addcmul(wide * cos, wide.roll(side // 2, -1), sin).to(M.dtype)


def rotated_pieces(pieces: torch.Tensor) -> torch.Tensor:
    """`R_i x_i` for each chunk `x_i` of `pieces` (`[..., chunks, r̂]`), so that `A_i x_i = M (R_i x_i)`: the rotation
    applied to the activations instead of to M. Rotating costs the rows' `chunks·r̂` values against the blocks'
    `chunks·r̂²`, so it is the cheaper side when there are fewer rows than r̂, as when a token is being generated."""
    side, chunks = pieces.shape[-1], pieces.shape[-2]
    wide = _wide(pieces)
    cos, sin = _column_tables(side, chunks, wide.dtype, pieces.device).squeeze(2)
    return torch.addcmul(wide * cos, wide.roll(side // 2, -1), sin, value=-1).to(pieces.dtype)


def rotated_blocks_transposed(grad_blocks: torch.Tensor, rotate: bool) -> torch.Tensor:
    """The gradient of M from the gradients of its blocks: the transpose of the linear map `rotated_blocks`."""
    if not rotate:
        return grad_blocks.sum(0)
    chunks, side = grad_blocks.shape[0], grad_blocks.shape[-1]
    wide = _wide(grad_blocks)
    folded = (wide.unsqueeze(0) * _column_tables(side, chunks, wide.dtype, grad_blocks.device)).sum(1)
    return (folded[0] + folded[1].roll(-(side // 2), 1)).to(grad_blocks.dtype)


def used_chunks(in_features: int, out_features: int, side: int) -> tuple[int, int]:
    """(n, chunks whose outputs survive the cut to `d`): chunks entirely past `d` are never computed."""
    chunks = -(-in_features // side)
    if chunks * side <= out_features:
        return chunks, chunks
    return chunks, -(-out_features // side)


def _chunks_of(rows: torch.Tensor, used: int, side: int) -> torch.Tensor:
    """`[N, ≥ used·r̂] -> [used, N, r̂]`: the first `used` chunks of each row, a strided view (no copy)."""
    return rows[:, : used * side].view(rows.shape[0], used, side).transpose(0, 1)


def _pieces(x: torch.Tensor, length: int, side: int) -> torch.Tensor:
    """The wrap-padded input `x̃` cut into chunks, `[used, N, r̂]`: a view of x when the chunks fit in it."""
    return _chunks_of(x if length <= x.shape[1] else _tile(x, length), length // side, side)


def _chunked_product_into(target: torch.Tensor, pieces: torch.Tensor, blocks: torch.Tensor, beta: float) -> None:
    """`target[:, c·r̂ + o] = beta·target + Σ_i pieces[c, :, i]·blocks[c, o, i]` for the columns target has: whole
    chunks by one batched multiply-add into their column views, the last chunk, cut by target's width, by the rows
    of its block that survive."""
    side = blocks.shape[-1]
    full, rem = divmod(target.shape[1], side)
    if full:
        _chunks_of(target, full, side).baddbmm_(pieces[:full], blocks[:full].transpose(1, 2), beta=beta)
    if rem:
        target[:, full * side:].addmm_(pieces[full], blocks[full, :rem].t(), beta=beta)


def _chunked_input_grad(grad_z: torch.Tensor, blocks: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """`grad x` from the outputs' gradient `grad_z` (`[N, width]`, width ≤ used·r̂, the chunks' surviving outputs):
    each chunk's `grad_z_c · A_c` into its input columns, then the wrap-around padding folded back onto x."""
    side, used = blocks.shape[-1], blocks.shape[0]
    length = used * side
    full, rem = divmod(width, side)
    grad_in = grad_z.new_empty(grad_z.shape[0], max(length, k))
    if full:
        _chunks_of(grad_in, full, side).baddbmm_(_chunks_of(grad_z, full, side), blocks[:full], beta=0)
    if rem:
        grad_in[:, full * side: full * side + side].addmm_(grad_z[:, full * side:], blocks[full, :rem], beta=0)
    if length < k:
        grad_in[:, length:].zero_()
    return grad_in if length <= k else _fold(grad_in, k)


def _chunked_blocks_grad(grad_z: torch.Tensor, pieces: torch.Tensor, side: int) -> torch.Tensor:
    """`grad A_c = grad_z_cᵀ · pieces_c` for each used chunk; rows of the cut chunk past `width` get zero."""
    used = pieces.shape[0]
    full, rem = divmod(grad_z.shape[1], side)
    grad_blocks = grad_z.new_empty(used, side, side)
    if full:
        torch.bmm(_chunks_of(grad_z, full, side).transpose(1, 2), pieces[:full], out=grad_blocks[:full])
    if rem:
        torch.mm(grad_z[:, full * side:].t(), pieces[full], out=grad_blocks[full, :rem])
        grad_blocks[full, rem:].zero_()
    return grad_blocks


class _ChunkedAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor, rotate: bool) -> torch.Tensor:
        side, k, d = M.shape[0], x.shape[-1], base_out.shape[-1]
        _, used = used_chunks(k, d, side)
        length = used * side
        rows = x.reshape(-1, k)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        blocks = rotated_blocks(M, used, rotate)
        pieces = _pieces(rows, length, side)
        out = base_out.view(-1, d)
        target = out if out.dtype == x.dtype else torch.zeros_like(out, dtype=x.dtype)
        if d <= length:  # the chunks' outputs, cut to d, are the output
            _chunked_product_into(target, pieces, blocks, beta=1)
        else:  # d > n·r̂: the chunks' outputs are tiled over d
            z = torch.bmm(pieces, blocks.transpose(1, 2)).transpose(0, 1).reshape(-1, length)
            _tile_into(target, z)
        if target is not out:
            out.add_(target)
        ctx.save_for_backward(rows, blocks)
        ctx.shapes = (d, length, rotate, x.shape, x.dtype)
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rows, blocks = ctx.saved_tensors
        d, length, rotate, x_shape, x_dtype = ctx.shapes
        side, k = blocks.shape[-1], rows.shape[1]
        grad_z = grad_out.reshape(-1, d).to(rows.dtype)
        if d > length:
            grad_z = _fold(grad_z, length)
        elif grad_z.stride(-1) != 1:
            grad_z = grad_z.contiguous()
        grad_x = grad_M = None
        if ctx.needs_input_grad[2]:
            grad_blocks = _chunked_blocks_grad(grad_z, _pieces(rows, length, side), side)
            grad_M = rotated_blocks_transposed(grad_blocks, rotate)
        if ctx.needs_input_grad[1]:
            grad_x = _chunked_input_grad(grad_z, blocks, grad_z.shape[1], k).view(x_shape).to(x_dtype)
        return grad_out, grad_x, grad_M, None


def rope_add(base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`base_out + mora_forward(x, M, k, d, "rope")`, adding in place into `base_out` (a fresh layer output)."""
    return _ChunkedAdd.apply(base_out, x, M.to(x.dtype), True)


def decouple_add(base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`base_out + mora_forward(x, M, k, d, "decouple")`, in place as `rope_add`."""
    return _ChunkedAdd.apply(base_out, x, M.to(x.dtype), False)
