"""Streaming, batched generation with one adapter per row on the tiny model (shapes and equivalences, never text)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mora
from workers.generation import GenerationSettings, reply, stream_chat

GREEDY = GenerationSettings(max_new_tokens=8, temperature=0.0)


@pytest.fixture()
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, seed in (("a", 1), ("b", 2)):
        mora.add_adapter(model, name, mora.MoRAConfig(r=8) if name == "a" else mora.LoRAConfig(r=4))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in mora.adapted_layers(model).values():
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model, tokenizer


def test_stream_grows_and_batched_rows_equal_single_runs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    snapshots = list(stream_chat(model, tokenizer, [conversation] * 3, ["a", "b", None], GREEDY))
    assert 1 <= len(snapshots) <= GREEDY.max_new_tokens
    for row in range(3):  # each row's text only grows
        texts = [s[row] for s in snapshots]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    final = snapshots[-1]
    singles = [reply(model, tokenizer, conversation, adapter, GREEDY) for adapter in ("a", "b", None)]
    assert final == singles
    assert len(set(singles)) > 1, "different adapters should answer differently"


def test_prompts_of_different_lengths_in_one_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "user", "content": "Tell me, please, what is the capital of Italy and of Spain?"}]
    batched = list(stream_chat(model, tokenizer, [short, long], ["a", "a"], GREEDY))[-1]
    assert batched == [reply(model, tokenizer, short, "a", GREEDY), reply(model, tokenizer, long, "a", GREEDY)]


def test_bad_settings_are_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="temperature"):
        list(stream_chat(model, tokenizer, [[{"role": "user", "content": "x"}]], [None], GenerationSettings(temperature=-1)))
    with pytest.raises(ValueError, match="2 conversations but 1"):
        list(stream_chat(model, tokenizer, [[], []], [None]))
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        list(stream_chat(model, tokenizer, [[{"role": "user", "content": "x"}]], ["zz"], GREEDY))
