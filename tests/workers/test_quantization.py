"""Quantised bases on the CPU: mora's adapters wrapping a quantised linear layer, the dequantising merge, and the
refusals where bitsandbytes cannot run. bitsandbytes' own 4-bit and 8-bit layers need a CUDA GPU, so these tests use
a stand-in with their shape of interface (an `nn.Linear` subclass whose weight is packed integers with a scale, and
a forward that dequantises on the fly); `benchmarks/gpu_check.sh` runs the real layers on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mora
from mora.layers import AdaptedLinear
from tests.workers.sample_data import write_dataset
from workers import quantization
from workers.model_loading import load_model
from workers.train_config import ConfigError, TrainConfig
from workers.training import run_training


class FakeLinear8bit(nn.Linear):
    """8-bit rows with a float scale each, stored flattened (as Linear4bit packs its weight in another shape)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8).reshape(-1, 1), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.reshape(self.out_features, self.in_features).float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized().to(x.dtype), bias)


@pytest.fixture(autouse=True)
def fake_dequantizer():
    quantization.DEQUANTIZERS["FakeLinear8bit"] = FakeLinear8bit.dequantized
    yield
    quantization.DEQUANTIZERS.pop("FakeLinear8bit")


def _quantize_linears(model: nn.Module) -> int:
    targets = [path for path, module in model.named_modules() if type(module) is nn.Linear and "lm_head" not in path]
    for path in targets:
        mora.inject.replace_module(model, path, FakeLinear8bit(model.get_submodule(path)))
    return len(targets)


@pytest.mark.parametrize("config", [mora.MoRAConfig(r=4, variant="rope"), mora.MoRAConfig(r=4, variant="sharing"),
                                    mora.LoRAConfig(r=4)], ids=["mora-rope", "mora-sharing", "lora"])
def test_an_adapter_wraps_a_quantised_layer_and_only_the_adapter_trains(config):
    torch.manual_seed(0)
    base = FakeLinear8bit(nn.Linear(24, 40))
    layer = AdaptedLinear(base)
    assert (layer.in_features, layer.out_features) == (24, 40)  # from the layer, not its packed (960 × 1) weight
    adapter = layer.add_adapter("a", config)
    layer.active_adapter = "a"
    adapter.requires_grad_(True)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.1)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in adapter.parameters())
    expected = base(x.float()) + adapter(x.float())  # the quantised base's forward, plus the float32 branch
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert base.weight.grad is None and not base.weight.requires_grad

    with pytest.raises(TypeError, match="quantised base layer FakeLinear8bit"):
        layer.merge()


def test_a_model_with_quantised_linears_trains_and_its_dequantised_merge_is_the_function_that_trained(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert _quantize_linears(model) == 14
    info = mora.add_adapter(model, "qmora", mora.MoRAConfig(r=8))
    assert len(info.layers) == 14 and all(
        isinstance(model.get_submodule(path).base_layer, FakeLinear8bit) for path in info.layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokenizer(["The capital of France is Paris."] * 2, return_tensors="pt")["input_ids"]
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        adapted = model(ids).logits
    assert quantization.dequantize_model(model, torch.float32) == 14
    assert not any(isinstance(m, FakeLinear8bit) for m in model.modules())
    merged = mora.merge_and_unload(model, ["qmora"])
    assert not mora.adapted_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_a_quantised_base_is_refused_with_the_reason_where_bitsandbytes_cannot_run(tmp_path, tiny_model_dir):
    problem = quantization.backend_problem()
    assert problem is not None and "CUDA GPU" in problem  # this machine has none
    data = write_dataset(tmp_path, "chat")
    config = TrainConfig(data=str(data), model=str(tiny_model_dir), quantization="nf4", max_steps=2)
    config.validate()
    result = run_training(config, tmp_path / "run")
    assert result.status == "failed" and result.message == f"quantization nf4: {problem}"


@pytest.mark.parametrize("values,expected", [
    ({"adapter": "full", "quantization": "nf4"}, "full fine-tuning trains the base itself"),
    ({"remora_steps": 10, "variant": "sharing", "quantization": "int8"}, "ReMoRA folds M into the base"),
    ({"dtype": "float32", "quantization": "nf4"}, "computes in bfloat16 or float16"),
    ({"quantization": "fp4"}, "quantization: expected one of none, nf4, int8, got 'fp4'"),
])
def test_quantisation_settings_that_cannot_train_are_refused_before_the_run(values, expected):
    with pytest.raises(ConfigError, match=expected):
        TrainConfig.from_dict({"data": "x.jsonl", **values}).validate()


def test_a_merged_export_of_a_quantised_run_is_refused_with_the_reason_where_it_cannot_dequantise(tmp_path):
    from workers.export import ExportError, ExportRequest, _dequantized_base

    request = ExportRequest.from_dict({
        "run_id": "r1", "run_name": "q", "run_dir": str(tmp_path), "output_dir": str(tmp_path / "adapter"),
        "output_kind": "adapter", "base_model": None, "adapter": "mora", "variant": "rope", "remora": False,
        "format": "merged", "quantization": "nf4"})
    with pytest.raises(ExportError, match="trained on a nf4 base, which an export dequantises with bitsandbytes: "
                                          "no CUDA GPU here.*export it as format adapter"):
        _dequantized_base(request)
