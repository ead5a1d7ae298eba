import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mora import LoRAConfig, MoRAConfig
from mora.layers import AdaptedLinear

VARIANTS = ["sharing", "rope", "truncation", "decouple", "type2", "type3", "type4"]


def _randomise(layer: AdaptedLinear, scale: float = 0.1) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            for parameter in adapter.parameters():
                parameter.copy_(torch.randn_like(parameter) * scale)


def _layer(base: nn.Module, *configs) -> AdaptedLinear:
    layer = AdaptedLinear(base)
    for name, config in configs:
        layer.add_adapter(name, config)
    _randomise(layer)
    return layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_unmerged_forward_and_unmerge_restores(variant):
    torch.manual_seed(0)
    base = nn.Linear(37, 29)
    original = base.weight.detach().clone()
    layer = _layer(base, ("a", MoRAConfig(r=2, variant=variant)))
    layer.active_adapter = "a"
    x = torch.randn(3, 5, 37)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, base(x)), "a random adapter must change the output"
    layer.merge()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), unmerged, rtol=1e-5, atol=1e-5)  # merged: the base alone gives it
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_conv1d_transposed_weight_merges_correctly():
    torch.manual_seed(0)
    base = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs, weight 40 × 24
    layer = _layer(base, ("m", MoRAConfig(r=4, variant="rope")), ("l", LoRAConfig(r=4)))
    assert (layer.in_features, layer.out_features) == (40, 24)
    x = torch.randn(2, 3, 40)
    for name in ("m", "l"):
        layer.active_adapter = name
        expected = base(x) + x @ layer.adapters[name].delta_weight().T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()


def test_two_mora_adapters_of_different_r_hat_on_one_layer():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    layer = _layer(base, ("small", MoRAConfig(r=1, variant="rope")), ("large", MoRAConfig(r=8, variant="rope")))
    assert layer.adapters["small"].r_hat != layer.adapters["large"].r_hat
    x = torch.randn(4, 48)
    outputs = {}
    for name in ("small", "large"):
        layer.active_adapter = name
        outputs[name] = layer(x)
        torch.testing.assert_close(outputs[name], base(x) + x @ layer.adapters[name].delta_weight().T,
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs["small"], outputs["large"])


def test_mixed_batch_equals_rows_run_one_adapter_at_a_time():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = _layer(base, ("m", MoRAConfig(r=4)), ("s", MoRAConfig(r=16, variant="sharing")), ("l", LoRAConfig(r=4)))
    x = torch.randn(5, 7, 32)
    rows = ["m", None, "l", "s", "m"]
    layer.set_row_adapters(rows)
    mixed = layer(x)
    layer.set_row_adapters(None)
    for i, name in enumerate(rows):
        layer.active_adapter = name
        torch.testing.assert_close(mixed[i], layer(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        layer.set_row_adapters(["zz"] * 5)


@pytest.mark.parametrize("rows", [["m", "m", None, "m", "s", "l", "s", "s"],  # uneven: copied rows, index_add
                                  ["m", "s", "l", "m", "s", "l", "m", "s"]])  # taking turns: views, in-place add
def test_mixed_batch_rows_and_gradients_equal_one_adapter_at_a_time(rows):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(32, 24), ("m", MoRAConfig(r=4)), ("s", MoRAConfig(r=16, variant="sharing")),
                   ("l", LoRAConfig(r=4)))
    for adapter in layer.adapters.values():  # LoRA's B and MoRA's M start at zero: make every branch count
        for parameter in adapter.parameters():
            nn.init.normal_(parameter)
    x = torch.randn(len(rows), 3, 32)
    layer.set_row_adapters(rows)
    mixed = layer(x)
    mixed.square().sum().backward()
    batched = {n: [p.grad.clone() for p in a.parameters()] for n, a in layer.adapters.items()}
    layer.zero_grad()
    layer.set_row_adapters(None)
    for i, name in enumerate(rows):
        layer.active_adapter = name
        alone = layer(x[i:i + 1])
        torch.testing.assert_close(mixed[i], alone[0].detach(), rtol=1e-5, atol=1e-5)
        alone.square().sum().backward()
    for name, adapter in layer.adapters.items():
        for got, want in zip(batched[name], adapter.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-4, atol=1e-4)


STACKED_LAYOUTS = {
    "taking turns": ["a", "b", "c"] * 4,  # evaluation and batched chat: each prompt once per adapter
    "blocks": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
    "with base rows": [None, "a", "b", "c"] * 3,
    "one row each": ["a", "b", "c"],
}


def _stackable(configs) -> AdaptedLinear:
    layer = _layer(nn.Linear(48, 40), *zip("abc", configs))
    for adapter in layer.adapters.values():  # LoRA's B and MoRA's M start at zero: make every branch count
        for parameter in adapter.parameters():
            nn.init.normal_(parameter, std=0.3)
    return layer.eval()


@pytest.mark.parametrize("layout", STACKED_LAYOUTS)
@pytest.mark.parametrize("kind", VARIANTS + ["lora"])
def test_stacked_adapters_answer_as_each_alone(kind, layout):
    """Inference with rows of several same-shaped adapters in a regular layout runs them as one batched branch."""
    torch.manual_seed(0)
    config = LoRAConfig(r=4) if kind == "lora" else MoRAConfig(r=4, variant=kind)
    layer = _stackable([config] * 3)
    rows = STACKED_LAYOUTS[layout]
    layer.set_row_adapters(rows)
    assert layer._row_stack is not None and layer._row_stack.names == ("a", "b", "c")
    for tokens in (1, 40):  # fewer rows than r̂ (a generated token) and more (a prompt)
        x = torch.randn(len(rows), tokens, 48)
        with torch.no_grad():
            mixed = layer(x)
        layer.set_row_adapters(None)
        for i, name in enumerate(rows):
            layer.active_adapter = name
            with torch.no_grad():
                torch.testing.assert_close(mixed[i], layer(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
        layer.set_row_adapters(rows)


def test_stacking_needs_one_shape_and_a_regular_layout_and_follows_weight_updates():
    mixed_kinds = _stackable([MoRAConfig(r=4), MoRAConfig(r=4, variant="sharing"), MoRAConfig(r=4)])
    mixed_kinds.set_row_adapters(["a", "b", "c"])
    assert mixed_kinds._row_stack is None  # rope and sharing do not share one product
    layer = _stackable([MoRAConfig(r=4)] * 3)
    layer.set_row_adapters(["a", "a", "b", "c"])  # uneven counts
    assert layer._row_stack is None
    layer.set_row_adapters(["a", "b", "c", "a", "b", "c"])
    x = torch.randn(6, 2, 48)
    with torch.no_grad():
        before = layer(x)
        layer.adapters["b"].weight.mul_(2)  # a change in place (a loaded checkpoint, a training step)
        after = layer(x)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])
    layer.set_row_adapters(None)
    layer.active_adapter = "b"
    with torch.no_grad():
        torch.testing.assert_close(after[4], layer(x[4:5])[0], rtol=1e-5, atol=1e-5)


def test_rotating_the_rows_equals_rotating_m():
    """Rope's two exact forms: the rows rotated chunk by chunk (few rows), M rotated per chunk (many)."""
    from mora import functional as MF
    from mora.fused import rotated_blocks, rotated_pieces

    torch.manual_seed(0)
    M = torch.randn(8, 8, dtype=torch.float64)
    pieces = torch.randn(5, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(MF._linear(rotated_pieces(pieces), M),
                               torch.einsum("...ni,noi->...no", pieces, rotated_blocks(M, 3, rotate=True)))


def test_adapter_weights_stay_float32_while_base_runs_in_bfloat16():
    base = nn.Linear(32, 32).to(torch.bfloat16)
    layer = _layer(base, ("a", MoRAConfig(r=4)))
    layer.active_adapter = "a"
    assert layer.adapters["a"].weight.dtype == torch.float32
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ layer.adapters["a"].delta_weight().T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.adapters["a"].weight.grad is not None and layer.adapters["a"].weight.grad.dtype == torch.float32


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 16), ("a", MoRAConfig(r=4, dropout=0.5)))
    layer.active_adapter = "a"
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_fresh_adapters_start_as_the_base_model():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = AdaptedLinear(base)
    layer.add_adapter("m", MoRAConfig(r=2))
    layer.add_adapter("l", LoRAConfig(r=2))
    x = torch.randn(3, 20)
    for name in ("m", "l"):
        layer.active_adapter = name
        torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.adapters["l"].lora_A) > 0  # Kaiming-uniform A, zero B


def test_mora_gradient_at_zero_is_not_zero():
    layer = AdaptedLinear(nn.Linear(16, 16))
    layer.add_adapter("m", MoRAConfig(r=2))
    layer.active_adapter = "m"
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert layer.adapters["m"].weight.grad.abs().sum() > 0


def test_lora_rslora_scaling():
    layer = AdaptedLinear(nn.Linear(8, 8))
    plain = layer.add_adapter("p", LoRAConfig(r=4, alpha=8))
    rs = layer.add_adapter("r", LoRAConfig(r=4, alpha=8, use_rslora=True))
    assert plain.scaling == 2.0 and rs.scaling == 4.0


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Linear or Conv1D"):
        AdaptedLinear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="positive integer"):
        MoRAConfig(r=0)
    layer = AdaptedLinear(nn.Linear(4, 4))
    layer.add_adapter("a", LoRAConfig(r=1))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", LoRAConfig(r=1))
    layer.merge(["a"])
    layer.set_row_adapters(["a"])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(1, 4))
