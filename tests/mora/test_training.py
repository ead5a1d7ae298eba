"""A tiny transformers Llama trains with every adapter, ReMoRA restarts keep the learned update, diagnostics read it."""
import pytest
import torch

import mora
from mora import LoRAConfig, MoRAConfig
from mora.remora import next_variant
from tests.mora.tiny_models import random_batch, tiny_llama

ALL_VARIANTS = ["sharing", "rope", "truncation", "decouple", "type2", "type3", "type4"]


def _train(model, ids, steps=12, lr=5e-3, remora_every=None):
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if remora_every and step % remora_every == 0:
            mora.reset_optimizer_state(optimizer, mora.remora_step(model))
    model.eval()
    return losses


@pytest.mark.parametrize("config", [MoRAConfig(r=8, variant=v) for v in ALL_VARIANTS] + [LoRAConfig(r=8, alpha=16)],
                         ids=ALL_VARIANTS + ["lora"])
def test_loss_falls_with_every_adapter(config):
    model = tiny_llama()
    mora.add_adapter(model, "a", config)
    ids = random_batch(batch=4, length=24)
    losses = _train(model, ids, lr=2e-2 if config.kind == "lora" else 5e-3)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen


def test_remora_merges_resets_and_cycles_without_losing_what_was_learned():
    model = tiny_llama()
    mora.add_adapter(model, "a", MoRAConfig(r=8, variant="sharing"))
    ids = random_batch(batch=4, length=24)
    losses = _train(model, ids, steps=8)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    reset = mora.remora_step(model)
    mora.reset_optimizer_state(optimizer, reset)
    assert all(torch.count_nonzero(p) == 0 for p in reset) and all(p not in optimizer.state for p in reset)
    assert {layer.adapters["a"].variant for layer in mora.adapted_layers(model).values()} == {"type2"}
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < losses[0] and abs(after - before) < 0.5  # the update now lives in the base weights
    assert [next_variant(v) for v in ("sharing", "type2", "type3", "type4")] == ["type2", "type3", "type4", "sharing"]
    assert next_variant("type2", cycle="paper") == "sharing"
    with pytest.raises(ValueError, match="use variant='sharing' with ReMoRA"):
        next_variant("rope")


def test_remora_training_loop_keeps_lowering_the_loss():
    model = tiny_llama()
    mora.add_adapter(model, "a", MoRAConfig(r=4, variant="sharing"))
    ids = random_batch(batch=4, length=24)
    losses = _train(model, ids, steps=15, remora_every=5)
    assert losses[-1] < losses[0] - 0.3, losses


def test_delta_spectrum_shows_mora_rank_above_lora_rank():
    torch.manual_seed(0)
    mora_model, lora_model = tiny_llama(), tiny_llama()
    mora.add_adapter(mora_model, "m", MoRAConfig(r=2, variant="sharing"))
    mora.add_adapter(lora_model, "l", LoRAConfig(r=2))
    ids = random_batch(batch=4, length=24)
    _train(mora_model, ids, steps=5)
    _train(lora_model, ids, steps=5, lr=2e-2)
    mora_spectra = mora.delta_spectrum(mora_model)
    lora_spectra = mora.delta_spectrum(lora_model)
    assert len(mora_spectra) == len(lora_spectra) == 14
    assert all(s.effective_rank <= 2 for s in lora_spectra)
    assert mora.effective_rank_summary(mora_spectra)["mean"] > 8
    assert mora_spectra[0].singular_values.shape[0] == min(mora_spectra[0].shape)
    assert mora.effective_rank(torch.zeros(5)) == 0
    assert mora.effective_rank(torch.tensor([1.0, 0.5, 0.001])) == 2
