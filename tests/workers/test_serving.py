"""The API's batching on a chat worker, in-process: rows with their own settings, stop strings and callers in one
`generate` answer as each would alone; the worker's server takes waiting requests from a real (embedded) Redis and
answers them in one batch per base, refusing the bad ones alone. Equalities and counts only, never generated text."""
import json
import time

import pytest

from tests.workers.test_chat import adapters, env  # noqa: F401  (fixtures: three random adapters on the tiny model)
from tests.workers.test_generation import model_and_tokenizer  # noqa: F401
from workers import bus
from workers.chat import ChatEngine
from workers.embedded_redis import EmbeddedRedis
from workers.generation import GenerationSettings, render_prompt, stream_rows
from workers.serving import Server, run_waiting_requests, take_waiting

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _final(model, tokenizer, prompts, adapters, settings, **kwargs):
    return list(stream_rows(model, tokenizer, prompts, adapters, settings, **kwargs))[-1]


def _printable_stop(text: str) -> str:
    """Two printable ASCII characters from inside `text`, not at its start."""
    for start in range(1, len(text) - 1):
        piece = text[start:start + 2]
        if piece.isascii() and piece.isprintable() and not piece.isspace():
            return piece
    raise AssertionError(f"no printable pair in {text!r}")


def test_rows_with_their_own_settings_answer_as_each_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = render_prompt(tokenizer, QUESTION)
    short = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    rows = [(prompt, "a", GenerationSettings(max_new_tokens=8, temperature=0.0)),
            (short, "b", GenerationSettings(max_new_tokens=5, temperature=0.9, top_p=0.8, seed=7)),
            (prompt, None, GenerationSettings(max_new_tokens=3, temperature=0.0)),
            (short, "a", GenerationSettings(max_new_tokens=6, temperature=1.3, top_p=1.0, seed=11))]
    together = _final(model, tokenizer, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    alone = [_final(model, tokenizer, [p], [a], [s])[0] for p, a, s in rows]
    assert together == alone
    for output, (_, _, settings) in zip(together, rows):
        assert output.finish_reason in ("stop", "length")
        assert output.tokens == settings.max_new_tokens or output.finish_reason == "stop"
    again = _final(model, tokenizer, [short], ["b"], [rows[1][2]])[0]
    assert again == alone[1], "a seed gives the same sampled answer"


def test_a_stop_string_cuts_the_answer_ends_the_row_and_never_streams(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt, greedy = render_prompt(tokenizer, QUESTION), GenerationSettings(max_new_tokens=16, temperature=0.0)
    full = _final(model, tokenizer, [prompt], ["a"], [greedy])[0]
    stop = _printable_stop(full.text)
    snapshots = list(stream_rows(model, tokenizer, [prompt, prompt], ["a", "a"], [greedy, greedy], [[stop], []]))
    cut, other = snapshots[-1]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.tokens < full.tokens
    assert other == full, "a row without stop strings goes on"
    streamed = [s[0].text for s in snapshots]
    assert all(stop not in text for text in streamed)
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:]))


def test_a_row_whose_caller_left_ends_while_the_others_go_on(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt, greedy = render_prompt(tokenizer, QUESTION), GenerationSettings(max_new_tokens=12, temperature=0.0)
    steps = []

    def leaving():
        steps.append(1)
        return {0} if len(steps) > 2 else set()

    gone, staying = _final(model, tokenizer, [prompt, prompt], ["a", "b"], [greedy, greedy], rows_to_end=leaving)
    assert gone.tokens == 3 and gone.finish_reason == "length"
    assert staying == _final(model, tokenizer, [prompt], ["b"], [greedy])[0]


# ---- the worker's server on a real Redis --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="module")
def redis_client(redis_url):
    return bus.connect(redis_url)


def _request(request_id, adapter=None, max_new_tokens=12, **extra):
    return {"id": request_id, "base_model": "tiny-llama", "adapter_path": adapter, "messages": QUESTION,
            "settings": {"max_new_tokens": max_new_tokens, "temperature": 0.0}, "stop": [], **extra}


def _last(client, request_id):
    return bus.last_chat_snapshot(client, request_id)


def test_requests_for_several_adapters_answer_in_one_batch_and_bad_ones_alone(env, adapters, redis_client):
    server = Server(redis_client, ChatEngine())
    good = {"base": None, "mora": adapters["mora"], "lora": adapters["lora"], "sharing": adapters["sharing"]}
    requests = [_request(name, path) for name, path in good.items()]
    requests += [_request("ghost", "/nowhere"), _request("too-long", max_new_tokens=256),
                 _request("no-room", messages=[{"role": "user", "content": "capital " * 300}]),
                 _request("bad-temperature", settings={"max_new_tokens": 4, "temperature": 9})]
    server.answer(requests)
    finals = {r["id"]: _last(redis_client, r["id"]) for r in requests}
    batch_ids = {finals[name]["extra"]["batch_id"] for name in good}
    assert len(batch_ids) == 1 and all(finals[name]["extra"]["batch_size"] == 4 for name in good)
    for name, path in good.items():
        extra = finals[name]["extra"]
        assert finals[name]["done"] and finals[name]["error"] is None
        assert extra["prompt_tokens"] > 0 and 0 < extra["completion_tokens"] <= 12
        alone_id = f"{name}-alone"
        server.answer([_request(alone_id, path)])
        assert _last(redis_client, alone_id)["texts"] == finals[name]["texts"], f"{name}: batched differs from alone"
    assert finals["ghost"]["extra"]["error_type"] == "not_found_error"
    assert "adapter folder /nowhere does not exist" in finals["ghost"]["error"]
    assert finals["too-long"]["extra"] == {"error_type": "invalid_request_error", "param": "max_tokens",
                                           "code": "context_length_exceeded"}
    assert finals["too-long"]["error"].startswith("max_tokens is 256 but this model reads at most 256 tokens")
    assert finals["no-room"]["extra"]["param"] == "messages"
    assert finals["no-room"]["error"].startswith("the conversation is ")
    assert finals["bad-temperature"]["extra"]["param"] == "temperature"
    assert finals["bad-temperature"]["error"] == "temperature: must be between 0 and 5, got 9.0"


def test_waiting_requests_are_taken_together_after_the_window_and_stale_ones_dropped(redis_client):
    redis_client.delete(bus.SERVE_PENDING)
    now = time.time()
    for item in [_request("fresh", enqueued_at=now, expires_at=now + 30), _request("late", enqueued_at=now - 60,
                                                                                  expires_at=now - 30),
                 _request("left", enqueued_at=now, expires_at=now + 30), _request("next", enqueued_at=now)]:
        redis_client.rpush(bus.SERVE_PENDING, json.dumps(item))
    redis_client.rpush(bus.SERVE_PENDING, "not json")
    bus.request_chat_stop(redis_client, "left")
    started = time.monotonic()
    taken = take_waiting(redis_client, window_s=0.3, max_batch=4)
    waited = time.monotonic() - started
    assert [r["id"] for r in taken] == ["fresh", "next"]
    assert 0.2 < waited < 1.0, waited
    assert redis_client.lrange(bus.SERVE_PENDING, 0, -1) == ["not json"], "at most max_batch are taken"
    assert take_waiting(redis_client, window_s=0.3, max_batch=4) == []
    started = time.monotonic()
    assert take_waiting(redis_client, window_s=5, max_batch=4) == []
    assert time.monotonic() - started < 1, "an empty list is answered at once"


@pytest.mark.parametrize("newest_after_s, least_s, most_s", [
    (0.25, 0.45, 1.0),  # one arrived 0.25 s after the first: the window runs on from it
    (100, 1.1, 1.7),  # a clock far ahead (another host): at most 4 windows
])
def test_a_burst_is_collected_until_a_window_passes_without_a_request(redis_client, newest_after_s, least_s, most_s):
    now = time.time()
    for request_id, at in (("first", now), ("newest", now + newest_after_s)):
        redis_client.rpush(bus.SERVE_PENDING, json.dumps(_request(request_id, enqueued_at=at, expires_at=now + 300)))
    started = time.monotonic()
    taken = take_waiting(redis_client, window_s=0.3, max_batch=4)
    waited = time.monotonic() - started
    assert [r["id"] for r in taken] == ["first", "newest"]
    assert least_s < waited < most_s, waited


def test_a_bad_worker_setting_answers_every_waiting_request_with_it(redis_url, redis_client, monkeypatch):
    redis_client.delete(bus.SERVE_PENDING)
    redis_client.rpush(bus.SERVE_PENDING, json.dumps(_request("waiting", enqueued_at=time.time())))
    monkeypatch.setenv("MORA_SERVE_WINDOW_MS", "soon")
    run_waiting_requests(redis_url)
    final = _last(redis_client, "waiting")
    assert final["done"] and final["extra"]["error_type"] == "server_error"
    assert final["error"] == ("the chat worker cannot answer: MORA_SERVE_WINDOW_MS must be a positive whole number, "
                              "found 'soon'")
