"""Streaming, batched generation with one adapter per row on the tiny model (shapes and equivalences, never text)."""
import contextlib
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mora
from workers import generation
from workers.generation import GenerationSettings, LengthError, check_lengths, reply, stream_chat

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


def test_a_stop_takes_effect_within_a_token_and_keeps_the_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    settings = GenerationSettings(max_new_tokens=40, temperature=0.0)
    full = list(stream_chat(model, tokenizer, [conversation], ["a"], settings))
    asked = []

    def after_three_tokens():
        asked.append(1)
        return len(asked) >= 3

    stopped = list(stream_chat(model, tokenizer, [conversation], ["a"], settings, should_stop=after_three_tokens))
    assert len(full) > 5 and len(stopped) <= 4  # three tokens, and a last snapshot when decoding held a byte back
    assert full[-1][0].startswith(stopped[-1][0])


def test_closing_the_stream_stops_the_generation(model_and_tokenizer, monkeypatch):
    """generate runs beside its reader in the reader's own thread (no second OpenMP pool): closing the stream unwinds
    it there and then, its adapters restored, and grad mode never leaks between the two sides."""
    model, tokenizer = model_and_tokenizer
    entered, exited, steps = [], [], []
    real = generation.mora.adapters_per_row

    @contextlib.contextmanager
    def recorded(*args, **kwargs):
        entered.append(True)
        try:
            with real(*args, **kwargs):
                yield
        finally:
            exited.append(True)

    monkeypatch.setattr(generation.mora, "adapters_per_row", recorded)
    hook = model.register_forward_hook(lambda *_: steps.append(torch.is_grad_enabled()))
    threads_before = threading.active_count()
    try:
        stream = stream_chat(model, tokenizer, [[{"role": "user", "content": "Hi"}]], [None],
                             GenerationSettings(max_new_tokens=200, temperature=1.0, seed=0))
        next(stream)
        next(stream)
        assert threading.active_count() == threads_before  # no thread of its own
        assert torch.is_grad_enabled()  # the reader's grad mode, although generate runs under no_grad
        assert entered and not exited
        taken = len(steps)
        stream.close()
    finally:
        hook.remove()
    assert exited, "closing the stream must end the generation and restore the adapters"
    assert len(steps) == taken and not any(steps)  # nothing ran after the close; every step without grad


def test_lengths_past_the_context_are_refused_with_the_numbers():
    check_lengths([[1] * 100, [1] * 20], 156, 256)  # exactly full: fine
    with pytest.raises(LengthError) as refused:
        check_lengths([[1] * 20, [1] * 300], 128, 256)
    assert refused.value.rows == [1]
    assert str(refused.value) == ("the conversation is 300 tokens, but this model reads at most 256 tokens and 128 of "
                                  "them are kept for the answer (max new tokens): shorten the message or start a new "
                                  "conversation (at most 128 tokens)")
    with pytest.raises(LengthError, match="lower max new tokens to 56$"):
        check_lengths([[1] * 200], 128, 256)
    with pytest.raises(LengthError, match="max_new_tokens is 300 but this model reads at most 256 tokens, the prompt "
                                          "included: lower max new tokens below 256"):
        check_lengths([], 300, 256)
    with pytest.raises(ValueError, match="max_new_tokens .* must be between 1 and 4096, got 0"):
        GenerationSettings(max_new_tokens=0).validate()
