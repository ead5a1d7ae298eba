"""A fused path for the sharing variant, the one used at large rank: `base_out + tile(M · compress(x))`.

Sharing spends LoRA's FLOPs in one square product, but the plain autograd graph of `mora.functional` also
materialises the padded input, the tiled output and the zero-filled gradients of every slice; at r=256 that memory
traffic cost about 10% over LoRA on the CPU. This function does the same arithmetic with chunk views and in-place
adds, and writes its own backward. `tests/mora/test_fused.py` checks it against `mora.functional`.
"""
from __future__ import annotations

import torch


def can_fuse(in_features: int, side: int) -> bool:
    """The fused path assumes the padding wraps at most once (`k ≥ r̂`); smaller layers take the plain path."""
    return in_features >= side


class _SharingAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        side, k, d = M.shape[0], x.shape[-1], base_out.shape[-1]
        flat = x.reshape(-1, k)
        full, rem = divmod(k, side)
        # c[j] = Σ over chunks of x̃, with the last chunk wrapped onto the start of x (wrap-around padding)
        c = flat[:, : full * side].view(-1, full, side).sum(1) if full > 1 else flat[:, :side].clone()
        if rem:
            c[:, :rem] += flat[:, full * side:]
            c[:, rem:] += flat[:, : side - rem]
        z = c @ M.t()
        out = base_out.view(-1, d)
        q, s = divmod(d, side)
        if q:  # tiling as a broadcast view: no tiled copy of z is ever made
            out[:, : q * side].view(-1, q, side).add_(z.unsqueeze(1))
        if s:
            out[:, q * side:].add_(z[:, :s])
        ctx.save_for_backward(c, M)
        ctx.shapes = (k, d, x.shape, x.dtype)
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        c, M = ctx.saved_tensors
        k, d, x_shape, x_dtype = ctx.shapes
        side = M.shape[0]
        grad = grad_out.reshape(-1, d).to(c.dtype)
        q, s = divmod(d, side)
        grad_z = grad[:, : q * side].view(-1, q, side).sum(1) if q > 1 else grad[:, :side].clone()
        if s:
            if q:
                grad_z[:, :s] += grad[:, q * side:]
            else:
                grad_z = torch.nn.functional.pad(grad[:, :s], (0, side - s))
        grad_M = grad_z.t() @ c if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_c = grad_z @ M
            full, rem = divmod(k, side)
            grad_x = torch.empty(grad.shape[0], k, dtype=grad_c.dtype, device=grad_c.device)
            grad_x[:, : full * side].view(-1, full, side).copy_(grad_c.unsqueeze(1).expand(-1, full, side))
            if rem:
                grad_x[:, full * side:] = grad_c[:, :rem]
                grad_x[:, : side - rem] += grad_c[:, rem:]
            grad_x = grad_x.view(x_shape).to(x_dtype)
        return grad_out, grad_x, grad_M


def sharing_add(base_out: torch.Tensor, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`base_out + mora_forward(x, M, k, d, "sharing")`, adding in place into `base_out` (a fresh layer output)."""
    return _SharingAdd.apply(base_out, x, M.to(x.dtype))
