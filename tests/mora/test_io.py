"""Save/load round trips, and peft as an oracle for LoRA (both directions) and the reference MoRA layout."""
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

import mora
from mora import AdapterFormatError, LoRAConfig, MoRAConfig
from tests.mora.dense_reference import dense_delta
from tests.mora.tiny_models import random_batch, tiny_gpt2, tiny_llama
from tests.mora.test_inject import _randomise_adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("config", [MoRAConfig(r=4, variant="rope"), MoRAConfig(r=64, variant="sharing"),
                                    MoRAConfig(r=2, variant="truncation"), LoRAConfig(r=4, alpha=8)])
def test_save_load_round_trip(tmp_path, config):
    model = tiny_llama()
    mora.add_adapter(model, "a", config)
    _randomise_adapter(model, "a")
    ids = random_batch()
    expected = _logits(model, ids)
    folder = mora.save_adapter(model, "a", tmp_path / "adapter", base_model_name_or_path="tiny")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == config.r
    fresh = tiny_llama()
    name = mora.load_adapter(fresh, folder)
    assert name == "adapter"
    torch.testing.assert_close(_logits(fresh, ids), expected)
    reloaded = mora.adapter_info(fresh, name)
    assert reloaded.kind == config.kind and reloaded.variant == getattr(config, "variant", None)


def test_mora_stores_M_once_with_reference_config_fields(tmp_path):
    model = tiny_llama()
    mora.add_adapter(model, "a", MoRAConfig(r=8, variant="rope"))
    folder = mora.save_adapter(model, "a", tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_mora"] is True and config["mora_type"] == 6 and config["r"] == 8
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == 14 and all(k.endswith(".lora_A.weight") and k.startswith("base_model.model.") for k in keys)


@pytest.mark.parametrize("make_model,use_rslora", [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, False)])
def test_peft_loads_our_lora_with_identical_outputs(tmp_path, make_model, use_rslora):
    ours = make_model()
    mora.add_adapter(ours, "a", LoRAConfig(r=4, alpha=12, use_rslora=use_rslora))
    _randomise_adapter(ours, "a")
    ids = random_batch()
    expected = _logits(ours, ids)
    folder = mora.save_adapter(ours, "a", tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(make_model(), str(folder))
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model,targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                                (tiny_gpt2, ["c_attn", "c_fc"])])
def test_we_load_peft_lora_with_identical_outputs(tmp_path, make_model, targets):
    base = make_model()
    peft_config = PeftLoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                                 fan_in_fan_out=make_model is tiny_gpt2)
    peft_model = get_peft_model(base, peft_config)
    ids = random_batch()
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = make_model()
    assert not torch.allclose(_logits(ours, ids), expected, atol=1e-4), "peft's random adapter must matter"
    mora.load_adapter(ours, tmp_path / "peft", name="from_peft")
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    # merging our loaded adapter also reproduces peft's outputs
    mora.merge_adapter(ours, "from_peft")
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-4, atol=1e-4)


def _reference_mora_folder(folder, model, mora_type, r, targets):
    """The authors' peft fork layout: both lora_A and lora_B hold the square M."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(11)
    tensors, Ms = {}, {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets:
            d, k = module.weight.shape
            side = mora.r_hat(k, d, r, mora_type)
            M = torch.randn(side, side, generator=generator) * 0.05
            Ms[path] = M
            tensors[f"base_model.model.{path}.lora_A.weight"] = M
            tensors[f"base_model.model.{path}.lora_B.weight"] = M.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": targets, "use_mora": True, "mora_type": mora_type, "bias": "none"}))
    return Ms


@pytest.mark.parametrize("mora_type,variant", [(1, "sharing"), (6, "rope")])
def test_reference_format_mora_folder_loads(tmp_path, mora_type, variant):
    model = tiny_llama()
    targets = ["q_proj", "down_proj"]
    Ms = _reference_mora_folder(tmp_path / "ref", model, mora_type, 8, targets)
    name = mora.load_adapter(model, tmp_path / "ref", name="ref")
    assert mora.adapter_info(model, name).variant == variant
    ids = random_batch()
    got = _logits(model, ids)
    # oracle: the base with ΔW from the spec's dense equations added by hand
    expected_model = tiny_llama()
    with torch.no_grad():
        for path, M in Ms.items():
            module = expected_model.get_submodule(path)
            d, k = module.weight.shape
            module.weight += dense_delta(M, k, d, variant).float()
    torch.testing.assert_close(got, _logits(expected_model, ids), rtol=1e-4, atol=1e-4)


def test_bad_folders_get_named_errors_and_leave_the_model_untouched(tmp_path):
    model = tiny_llama()
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        mora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        mora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="pickled weights are never loaded"):
        mora.load_adapter(model, tmp_path)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(64, 5)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"layers\.0\.self_attn\.q_proj: a LoRA layer needs lora_A and lora_B"):
        mora.load_adapter(model, tmp_path)
    assert not mora.adapted_layers(model)
    save_file({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(96, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="no linear layer 'model.layers.9.mlp.up_proj'"):
        mora.load_adapter(model, tmp_path)
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"up_proj.lora_B: shape \(64, 4\) does not fit this model, expected \(96, 4\)"):
        mora.load_adapter(model, tmp_path)
    assert not mora.adapted_layers(model)
