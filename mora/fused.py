"""A fused path for the sharing variant, the one used at large rank: `base_out + tile(M · compress(x))`.

Sharing spends LoRA's FLOPs in one square product, but the plain autograd graph of `mora.functional` also
materialises the padded input, the tiled output and the zero-filled gradients of every slice; at r=256 that memory
traffic cost about 10% over LoRA on the CPU. This function does the same arithmetic with chunk views and in-place
adds, and writes its own backward. `tests/mora/test_fused.py` checks it against `mora.functional`.

Two helpers carry all of it: tiling (`y[o] = z[o mod p]`) and its transpose, folding (`y[i] = Σ_{j ≡ i mod p} g[j]`).
Compression is a fold (plus the wrapped tail) when `k ≥ r̂` and a tiling when `k < r̂`; decompression is a tiling;
each backward is the other one.
"""
from __future__ import annotations

import torch


def _fold(values: torch.Tensor, period: int) -> torch.Tensor:
    """`[N, m] -> [N, period]`, summing every position into its residue mod `period`."""
    q, s = divmod(values.shape[1], period)
    folded = values[:, : q * period].view(-1, q, period).sum(1) if q else values.new_zeros(values.shape[0], period)
    if s:
        folded[:, :s] += values[:, q * period:]
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


def _tile(values: torch.Tensor, length: int) -> torch.Tensor:
    return _tile_into(values.new_zeros(values.shape[0], length), values)


def _compress(x: torch.Tensor, side: int) -> torch.Tensor:
    """Sharing's `c[j] = Σ_{t ≡ j mod r̂} x̃[t]`, with `x̃` the wrap-around padding of x to `L = ceil(k/r̂)·r̂`."""
    k = x.shape[1]
    if k < side:  # one chunk: x̃ is x repeated up to r̂
        return _tile(x, side)
    c = _fold(x, side)
    rem = k % side
    if rem:  # the padded tail repeats x's first r̂ - rem features into the slots after rem
        c[:, rem:] += x[:, : side - rem]
    return c


def _compress_transposed(grad_c: torch.Tensor, k: int) -> torch.Tensor:
    side = grad_c.shape[1]
    if k < side:
        return _fold(grad_c, k)
    grad_x = _tile(grad_c, k)
    rem = k % side
    if rem:
        grad_x[:, : side - rem] += grad_c[:, rem:]
    return grad_x


class _SharingAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        side, k, d = M.shape[0], x.shape[-1], base_out.shape[-1]
        c = _compress(x.reshape(-1, k), side)
        _tile_into(base_out.view(-1, d), c @ M.t())
        ctx.save_for_backward(c, M)
        ctx.shapes = (k, d, x.shape, x.dtype)
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        c, M = ctx.saved_tensors
        k, d, x_shape, x_dtype = ctx.shapes
        grad_z = _fold(grad_out.reshape(-1, d).to(c.dtype), M.shape[0])
        grad_M = grad_z.t() @ c if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _compress_transposed(grad_z @ M, k).view(x_shape).to(x_dtype)
        return grad_out, grad_x, grad_M


def sharing_add(base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`base_out + mora_forward(x, M, k, d, "sharing")`, adding in place into `base_out` (a fresh layer output)."""
    return _SharingAdd.apply(base_out, x, M.to(x.dtype))
