"""The fused sharing path against the plain functional one: outputs and gradients, on awkward shapes."""
import pytest
import torch

from mora import functional as MF
from mora.fused import can_fuse, sharing_add

SHAPES = [(40, 12, 6), (17, 23, 5), (12, 12, 12), (32, 64, 8), (50, 7, 9), (30, 31, 10)]


@pytest.mark.parametrize("k,d,side", SHAPES)
def test_fused_sharing_matches_functional_forward_and_gradients(k, d, side):
    assert can_fuse(k, side)
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


def test_fused_sharing_gradcheck():
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    M = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, 23, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a, m: sharing_add(b * 1.0, a, m), (base, x, M))


def test_small_layers_take_the_plain_path():
    assert not can_fuse(6, 8)
