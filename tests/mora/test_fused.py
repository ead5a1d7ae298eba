"""The fused sharing and chunked (rope, decouple) paths against the plain functional ones: outputs and gradients,
on awkward shapes, and gradcheck."""
import pytest
import torch

from mora import MoRAConfig
from mora import functional as MF
from mora.fused import decouple_add, rope_add, sharing_add
from mora.layers import AdaptedLinear

# k ≥ r̂ with and without a wrapped tail, k < r̂ (one chunk, x repeated), d < r̂, d not divisible by r̂
SHAPES = [(40, 12, 6), (17, 23, 5), (12, 12, 12), (32, 64, 8), (50, 7, 9), (30, 31, 10), (6, 10, 8), (5, 7, 13),
          (3, 20, 7)]


def _assert_matches_functional(fused, variant: str, k: int, d: int, side: int) -> None:
    """`fused(base, x, M)` equals `base + mora_forward(x, M)` in value and in the gradients of x, M and base."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, d, dtype=torch.float64)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, d, dtype=torch.float64)
    expected = base + MF.mora_forward(x, M, k, d, variant)
    expected.backward(grad)
    expected_grads = x.grad.clone(), M.grad.clone()
    x.grad = M.grad = None
    base_leaf = base.clone().requires_grad_(True)
    got = fused(base_leaf * 1.0, x, M)
    got.backward(grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, expected_grads[0])
    torch.testing.assert_close(M.grad, expected_grads[1])
    torch.testing.assert_close(base_leaf.grad, grad)


@pytest.mark.parametrize("k,d,side", SHAPES)
def test_fused_sharing_matches_functional_forward_and_gradients(k, d, side):
    _assert_matches_functional(sharing_add, "sharing", k, d, side)


@pytest.mark.parametrize("k,d,side", [(17, 23, 5), (3, 20, 7)])
def test_fused_sharing_gradcheck(k, d, side):
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a, m: sharing_add(b * 1.0, a, m), (base, x, M))


# Rope and decouple (even r̂ for rope): one chunk with d > L (tiled), k > d with the last chunk cut (and whole chunks
# cut away), d > L with k not divisible (wrapped input, tiled output), r̂ > k and r̂ > d (x repeated), an exact fit,
# a cut at a chunk boundary, a wrapped input cut inside its last chunk, d between L and 2L, k < r̂ < d.
CHUNKED_SHAPES = [(6, 10, 8), (40, 12, 6), (7, 30, 4), (5, 7, 14), (24, 24, 8), (40, 16, 8), (23, 17, 6),
                  (20, 31, 6), (3, 20, 8), (50, 7, 10)]
CHUNKED = [("rope", rope_add), ("decouple", decouple_add)]


@pytest.mark.parametrize("variant,fused", CHUNKED, ids=[name for name, _ in CHUNKED])
@pytest.mark.parametrize("k,d,side", CHUNKED_SHAPES)
def test_fused_chunked_matches_functional_forward_and_gradients(variant, fused, k, d, side):
    _assert_matches_functional(fused, variant, k, d, side)


@pytest.mark.parametrize("variant,fused", CHUNKED, ids=[name for name, _ in CHUNKED])
@pytest.mark.parametrize("k,d,side", [(40, 12, 6), (20, 31, 6), (5, 7, 14), (24, 24, 8)])
def test_fused_chunked_gradcheck(variant, fused, k, d, side):
    torch.manual_seed(0)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a, m: fused(b * 1.0, a, m), (base, x, M))


def test_fused_rope_adds_float32_branch_into_a_bfloat16_output():
    """A float32 adapter on a bfloat16 base: the branch is computed in float32 and added into the bf16 output."""
    torch.manual_seed(0)
    k, d, side = 40, 16, 8
    base = torch.randn(5, d, dtype=torch.bfloat16)
    x = torch.randn(5, k, requires_grad=True)
    M = torch.randn(side, side, requires_grad=True)
    got = rope_add(base.clone(), x, M)
    assert got.dtype == torch.bfloat16
    expected = base.float() + MF.mora_forward(x, M, k, d, "rope")
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=2e-2)
    got.float().sum().backward()
    reference = torch.autograd.grad(MF.mora_forward(x, M, k, d, "rope").sum(), M)[0]
    torch.testing.assert_close(M.grad, reference, rtol=1e-2, atol=1e-2)


def test_rope_layers_take_the_fused_path_and_never_pad_a_fitting_input():
    """Through AdaptedLinear the rope branch is the fused one (one node, `_ChunkedAddBackward`), and where the
    chunks fit in x the forward makes no copy of the input (no cat, repeat or copy of x's size)."""
    torch.manual_seed(0)
    layer = AdaptedLinear(torch.nn.Linear(48, 48, bias=False))
    layer.add_adapter("a", MoRAConfig(r=2, variant="rope"))  # r̂ = 12: four chunks fill the 48 inputs exactly
    layer.active_adapter = "a"
    x = torch.randn(7, 48, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        y = layer(x)
    assert type(y.grad_fn).__name__ == "_ChunkedAddBackward"
    copying = ("aten::cat", "aten::repeat", "aten::copy_", "aten::clone", "aten::contiguous")
    copies = [e.name for e in prof.events() if e.name in copying and [7, 48] in e.input_shapes]
    assert copies == []
    torch.testing.assert_close(y, layer.base_layer(x) + layer.adapters["a"](x))


@pytest.mark.parametrize("k,d,side", [(50, 7, 9), (5, 7, 13), (6, 10, 8)])
def test_fused_sharing_gradcheck_where_only_part_of_M_is_live(k, d, side):
    """d < r̂ (only d rows of M reach the output) and k < r̂ (M's columns fold onto x's k inputs)."""
    torch.manual_seed(0)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a, m: sharing_add(b * 1.0, a, m), (base, x, M))
