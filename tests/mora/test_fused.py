"""The fused sharing path against the plain functional one: outputs and gradients, on awkward shapes."""
import pytest
import torch

from mora import functional as MF
from mora.fused import sharing_add

# k ≥ r̂ with and without a wrapped tail, k < r̂ (one chunk, x repeated), d < r̂, d not divisible by r̂
SHAPES = [(40, 12, 6), (17, 23, 5), (12, 12, 12), (32, 64, 8), (50, 7, 9), (30, 31, 10), (6, 10, 8), (5, 7, 13),
          (3, 20, 7)]


@pytest.mark.parametrize("k,d,side", SHAPES)
def test_fused_sharing_matches_functional_forward_and_gradients(k, d, side):
    torch.manual_seed(0)
    base = torch.randn(2, 3, d, dtype=torch.float64)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, d, dtype=torch.float64)
    expected = base + MF.mora_forward(x, M, k, d, "sharing")
    expected.backward(grad)
    expected_grads = x.grad.clone(), M.grad.clone()
    x.grad = M.grad = None
    base_leaf = base.clone().requires_grad_(True)
    got = sharing_add(base_leaf * 1.0, x, M)
    got.backward(grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, expected_grads[0])
    torch.testing.assert_close(M.grad, expected_grads[1])
    torch.testing.assert_close(base_leaf.grad, grad)


@pytest.mark.parametrize("k,d,side", [(17, 23, 5), (3, 20, 7)])
def test_fused_sharing_gradcheck(k, d, side):
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a, m: sharing_add(b * 1.0, a, m), (base, x, M))
