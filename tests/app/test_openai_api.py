"""The OpenAI-compatible API, driven by the real `openai` client against a real `mora-studio up` (embedded Redis,
Celery workers, the web process) with the tiny model and three random adapters registered as succeeded runs: list
models, chat, completions, streams, stop strings, 8 concurrent requests over 3 adapters and the base answered in one
batch exactly as alone, and the refusals in OpenAI's shape. Then the request checks alone, without a studio.
Equalities, counts and shapes only, never generated text."""
import concurrent.futures
import json
import shutil
import threading
import time
import urllib.request

import openai
import pytest
from starlette.requests import Request

import mora
from app.openai_api import APIError, OpenAIAPI, ServedModel, build_job
from storage.repo import Store
from tests.app.test_up import _http_status, studio_env, studio_process
from tests.fixtures.tiny_model import build_long_model
from tests.workers.queue_harness import wait_for
from tests.workers.test_chat import _save_random_adapter
from tests.workers.test_serving import _printable_stop
from workers import bus
from workers.embedded_redis import free_port
from workers.generation import GenerationSettings, reply
from workers.model_loading import load_model

KEY = "sk-studio-test-key"
WINDOW_MS = 1000  # long enough that 8 requests sent at once on a busy 2-core machine land in one batch
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _register(store: Store, name: str, output_dir: str) -> str:
    run = store.create_run({"model": "tiny-llama"}, name=name, model="tiny-llama", adapter="mora", r=8)
    store.set_status(run.id, "running")
    store.set_status(run.id, "succeeded")
    store.set_output(run.id, output_dir=output_dir, output_kind="adapter")
    return run.id


@pytest.fixture(scope="module")
def studio(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "tiny-llama")
    build_long_model(tiny_model_dir, models / "tiny-long")
    model, _ = load_model(str(models / "tiny-llama"))
    adapters = {
        "mora r=8": _save_random_adapter(model, "m", mora.MoRAConfig(r=8), root / "adapters" / "mora", 1),
        "lora r=4": _save_random_adapter(model, "l", mora.LoRAConfig(r=4, init_weights=False), root / "adapters" /
                                         "lora", 2),
        "mora r=64": _save_random_adapter(model, "s", mora.MoRAConfig(r=64), root / "adapters" / "sharing", 3),
    }
    (root / "data").mkdir(mode=0o700)
    with Store(f"sqlite:///{root / 'data' / 'studio.db'}") as store:
        runs = {name: _register(store, name, path) for name, path in adapters.items()}
    port = free_port()
    env = studio_env(root, port, MORA_MODELS_DIR=str(models), MORA_API_KEYS=f"{KEY},another-key-42",
                     MORA_SERVE_WINDOW_MS=str(WINDOW_MS), OMP_NUM_THREADS="1")
    base_url = f"http://127.0.0.1:{port}/v1"
    with studio_process(["up", "--no-prepare"], env, root):
        wait_for(lambda: _status(f"{base_url}/models", KEY) == 200, 180, "the API to answer", every=0.5)
        client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
        assert client.chat.completions.create(model="tiny-llama", messages=QUESTION, max_tokens=2).choices
        yield {"client": client, "base_url": base_url, "runs": runs, "adapters": adapters,
               "redis": bus.connect((root / "data" / "redis.url").read_text().strip()), "root": root}


def _status(url: str, key=None, data=None, headers=None) -> int:
    return _http_status(urllib.request.Request(url, data=data, headers={
        **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}))


def _expected(studio, adapter_path, messages, max_tokens):
    """What the same request answers generated in this process, without the studio."""
    model, tokenizer = load_model(str(studio["root"] / "models" / "tiny-llama"))
    name = mora.load_adapter(model, adapter_path) if adapter_path else None
    return reply(model.eval(), tokenizer, messages, name, GenerationSettings(max_new_tokens=max_tokens,
                                                                            temperature=0.0))


def test_models_lists_the_bases_and_every_succeeded_run_by_id_and_name(studio):
    cards = {card.id: card for card in studio["client"].models.list().data}
    assert {"tiny-llama", "tiny-long"} <= set(cards)
    for name, run_id in studio["runs"].items():
        assert cards[run_id].model_extra["root"] == cards[name].model_extra["root"] == "tiny-llama"
        assert cards[run_id].model_extra["parent"] == "tiny-llama" and cards[run_id].owned_by == "mora-studio"
    assert cards["tiny-llama"].model_extra["parent"] is None
    assert studio["client"].models.retrieve("mora r=8").id == "mora r=8"


def test_chat_and_completions_answer_as_the_model_does_with_usage(studio):
    client, path = studio["client"], studio["adapters"]["lora r=4"]
    answer = client.chat.completions.create(model="lora r=4", messages=QUESTION, max_tokens=10, temperature=0)
    text = answer.choices[0].message.content
    assert text == _expected(studio, path, QUESTION, 10)
    assert answer.object == "chat.completion" and answer.model == "lora r=4" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.role == "assistant"
    usage = answer.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    by_id = client.chat.completions.create(model=studio["runs"]["lora r=4"], messages=QUESTION, max_tokens=10,
                                           temperature=0)
    assert by_id.choices[0].message.content == text

    completion = client.completions.create(model="mora r=8", prompt="The capital of France is", max_tokens=6,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 0
    default = client.completions.create(model="mora r=8", prompt="The capital of France is", temperature=0)
    assert default.usage.completion_tokens <= 16 and default.choices[0].text.startswith(completion.choices[0].text)


def test_a_stream_sends_the_same_answer_in_chunks_and_ends_with_done(studio):
    client = studio["client"]
    whole = client.chat.completions.create(model="mora r=64", messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="mora r=64", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) >= 3

    request = urllib.request.Request(f"{studio['base_url']}/completions", headers={"Authorization": f"Bearer {KEY}"},
                                     data=json.dumps({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 8,
                                                      "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(studio):
    client = studio["client"]
    full = client.chat.completions.create(model="mora r=8", messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = _printable_stop(text)
    cut = client.chat.completions.create(model="mora r=8", messages=QUESTION, max_tokens=24, temperature=0,
                                         stop=[stop, "\u2603never"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.chat.completions.create(model="mora r=8", messages=QUESTION, max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]


def test_eight_concurrent_requests_over_three_adapters_and_the_base_answer_as_alone_in_one_batch(studio):
    client = studio["client"]
    names = ["tiny-llama", "mora r=8", "lora r=4", "mora r=64"]
    jobs = [(names[i % 4], [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]) for i in range(8)]

    def ask(job, barrier=None):
        if barrier is not None:
            barrier.wait()
        answer = client.chat.completions.create(model=job[0], messages=job[1], max_tokens=12, temperature=0)
        return answer.choices[0].message.content, answer.model_extra["mora"]

    alone = [ask(job) for job in jobs]
    barrier = threading.Barrier(len(jobs))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(job, barrier), jobs))
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert len({batch["batch_id"] for _, batch in together}) == 1, "answered in one batched generation"
    assert all(batch["batch_size"] == 8 for _, batch in together)
    assert all(batch["batch_size"] == 1 for _, batch in alone)
    assert len({text for text, _ in alone[:4]}) > 1, "different adapters answer differently"


def test_refusals_come_in_openai_shape_with_their_status(studio):
    client, url = studio["client"], studio["base_url"]
    wrong = openai.OpenAI(base_url=url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert _status(f"{url}/models") == 401  # no key at all
    assert _status(f"{url}/models", key="another-key-42") == 200

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-adapter", messages=QUESTION, max_tokens=4)
    assert (unknown.value.code, unknown.value.param, unknown.value.type) == ("model_not_found", "model",
                                                                            "invalid_request_error")
    assert "GET /v1/models lists" in unknown.value.message

    long_prompt = [{"role": "user", "content": "capital " * 400}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="mora r=8", messages=long_prompt, max_tokens=8)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"
    assert "this model reads at most 256 tokens" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as streamed_too_long:  # refused before the stream starts: a 400 too
        list(client.chat.completions.create(model="mora r=8", messages=long_prompt, max_tokens=8, stream=True))
    assert streamed_too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="tiny-long", messages=QUESTION, max_tokens=5000)
    assert too_many.value.param == "max_tokens" and "between 1 and 4096" in too_many.value.message
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, n=2)
    assert several.value.param == "n"

    assert _status(f"{url}/chat/completions", KEY, data=b"{not json") == 400
    # too large, declared or sent in chunks: the sender reads a 413 (the rest is drained), not a reset connection
    assert _status(f"{url}/chat/completions", KEY, data=b"x" * (1024 * 1024 + 1)) == 413
    assert _status(f"{url}/chat/completions", KEY, data=b"x" * (4 * 1024 * 1024)) == 413
    assert _status(f"{url}/chat/completions", KEY, data=iter([b"x" * 65536] * 40)) == 413
    assert _status(f"{url}/embeddings", KEY, data=b"{}") == 404
    # a page of another site cannot drive the API from the user's browser (the studio's Host and Origin checks)
    assert _status(f"{url}/chat/completions", KEY, data=b"{}", headers={"Origin": "http://evil.example"}) == 403


def test_a_client_that_disconnects_stops_its_generation(studio):
    stream = studio["client"].chat.completions.create(model="tiny-long", messages=QUESTION, max_tokens=4096,
                                                      temperature=0, stream=True)
    chunks = [next(stream) for _ in range(3)]
    stream.close()
    closed = time.monotonic()
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    final = wait_for(lambda: (s := bus.last_chat_snapshot(studio["redis"], request_id)) and s["done"] and s, 30,
                     "the worker to end the answer")
    took = time.monotonic() - closed
    print(f"stream closed to generation ended: {took:.2f} s, after {final['extra']['completion_tokens']} tokens")
    assert final["extra"]["completion_tokens"] < 4096 and took < 5
    assert bus.chat_stop_requested(studio["redis"], request_id)


# ---- the request checks alone ---------------------------------------------------------------------------------------

BASE = ServedModel("tiny-llama", 0, "tiny-llama", {"base_model": "tiny-llama"})


def _request(client_host: str = "127.0.0.1", authorization=None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                    "client": (client_host, 40000), "query_string": b""})


def _refused(call) -> APIError:
    with pytest.raises(APIError) as refused:
        call()
    return refused.value


def test_without_keys_only_loopback_and_no_login_are_answered():
    open_api = OpenAIAPI(service=None, keys=[], max_body_bytes=1024, max_pending=2)
    open_api.authorize(_request("127.0.0.1"))
    open_api.authorize(_request("::1"))
    remote = _refused(lambda: open_api.authorize(_request("10.1.2.3")))
    assert remote.status == 401 and "set MORA_API_KEYS" in remote.message and "10.1.2.3" in remote.message
    with_login = OpenAIAPI(service=None, keys=[], login=True, max_body_bytes=1024, max_pending=2)
    assert "MORA_AUTH" in _refused(lambda: with_login.authorize(_request("127.0.0.1"))).message
    keyed = OpenAIAPI(service=None, keys=[KEY], max_body_bytes=1024, max_pending=2)
    keyed.authorize(_request("10.1.2.3", f"Bearer {KEY}"))
    assert _refused(lambda: keyed.authorize(_request("127.0.0.1", "Bearer nope"))).code == "invalid_api_key"
    assert _refused(lambda: keyed.authorize(_request("127.0.0.1"))).status == 401
    assert _refused(lambda: keyed.authorize(_request("127.0.0.1", f"Basic {KEY}"))).status == 401


def test_past_max_pending_requests_get_429_until_one_ends():
    api = OpenAIAPI(service=None, keys=[], max_body_bytes=1024, max_pending=2)
    first, second = api.take_slot(), api.take_slot()
    full = _refused(api.take_slot)
    assert (full.status, full.code, full.headers["Retry-After"]) == (429, "rate_limit_exceeded", "1")
    first.release()
    first.release()  # released once, whatever ends it
    assert api.pending == 1
    api.take_slot()
    second.release()


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}] * 257}, "messages", "at most 256"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "not one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "a string"),
    ({"messages": QUESTION, "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"messages": QUESTION, "stop": [""]}, "stop", "1 to 256"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature", "a number"),
    ({"messages": QUESTION, "max_tokens": 2.5}, "max_tokens", "whole number"),
    ({"messages": QUESTION, "max_tokens": True}, "max_tokens", "whole number"),
    ({"messages": QUESTION, "seed": 2**70}, "seed", "whole number"),
    ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": QUESTION, "logprobs": True}, "logprobs", "not supported"),
])
def test_a_bad_chat_body_is_refused_naming_the_parameter(body, param, words):
    refused = _refused(lambda: build_job(body, BASE, chat=True))
    assert (refused.status, refused.param) == (400, param) and words in refused.message


def test_a_job_carries_the_settings_and_openai_defaults():
    chat = build_job({"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                     {"type": "text", "text": "brief."}]},
                                   {"role": "user", "content": "Hi"}], "max_completion_tokens": 9, "top_p": 0.5,
                      "seed": 3, "stop": "\n", "presence_penalty": 0, "n": 1}, BASE, chat=True)
    assert chat == {"base_model": "tiny-llama", "messages": [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"}],
                    "settings": {"max_new_tokens": 9, "temperature": 1.0, "top_p": 0.5, "seed": 3}, "stop": ["\n"]}
    completion = build_job({"prompt": ["Once"], "max_tokens": 0}, BASE, chat=False)
    assert completion["prompt"] == "Once" and completion["settings"]["max_new_tokens"] == 0  # the worker refuses 0
    assert build_job({"prompt": "Once"}, BASE, chat=False)["settings"]["max_new_tokens"] == 16
    assert _refused(lambda: build_job({"prompt": ["a", "b"]}, BASE, chat=False)).param == "prompt"


def test_no_chat_worker_and_no_queue_are_503_in_openai_shape(tmp_path, tiny_model_dir, monkeypatch):
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from app.openai_api import _refusal
    from app.service import StudioService

    silent = _refusal({"texts": [], "done": True, "error": "no chat worker answered within 30 s; start one with "
                                                             "mora-studio worker --queues chat"})
    assert (silent.status, silent.code, silent.headers["Retry-After"]) == (503, "worker_unavailable", "5")
    monkeypatch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with Store(f"sqlite:///{tmp_path / 'studio.db'}") as store:
        app = FastAPI(routes=OpenAIAPI(StudioService(store), keys=[]).routes())
        with TestClient(app, client=("127.0.0.1", 50000)) as client:
            answer = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": QUESTION})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    error = answer.json()["error"]
    assert error["code"] == "queue_unavailable" and error["message"].startswith("cannot reach the queue's Redis at")
