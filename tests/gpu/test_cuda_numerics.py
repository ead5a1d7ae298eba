"""Every variant, LoRA, the fused sharing path and mixed per-row batches in bfloat16 and float16 on the GPU, against
the same arithmetic in float64 on the CPU.

The reference is computed from the very values the GPU saw (inputs and weights rounded to the low precision first,
then widened to float64), so what is measured is the GPU path's own rounding, not the rounding of its inputs. Each
intermediate the low-precision path stores (the compressed input, M's product, the decompressed branch, the sum with
the base output) is rounded once to the dtype's unit roundoff u (bfloat16: 2^-8, float16: 2^-11), and the GPU's
matrix products accumulate in float32; a handful of such roundings bound the relative (Frobenius) error by a few u.
The tests allow 8u: bfloat16 3.1%, float16 0.39%. A wrong layout, permutation or sign is off by order 100%.

Sizes: the GPU takes layers of 1024 and 1536 features at 512 tokens, large enough to go through the tensor-core
kernels; the CPU dry run takes toy sizes (the same code, so a typo fails before a GPU is lent).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mora import LoRAConfig, MoRAConfig, adapters_per_row, functional as MF
from mora.fused import sharing_add
from mora.layers import AdaptedLinear
from mora.variants import r_hat, variant_names

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TOLERANCE_UNITS = 8


def _sizes(device: torch.device) -> tuple[list[tuple[int, int]], int, list[int]]:
    """(k, d) shapes (wide, narrow, and one not divisible by r̂), tokens, and the ranks."""
    if device.type == "cuda":
        return [(1024, 1536), (1536, 1024), (1000, 1000)], 512, [8, 256]
    return [(48, 72), (72, 48), (50, 50)], 8, [4, 32]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close_in(dtype: torch.dtype, got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error, allowed = relative_error(got, expected), TOLERANCE_UNITS * UNIT_ROUNDOFF[dtype]
    assert torch.isfinite(got).all(), f"{what}: non-finite values in {dtype}"
    assert error <= allowed, f"{what}: relative error {error:.2e} in {dtype}, allowed {allowed:.2e}"


def _rounded(shape, dtype, scale=1.0, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", variant_names())
def test_every_variant_forward_backward_and_delta_match_float64(gpu_device, variant, dtype):
    shapes, tokens, ranks = _sizes(gpu_device)
    for k, d in shapes:
        for r in ranks:
            side = r_hat(k, d, r, variant)
            x = _rounded((tokens, k), dtype, seed=1)
            M = _rounded((side, side), dtype, scale=side**-0.5, seed=2)
            grad = _rounded((tokens, d), dtype, seed=3)
            where = f"{variant} k={k} d={d} r={r} (r̂={side})"

            x_ref, M_ref = x.double().requires_grad_(True), M.double().requires_grad_(True)
            y_ref = MF.mora_forward(x_ref, M_ref, k, d, variant)
            y_ref.backward(grad.double())

            x_gpu = x.to(gpu_device).requires_grad_(True)
            M_gpu = M.to(gpu_device).requires_grad_(True)
            y_gpu = MF.mora_forward(x_gpu, M_gpu, k, d, variant)
            y_gpu.backward(grad.to(gpu_device))
            assert y_gpu.dtype == dtype and y_gpu.device.type == gpu_device.type
            assert_close_in(dtype, y_gpu, y_ref, f"{where}: forward")
            assert_close_in(dtype, x_gpu.grad, x_ref.grad, f"{where}: input gradient")
            assert_close_in(dtype, M_gpu.grad, M_ref.grad, f"{where}: M gradient")
            delta = MF.mora_delta_weight(M.to(gpu_device), k, d, variant)
            assert_close_in(dtype, delta, MF.mora_delta_weight(M.double(), k, d, variant), f"{where}: delta weight")


def _adapted(base: nn.Linear, configs: dict[str, object], seed: int = 4) -> AdaptedLinear:
    layer = AdaptedLinear(base)
    torch.manual_seed(seed)
    for name, config in configs.items():
        adapter = layer.add_adapter(name, config)
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
    return layer


def _base(k: int, d: int, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    base = nn.Linear(k, d, bias=True, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(_rounded((d, k), dtype, scale=k**-0.5, seed=5))
        base.bias.copy_(_rounded((d,), dtype, seed=6))
    return base.to(device=device, dtype=dtype).requires_grad_(False)


ADAPTERS = {"mora rope": MoRAConfig(r=8, variant="rope"), "mora sharing": MoRAConfig(r=8, variant="sharing"),
            "lora": LoRAConfig(r=8)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapted_layer_forward_backward_and_merge_on_a_low_precision_base(gpu_device, adapter, dtype):
    """The studio's layout: base weights in bf16/fp16, the adapter in float32 on top; merged, the base weight holds
    W0 + ΔW rounded once to the base dtype and gives the same output."""
    shapes, tokens, _ = _sizes(gpu_device)
    for k, d in shapes:
        layer = _adapted(_base(k, d, dtype, gpu_device), {"a": ADAPTERS[adapter]})
        layer.active_adapter = "a"
        reference = _adapted(_base(k, d, dtype, torch.device("cpu")), {"a": ADAPTERS[adapter]}).double()
        reference.active_adapter = "a"
        reference.load_state_dict({key: value.double() for key, value in layer.state_dict().items()})
        reference.adapters["a"].requires_grad_(True)
        layer.adapters["a"].requires_grad_(True)
        x = _rounded((tokens, k), dtype, seed=7)
        where = f"{adapter} k={k} d={d}"

        expected = reference(x.double())
        expected.sum().backward()
        got = layer(x.to(gpu_device))
        got.sum().backward()
        assert got.dtype == dtype
        assert_close_in(dtype, got, expected, f"{where}: forward")
        for (name, parameter), (_, ref_parameter) in zip(layer.adapters["a"].named_parameters(),
                                                         reference.adapters["a"].named_parameters()):
            assert parameter.dtype == torch.float32
            assert_close_in(dtype, parameter.grad, ref_parameter.grad, f"{where}: gradient of {name}")
        with torch.no_grad():
            layer.merge()
            merged = layer(x.to(gpu_device))
        assert_close_in(dtype, merged, expected, f"{where}: merged forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sharing_path_on_the_device(gpu_device, dtype):
    shapes, tokens, ranks = _sizes(gpu_device)
    for k, d in shapes:
        for r in ranks:
            side = r_hat(k, d, r, "sharing")
            base = _rounded((tokens, d), dtype, seed=8)
            x = _rounded((tokens, k), dtype, seed=9)
            M = _rounded((side, side), dtype, scale=side**-0.5, seed=10)
            grad = _rounded((tokens, d), dtype, seed=11)
            where = f"fused sharing k={k} d={d} r={r}"
            x_ref, M_ref = x.double().requires_grad_(True), M.double().requires_grad_(True)
            expected = base.double() + MF.mora_forward(x_ref, M_ref, k, d, "sharing")
            expected.backward(grad.double())
            x_gpu = x.to(gpu_device).requires_grad_(True)
            M_gpu = M.to(gpu_device).requires_grad_(True)
            got = sharing_add(base.to(gpu_device).clone(), x_gpu, M_gpu)
            got.backward(grad.to(gpu_device))
            assert_close_in(dtype, got, expected, f"{where}: forward")
            assert_close_in(dtype, x_gpu.grad, x_ref.grad, f"{where}: input gradient")
            assert_close_in(dtype, M_gpu.grad, M_ref.grad, f"{where}: M gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_per_row_batch_matches_each_row_alone(gpu_device, dtype):
    """One forward with rows on three adapters and on the base alone, as the chat worker batches them."""
    shapes, tokens, _ = _sizes(gpu_device)
    k, d = shapes[0]
    model = nn.Sequential(_adapted(_base(k, d, dtype, gpu_device), ADAPTERS))
    reference = nn.Sequential(_adapted(_base(k, d, dtype, torch.device("cpu")), ADAPTERS)).double()
    reference.load_state_dict({key: value.double() for key, value in model.state_dict().items()})
    rows = ["mora rope", None, "lora", "mora sharing", "mora rope", None, "mora sharing", "lora"]
    x = _rounded((len(rows), tokens, k), dtype, seed=12)
    with torch.no_grad(), adapters_per_row(model, rows):
        got = model(x.to(gpu_device))
    for index, name in enumerate(rows):
        reference[0].active_adapter = name
        with torch.no_grad():
            expected = reference(x[index:index + 1].double())
        assert_close_in(dtype, got[index:index + 1], expected, f"row {index} ({name or 'base only'})")
