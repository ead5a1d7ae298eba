"""MoRA of the sharing family as an exact LoRA: the factor matrices against the spec's dense maps (built element by
element in tests/mora/dense_reference.py), the LoRA forward against the MoRA forward, peft as the oracle that a
LoRA-only tool loads the result, and the refusal of the variants whose update is not of rank r̂."""
import json

import pytest
import torch
from peft import PeftModel

import mora
from mora import functional as MF
from mora.lora_export import NotExactLoRA, add_exact_lora, compression_matrices, exact_lora_factors, lora_problem
from tests.mora import dense_reference as ref
from tests.mora.test_inject import _randomise_adapter
from tests.mora.tiny_models import random_batch, tiny_gpt2, tiny_llama

MAPS = {"sharing": ("strided", "tile"), "type2": ("contiguous", "interleave"), "type3": ("contiguous", "tile"),
        "type4": ("strided", "interleave"), "truncation": ("truncate", "zero-pad")}
# (k, d, r̂): one chunk, k > d, d > L, nothing divisible, r̂ larger than both sides, odd r̂
SHAPES = [(8, 8, 8), (40, 12, 7), (12, 50, 5), (37, 23, 6), (5, 3, 9), (64, 128, 39)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", sorted(MAPS))
@pytest.mark.parametrize("k, d, side", SHAPES)
def test_the_factors_are_the_specs_maps_and_multiply_to_the_delta(variant, k, d, side):
    compress, decompress = compression_matrices(variant, k, d, side, dtype=torch.float64)
    comp_kind, decomp_kind = MAPS[variant]
    assert torch.equal(compress, ref.compress_matrix(comp_kind, k, side))
    assert torch.equal(decompress, ref.decompress_matrix(decomp_kind, d, side))

    M = torch.randn(side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(k * d + side))
    adapter = mora.MoRAAdapter(k, d, mora.MoRAConfig(r=1, variant=variant, dtype=torch.float64), r_hat=side)
    with torch.no_grad():
        adapter.weight.copy_(M)
    A, B = exact_lora_factors(adapter)
    assert A.shape == (side, k) and B.shape == (d, side)
    torch.testing.assert_close(B @ A, ref.dense_delta(M, k, d, variant), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, k, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close((x @ A.T) @ B.T, MF.mora_forward(x, M, k, d, variant), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["rope", "decouple"])
def test_block_diagonal_variants_are_refused_with_the_reason(variant):
    problem = lora_problem(variant)
    assert "block-diagonal" in problem and "merge it" in problem
    with pytest.raises(NotExactLoRA, match="merge it"):
        compression_matrices(variant, 64, 64, 16)
    model = tiny_llama()
    mora.add_adapter(model, "m", mora.MoRAConfig(r=4, variant=variant))
    with pytest.raises(NotExactLoRA, match="rank up to n·r̂"):
        add_exact_lora(model, "m", "lora")
    assert mora.adapter_names(model) == ["m"]  # nothing half-attached


def test_a_lora_adapter_is_not_converted():
    model = tiny_llama()
    mora.add_adapter(model, "l", mora.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="not MoRA"):
        add_exact_lora(model, "l", "lora")


@pytest.mark.parametrize("make_model, variant, r", [(tiny_llama, "sharing", 8), (tiny_llama, "sharing", 64),
                                                     (tiny_llama, "truncation", 4), (tiny_llama, "type3", 8),
                                                     (tiny_gpt2, "sharing", 8)])
def test_the_exact_lora_equals_mora_and_peft_loads_it(tmp_path, make_model, variant, r):
    model = make_model()
    mora.add_adapter(model, "m", mora.MoRAConfig(r=r, variant=variant))
    _randomise_adapter(model, "m", scale=0.05)
    ids = random_batch()
    expected = _logits(model, ids)
    info = add_exact_lora(model, "m", "lora")
    mora_info = mora.adapter_info(model, "m")
    assert info.layers == mora_info.layers and info.r == max(mora_info.r_hat.values())
    assert len(set(mora_info.r_hat.values())) > 1  # layers of different r̂ share one rank
    assert mora.active_adapter(model) == "m"
    mora.set_active_adapter(model, "lora")
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)

    folder = mora.save_adapter(model, "lora", tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == info.r and "use_mora" not in config
    peft_model = PeftModel.from_pretrained(make_model(), str(folder)).eval()
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(make_model(), ids), expected, atol=1e-3)  # the adapter does change the model
