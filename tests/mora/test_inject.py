import pytest
import torch

import mora
from mora import LoRAConfig, MoRAConfig
from tests.mora.tiny_models import random_batch, tiny_gpt2, tiny_llama

LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _randomise_adapter(model, name, scale=0.05, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mora.adapted_layers(model).values():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)


def test_default_targets_are_every_block_linear_not_head_or_embeddings():
    model = tiny_llama()
    paths = mora.find_target_modules(model)
    assert len(paths) == 2 * len(LLAMA_PROJECTIONS)
    assert {p.rsplit(".", 1)[-1] for p in paths} == LLAMA_PROJECTIONS
    assert not any("lm_head" in p or "embed" in p for p in paths)
    gpt2_paths = mora.find_target_modules(tiny_gpt2())
    assert {p.rsplit(".", 1)[-1] for p in gpt2_paths} == {"c_attn", "c_proj", "c_fc"}
    assert len(gpt2_paths) == 8


def test_targets_by_names_and_by_regex():
    model = tiny_llama()
    assert len(mora.find_target_modules(model, ["q_proj", "v_proj"])) == 4
    assert mora.find_target_modules(model, r".*\.0\.self_attn\.(q|k)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    with pytest.raises(ValueError, match="no linear layer"):
        mora.find_target_modules(model, ["nonexistent"])


def test_add_adapter_freezes_base_and_reports_budget():
    model = tiny_llama()
    info = mora.add_adapter(model, "m", MoRAConfig(r=8))
    assert info.kind == "mora" and info.variant == "rope"
    count = mora.count_parameters(model)
    assert count.trainable == info.trainable_parameters == sum(side ** 2 for side in info.r_hat.values())
    # 64 -> 64 at r=8: r̂ = sqrt(128*8) = 32, exactly LoRA's budget
    assert info.r_hat["model.layers.0.self_attn.q_proj"] == 32
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    lora = mora.add_adapter(model, "l", LoRAConfig(r=8), activate=False)
    assert lora.trainable_parameters == lora.lora_equivalent_parameters
    assert mora.active_adapter(model) == "m"
    assert mora.count_parameters(model).trainable == info.trainable_parameters
    mora.set_active_adapter(model, "l")
    assert mora.count_parameters(model).trainable == lora.trainable_parameters
    assert "trainable params" in str(mora.count_parameters(model))
    with pytest.raises(ValueError, match="already has"):
        mora.add_adapter(model, "l", LoRAConfig(r=2))
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        mora.set_active_adapter(model, "x")


def test_fresh_adapter_keeps_the_base_outputs():
    model = tiny_llama()
    ids = random_batch()
    with torch.no_grad():
        before = model(ids).logits
        mora.add_adapter(model, "m", MoRAConfig(r=4, variant="sharing"))
        torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_merge_and_unload(make_model):
    model = make_model()
    ids = random_batch()
    with torch.no_grad():
        base_logits = model(ids).logits
    mora.add_adapter(model, "m", MoRAConfig(r=4))
    _randomise_adapter(model, "m")
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base_logits, atol=1e-4)
        mora.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        mora.unmerge_adapter(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        mora.set_active_adapter(model, None)
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-4, atol=1e-4)
        mora.set_active_adapter(model, "m")
        plain = mora.merge_and_unload(model)
        assert not mora.adapted_layers(plain)
        torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_remove_adapter_restores_plain_layers():
    model = tiny_llama()
    mora.add_adapter(model, "a", MoRAConfig(r=2))
    mora.add_adapter(model, "b", LoRAConfig(r=2, target_modules=["q_proj"]))
    mora.remove_adapter(model, "a")
    assert mora.adapter_names(model) == ["b"]
    assert len(mora.adapted_layers(model)) == 2  # only the q_proj layers still carry "b"
    mora.remove_adapter(model, "b")
    assert not mora.adapted_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_adapters_per_row_in_a_whole_model():
    model = tiny_llama()
    for name, config in (("m", MoRAConfig(r=4)), ("l", LoRAConfig(r=4))):
        mora.add_adapter(model, name, config)
        _randomise_adapter(model, name, seed=len(name) + ord(name))
    ids = random_batch(batch=3)
    rows = ["m", None, "l"]
    with torch.no_grad(), mora.adapters_per_row(model, rows):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            mora.set_active_adapter(model, name)
            torch.testing.assert_close(mixed[i], model(ids[i:i + 1]).logits[0], rtol=1e-4, atol=1e-4)
    assert all(layer.row_adapters is None for layer in mora.adapted_layers(model).values())
