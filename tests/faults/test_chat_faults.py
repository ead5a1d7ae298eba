"""Chat under stress, with real processes: an embedded Redis, a real Celery chat worker and utility worker with the
tiny model, and the Chat tab's own handler (`app.chat_view.send`) on a SQLite store. A Stop ends a long answer within
about a second, a page that goes away stops its answer, the time limit ends the longest ones, every answer is stored
whatever ends it, previews never wait behind a generation, and oversized prompts are refused before anything is
generated."""
import time
from pathlib import Path

import pytest
import yaml

from app import chat_view
from app.service import StudioService
from tests.fixtures.tiny_model import build_long_model
from tests.workers.queue_harness import make_world, wait_for
from tests.workers.sample_data import write_dataset
from workers import api, bus
from workers.celery_app import UTILITY_QUEUE
from workers.processes import worker_specs

TIME_LIMIT_S = 3
LONG = 4096  # the most new tokens a request may ask for; the tiny model takes well over TIME_LIMIT_S to write them


@pytest.fixture(scope="module")
def long_model(tiny_model_dir, tmp_path_factory):
    return str(build_long_model(tiny_model_dir, tmp_path_factory.mktemp("long") / "tiny-long"))


@pytest.fixture(scope="module")
def world(tiny_model_dir, long_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REDIS_URL", "")
        world = make_world(tmp_path_factory.mktemp("chat-faults"), tiny_model_dir)
        world.env["MORA_CHAT_TIME_LIMIT_S"] = str(TIME_LIMIT_S)
        try:
            world.start_worker("chat")
            world.start_worker("utility")
            warm = api.start_chat({"base_model": long_model, "rows": [{"label": "warm"}],
                                   "messages": [{"role": "user", "content": "hi"}],
                                   "settings": {"max_new_tokens": 4, "temperature": 0.0}})
            assert list(api.chat_updates(warm, timeout_s=60))[-1]["error"] is None  # the long model is resident
            yield world
        finally:
            world.close()


@pytest.fixture()
def service(world):
    return StudioService(world.store)


def _send(service, model, text, max_tokens=LONG, session=None):
    return chat_view.send(service, model, ["base"], 0.0, max_tokens, False, text, session)


def _answer(output) -> str:
    return output[0]["histories"][0][-1]["content"]


def _first_text(generator):
    """Read the page's stream until the answer has begun; returns that output."""
    for output in generator:
        if output[0] is not None and output[0].get("request_id") and _answer(output):
            return output
    raise AssertionError("the stream ended before any text came")


def _stored_answers(world, chat_id):
    return [m.content for m in world.store.chat_messages(chat_id) if m.role == "assistant"]


def test_stop_button_ends_a_long_answer_within_a_second_and_stores_it(world, service, long_model):
    generator = _send(service, long_model, "Tell me a very long story.")
    session = _first_text(generator)[0]
    request_id = session["request_id"]
    stopped_at = time.monotonic()
    assert chat_view.stop(session) == "Stopping…"
    outputs = list(generator)
    took = time.monotonic() - stopped_at
    print(f"Stop to the end of the page's stream: {took:.2f} s")
    # an unstopped answer runs for minutes; the bound leaves room for a loaded 2-core machine (measured 0.06 s quiet)
    assert took < 5, f"the answer went on for {took:.2f} s after Stop"
    final = bus.last_chat_snapshot(bus.connect(world.redis.url), request_id)
    assert final["done"] and final["error"] is None and final["stopped"] == "stopped on request"
    assert 0 < len(final["texts"][0]) < LONG
    assert _answer(outputs[-1]) == final["texts"][0]
    assert outputs[-1][-1].startswith("⏹ Stopped on request")
    assert _stored_answers(world, session["chat_id"]) == [final["texts"][0]]
    assert chat_view.stop(outputs[-1][0]) == "Nothing is being generated."


def test_a_closed_page_stops_its_answer_and_what_was_generated_is_stored(world, service, long_model):
    generator = _send(service, long_model, "Tell me another very long story.")
    output = _first_text(generator)
    session, seen = output[0], _answer(output)
    generator.close()  # what Gradio does to the handler when the page disconnects
    closed_at = time.monotonic()
    stored = wait_for(lambda: _stored_answers(world, session["chat_id"]), 10, "the answer to be stored")
    took = time.monotonic() - closed_at
    print(f"page closed to answer stored: {took:.2f} s")
    final = bus.last_chat_snapshot(bus.connect(world.redis.url), session["request_id"])
    assert final["done"] and final["stopped"] == "stopped on request", "the worker must stop, not go on for nobody"
    assert stored == [final["texts"][0]] and stored[0].startswith(seen)
    assert took < 5, f"the answer was stored {took:.2f} s after the page closed"


def test_the_time_limit_ends_an_answer_cleanly_with_a_note(world, service, long_model):
    started = time.monotonic()
    outputs = list(_send(service, long_model, "Write until you are stopped."))
    took = time.monotonic() - started
    print(f"answer with a {TIME_LIMIT_S} s time limit ended after {took:.2f} s")
    assert TIME_LIMIT_S - 0.5 < took < TIME_LIMIT_S + 10
    message = outputs[-1][-1]
    assert message.startswith(f"⏹ Stopped at the time limit of {TIME_LIMIT_S} s (MORA_CHAT_TIME_LIMIT_S)")
    answer = _answer(outputs[-1])
    assert answer and _stored_answers(world, outputs[-1][0]["chat_id"]) == [answer]


def test_a_preview_answers_while_a_long_generation_runs(world, long_model, tmp_path):
    path = write_dataset(tmp_path, "chat")
    payload = {"path": str(path), "model": "tiny-llama", "max_length": 64, "n": 1}
    assert "examples" in api.call_worker("preview", payload, timeout_s=60)  # the utility worker's tokenizer loaded
    request_id = api.start_chat({"base_model": long_model, "rows": [{"label": "long"}],
                                 "messages": [{"role": "user", "content": "Go on and on."}],
                                 "settings": {"max_new_tokens": LONG, "temperature": 0.0}})
    client = bus.connect(world.redis.url)
    wait_for(lambda: (bus.last_chat_snapshot(client, request_id) or {}).get("texts", [""])[0], 30,
             "the long answer to begin")
    asked = time.monotonic()
    answer = api.call_worker("preview", payload, timeout_s=10)
    took = time.monotonic() - asked
    print(f"preview during a generation: {took:.2f} s")
    assert not bus.last_chat_snapshot(client, request_id)["done"], "the generation must still be running"
    assert "examples" in answer and took < 8, f"the preview took {took:.2f} s"
    api.stop_chat(request_id)
    wait_for(lambda: bus.last_chat_snapshot(client, request_id)["done"], 5, "the long answer to stop")


def test_an_oversized_message_never_reaches_the_queue(world, service, long_model):
    chats_before = len(world.store.list_chats())
    outputs = list(_send(service, long_model, "x" * 2_000_000))
    assert len(outputs) == 1
    assert outputs[0][-1] == ("⚠️ Your message is 2,000,000 characters; a chat message holds at most 32,000: "
                              "shorten it.")
    assert len(world.store.list_chats()) == chats_before
    assert bus.queue_lengths(bus.connect(world.redis.url))["chat"] == 0
    with pytest.raises(api.ChatRefused, match="message 1 is 2,000,000 characters"):
        api.start_chat({"rows": [{"label": "x"}], "messages": [{"role": "user", "content": "x" * 2_000_000}]})


def test_a_prompt_past_the_context_is_refused_in_tokens_before_generation(world, service):
    started = time.monotonic()
    outputs = list(_send(service, "tiny-llama", "The capital of France is Paris. " * 40, max_tokens=128))
    assert time.monotonic() - started < 10
    message = outputs[-1][-1]
    assert message.startswith("⚠️ row 'base model': the conversation is ")
    assert "this model reads at most 256 tokens and 128 of them are kept for the answer (max new tokens): shorten " \
           "the message or start a new conversation (at most 128 tokens)" in message
    assert all(_answer(output) == "" for output in outputs if output[0] is not None)
    assert _stored_answers(world, outputs[-1][0]["chat_id"]) == [""]


def test_a_first_message_starting_with_80_spaces_works(world, service):
    text = " " * 80 + "Hello there"
    outputs = list(_send(service, "tiny-llama", text, max_tokens=8))
    session = outputs[-1][0]
    assert outputs[-1][-1] == ""
    assert world.store.get_chat(session["chat_id"]).title == "Hello there"
    messages = world.store.chat_messages(session["chat_id"])
    assert [(m.role, m.content) for m in messages] == [("user", text), ("assistant", _answer(outputs[-1]))]


def test_every_way_to_start_a_chat_worker_brings_a_utility_worker():
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    command = compose["services"]["worker"]["command"]
    compose_queues = command[command.index("--queues") + 1].split(",")
    for queues, gpus in ((["train", "chat"], []), (["train", "chat"], ["0", "1"]),  # mora-studio up
                         (["chat"], []), (compose_queues, ["0"]), (["utility"], [])):  # worker --queues; compose
        assert [spec.queue for spec in worker_specs(queues, gpus)].count(UTILITY_QUEUE) == 1, (queues, gpus)
    assert all(spec.queue != UTILITY_QUEUE for spec in worker_specs(["train"], ["0"]))
    with pytest.raises(ValueError, match="unknown queue 'gpu': the queues are train, chat and utility"):
        worker_specs(["chat", "gpu"], [])
