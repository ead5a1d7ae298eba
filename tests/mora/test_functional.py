import math

import pytest
import torch

from mora import functional as MF
from tests.mora.dense_reference import dense_delta

ALL_VARIANTS = ["sharing", "rope", "truncation", "decouple", "type2", "type3", "type4"]

# (k, d, r̂): one chunk (k ≤ r̂), k > d, d > L, odd r̂, k and d not divisible by r̂, k < d < L, L > 2k.
SHAPES = [
    (6, 10, 8),  # one chunk, d > L
    (40, 12, 6),  # k > d, chunks cut away
    (7, 30, 4),  # d > L (tiling the whole u), k not divisible
    (17, 23, 5),  # odd r̂, nothing divisible
    (23, 17, 6),
    (12, 12, 12),  # exactly one chunk, square
    (5, 7, 13),  # r̂ > k and r̂ > d: wrap padding repeats x more than once
    (32, 32, 8),
]


def _shapes_for(variant: str):
    for k, d, side in SHAPES:
        if variant == "rope" and side % 2:
            continue
        yield k, d, side


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_delta_weight_matches_the_spec_equations(variant):
    torch.manual_seed(0)
    for k, d, side in _shapes_for(variant):
        M = torch.randn(side, side, dtype=torch.float64)
        expected = dense_delta(M, k, d, variant)
        got = MF.mora_delta_weight(M, k, d, variant)
        assert got.shape == (d, k)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=f"{variant} k={k} d={d} r̂={side}")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_forward_equals_x_times_delta_transposed(variant):
    torch.manual_seed(1)
    for k, d, side in _shapes_for(variant):
        M = torch.randn(side, side, dtype=torch.float64)
        x = torch.randn(3, 2, k, dtype=torch.float64)  # two leading dimensions
        y = MF.mora_forward(x, M, k, d, variant)
        assert y.shape == (3, 2, d)
        torch.testing.assert_close(y, x @ dense_delta(M, k, d, variant).T, rtol=1e-6, atol=1e-6)
        # the generic identity of the spec: ΔW = F(I_k)ᵀ
        identity_image = MF.mora_forward(torch.eye(k, dtype=torch.float64), M, k, d, variant)
        torch.testing.assert_close(identity_image.T, MF.mora_delta_weight(M, k, d, variant))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_gradcheck_float64(variant):
    torch.manual_seed(2)
    for k, d, side in [(9, 7, 4), (7, 15, 6)]:
        M = torch.randn(side, side, dtype=torch.float64, requires_grad=True)
        x = torch.randn(2, k, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: MF.mora_forward(a, b, k, d, variant), (x, M))
        assert torch.autograd.gradcheck(lambda b: MF.mora_delta_weight(b, k, d, variant), (M,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["sharing", "rope"])
def test_low_precision_dtypes_follow_float32(dtype, variant):
    torch.manual_seed(3)
    k, d, side = 48, 40, 8
    M = torch.randn(side, side) / side
    x = torch.randn(4, k)
    reference = MF.mora_forward(x, M, k, d, variant)
    low = MF.mora_forward(x.to(dtype), M.to(dtype), k, d, variant)
    assert low.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(low.float(), reference, rtol=tolerance, atol=tolerance)


def test_r_hat_examples_from_the_spec():
    assert MF.r_hat(4096, 4096, 8, "sharing") == 256
    assert MF.r_hat(4096, 11008, 8, "sharing") == 348
    assert MF.r_hat(4096, 4096, 256, "sharing") == 1448
    # rope rounds down to even: sqrt(15104*8) = 347.6 -> 348 is even already; 4096->4096 r=3: 156.8 -> 157 -> 156
    assert MF.r_hat(4096, 4096, 3, "sharing") == 157
    assert MF.r_hat(4096, 4096, 3, "rope") == 156
    assert MF.r_hat(64, 64, 8, 6) == 32
    assert MF.mora_parameter_count(4096, 4096, 8) == 256 ** 2 == MF.lora_parameter_count(4096, 4096, 8)


def test_variant_names_and_reference_types():
    assert MF.normalize_variant(1) == "sharing"
    assert MF.normalize_variant("6") == "rope"
    assert MF.normalize_variant("ROPE") == "rope"
    assert MF.reference_type("rope") == 6 and MF.reference_type("truncation") is None
    with pytest.raises(ValueError, match="unknown MoRA type 5"):
        MF.normalize_variant(5)
    with pytest.raises(ValueError, match="unknown MoRA variant"):
        MF.normalize_variant("lora")
    assert MF.default_variant(8) == "rope" and MF.default_variant(256) == "sharing"


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match="square"):
        MF.mora_forward(torch.randn(2, 8), torch.randn(4, 3), 8, 8, "sharing")
    with pytest.raises(ValueError, match="even"):
        MF.mora_forward(torch.randn(2, 8), torch.randn(5, 5), 8, 8, "rope")
    with pytest.raises(ValueError, match="expects 9"):
        MF.mora_forward(torch.randn(2, 8), torch.randn(4, 4), 9, 8, "sharing")


def test_rope_skips_chunks_whose_outputs_are_cut_away():
    """With k > d, only ceil(d / r̂) chunks are used: changing the inputs of the others changes nothing."""
    k, d, side = 64, 16, 8
    M = torch.randn(side, side)
    x = torch.randn(2, k)
    changed = x.clone()
    changed[:, math.ceil(d / side) * side:] = torch.randn(2, k - 16)
    torch.testing.assert_close(MF.mora_forward(x, M, k, d, "rope"), MF.mora_forward(changed, M, k, d, "rope"))


def test_zero_M_gives_zero_update():
    for variant in ALL_VARIANTS:
        y = MF.mora_forward(torch.randn(3, 20), torch.zeros(6, 6), 20, 11, variant)
        assert torch.count_nonzero(y) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cuda_matches_cpu(variant):
    M = torch.randn(16, 16)
    x = torch.randn(5, 70)
    cpu = MF.mora_forward(x, M, 70, 50, variant)
    gpu = MF.mora_forward(x.cuda(), M.cuda(), 70, 50, variant).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
