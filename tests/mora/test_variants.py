"""The variant registry: everything about a variant derives from its one entry, so a variant registered here, in the
test alone, works in the forward, the delta weight, merge, save/load and the configs with no other edit."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mora
from mora import functional as MF
from mora import variants
from tests.mora.tiny_models import random_batch, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _reversed_strided_sum(x: torch.Tensor, side: int) -> torch.Tensor:
    """The toy's compression: reverse the features, wrap-pad to n·r̂ and sum the chunks."""
    k = x.shape[-1]
    chunks = -(-k // side)
    padded = x.flip(-1)[..., torch.arange(chunks * side) % k]
    return padded.reshape(*x.shape[:-1], chunks, side).sum(-2)


def _reversed_tile(z: torch.Tensor, out_features: int) -> torch.Tensor:
    return z[..., torch.arange(out_features) % z.shape[-1]].flip(-1)


@pytest.fixture
def toy():
    spec = mora.register_variant(mora.VariantSpec("toy", "reversed sharing, for this test", even_side=True,
                                                  compress=_reversed_strided_sum, decompress=_reversed_tile))
    yield spec
    mora.unregister_variant("toy")


@pytest.mark.parametrize("in_features,out_features,r", [(12, 20, 2), (20, 12, 1), (7, 5, 3), (64, 96, 4)])
def test_a_registered_variant_computes_its_forward_and_delta_weight(toy, in_features, out_features, r):
    side = mora.r_hat(in_features, out_features, r, "toy")
    assert side % 2 == 0  # even_side rounds like rope
    generator = torch.Generator().manual_seed(0)
    M = torch.randn(side, side, generator=generator, dtype=torch.float64)
    x = torch.randn(3, in_features, generator=generator, dtype=torch.float64)
    expected = _reversed_tile(_reversed_strided_sum(x, side) @ M.T, out_features)
    torch.testing.assert_close(MF.mora_forward(x, M, in_features, out_features, "toy"), expected)
    delta = MF.mora_delta_weight(M, in_features, out_features, "toy")  # the generic F(I)ᵀ
    assert delta.shape == (out_features, in_features)
    torch.testing.assert_close(x @ delta.T, expected)
    with pytest.raises(ValueError, match="r̂ must be even"):
        MF.mora_forward(x, torch.zeros(3, 3, dtype=torch.float64), in_features, out_features, "toy")


def test_a_registered_variant_trains_merges_saves_and_loads(toy, tmp_path):
    model = tiny_llama()
    config = mora.MoRAConfig(r=2, variant="TOY")
    assert config.variant == "toy"
    mora.add_adapter(model, "a", config)
    with torch.no_grad():
        for layer in mora.adapted_layers(model).values():
            layer.adapters["a"].weight.normal_(std=0.05)
    ids = random_batch()
    with torch.no_grad():
        adapted = model(ids).logits
    folder = mora.save_adapter(model, "a", tmp_path / "toy")
    fresh = tiny_llama()
    mora.load_adapter(fresh, folder, name="a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, adapted)
        mora.merge_adapter(model, "a")
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-4)
    assert mora.adapter_info(fresh, "a").variant == "toy"
    from workers.train_config import TrainConfig  # the studio's config takes it too, from the same registry

    TrainConfig(data="x.jsonl", adapter="mora", variant="toy").validate()
    assert TrainConfig(data="x.jsonl", adapter="mora", variant="toy").resolved().variant == "toy"


def test_unregistered_and_duplicate_variants_are_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        mora.register_variant(mora.VariantSpec("toy", "again"))
    with pytest.raises(ValueError, match="reference type 6 is already 'rope'"):
        mora.register_variant(mora.VariantSpec("other", "clash", reference_type=6))
    with pytest.raises(ValueError, match="ReMoRA successor 'nowhere'"):
        mora.register_variant(mora.VariantSpec("other", "bad successor", remora_next="nowhere"))
    with pytest.raises(ValueError, match="neither a forward nor compress and decompress"):
        mora.register_variant(mora.VariantSpec("empty", "no maps"))
        try:
            MF.mora_forward(torch.zeros(1, 4), torch.zeros(2, 2), 4, 4, "empty")
        finally:
            mora.unregister_variant("empty")
    mora.unregister_variant("toy")
    with pytest.raises(ValueError, match="unknown MoRA variant 'toy'"):
        mora.MoRAConfig(r=2, variant="toy")


def test_the_built_in_table():
    assert variants.variant_names() == ("rope", "sharing", "truncation", "decouple", "type2", "type3", "type4")
    assert variants.reference_types() == {6: "rope", 1: "sharing", 2: "type2", 3: "type3", 4: "type4"}
    assert variants.ablation_variants() == ("truncation", "sharing", "decouple", "rope")  # Table 4's order
    assert variants.remora_variants() == ("sharing", "type2", "type3", "type4")
    assert mora.remora.CYCLES["reference"] == ("sharing", "type2", "type3", "type4")
    assert [variants.get_variant(name).even_side for name in variants.variant_names()] == [
        True, False, False, False, False, False, False]


def test_the_variant_table_imports_without_torch():
    code = ("import sys, mora.variants as v; assert v.r_hat(4096, 4096, 8, 'rope') == 256; "
            "assert v.normalize_variant(6) == 'rope'; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
