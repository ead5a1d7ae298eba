"""Chat with adapters side by side: the engine in-process (loads counted, LRU eviction, errors naming the row), then
the `chat` queue end to end with a real embedded Redis and a real Celery worker. Shapes and equalities only, never
generated text."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mora
from tests.workers.queue_harness import make_world
from workers import api, bus
from workers.chat import ChatEngine, StopCheck
from workers.embedded_redis import EmbeddedRedis
from workers.generation import GenerationSettings, reply
from workers.model_loading import load_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}


@pytest.fixture(scope="module")
def env(tiny_model_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))  # the tiny model is "tiny-llama"
        patch.setenv("REDIS_URL", "")
        yield patch


def _randomise(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mora.adapted_layers(model).values():
            if name in layer.adapters:
                for parameter in layer.adapters[name].parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _save_random_adapter(model, name, config, folder, seed):
    mora.add_adapter(model, name, config)
    _randomise(model, name, seed)
    mora.save_adapter(model, name, folder)
    mora.remove_adapter(model, name)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(env, tiny_model_dir, tmp_path_factory):
    """Three random adapters on the tiny model (MoRA rope, LoRA, MoRA sharing) and two that fit another model."""
    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_model("tiny-llama")
    paths = {
        "mora": _save_random_adapter(model, "m", mora.MoRAConfig(r=8), root / "mora", 1),
        "lora": _save_random_adapter(model, "l", mora.LoRAConfig(r=4, init_weights=False), root / "lora", 2),
        "sharing": _save_random_adapter(model, "s", mora.MoRAConfig(r=64), root / "sharing", 3),
    }
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    paths["other_lora"] = _save_random_adapter(other, "o", mora.LoRAConfig(r=4), root / "other_lora", 4)
    paths["other_mora"] = _save_random_adapter(other, "o", mora.MoRAConfig(r=8), root / "other_mora", 5)
    return paths


def _expected(model_name, adapter_path, conversation=QUESTION, settings=GREEDY):
    """What one row alone answers, generated in this process without the engine."""
    model, tokenizer = load_model(model_name)
    name = mora.load_adapter(model, adapter_path) if adapter_path else None
    return reply(model.eval(), tokenizer, conversation, name, GenerationSettings(**settings))


class Recorder:
    def __init__(self):
        self.snapshots = []
        self.stopped = []

    def __call__(self, texts, done, error, stopped=None):
        self.snapshots.append((list(texts), done, error))
        self.stopped.append(stopped)

    @property
    def final(self):
        return self.snapshots[-1]


class CountingLoader:
    def __init__(self):
        self.loaded = []

    def __call__(self, name_or_path, **kwargs):
        self.loaded.append(os.path.basename(str(name_or_path)))
        return load_model(name_or_path, **kwargs)


def _request(rows, base_model="tiny-llama", **extra):
    return {"base_model": base_model, "rows": rows, "messages": QUESTION, "settings": GREEDY, **extra}


def _assert_growing(snapshots, rows):
    for row in range(rows):
        texts = [texts[row] for texts in snapshots]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_adapters_on_one_base_answer_in_one_batch_with_one_load(adapters):
    loader = CountingLoader()
    engine = ChatEngine(load=loader)
    rows = [{"label": "base", "adapter_path": None}, {"label": "mora", "adapter_path": adapters["mora"]},
            {"label": "lora", "adapter_path": adapters["lora"]}]
    recorder = Recorder()
    engine.run(_request(rows), recorder)
    texts, done, error = recorder.final
    assert (done, error) == (True, None) and len(texts) == 3
    assert loader.loaded == ["tiny-llama"]
    assert len(recorder.snapshots) > 3
    _assert_growing([s[0] for s in recorder.snapshots], 3)
    assert texts == [_expected("tiny-llama", None), _expected("tiny-llama", adapters["mora"]),
                     _expected("tiny-llama", adapters["lora"])]
    resident = next(iter(engine.models.values()))
    attached = mora.adapter_names(resident.model)
    engine.run(_request(rows), again := Recorder())  # everything resident: nothing loads again
    assert again.final[0] == texts and loader.loaded == ["tiny-llama"]
    assert mora.adapter_names(resident.model) == attached and len(attached) == 2


def test_a_whole_model_row_runs_on_its_own_model(adapters, tiny_model_dir, tmp_path):
    full = tmp_path / "full-finetune"  # a stand-in for a full fine-tune's model folder: other weights, same shape
    model, tokenizer = load_model(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(full)
    tokenizer.save_pretrained(full)
    loader = CountingLoader()
    engine = ChatEngine(load=loader)
    rows = [{"label": "mora", "adapter_path": adapters["mora"]}, {"label": "full", "model_path": str(full)},
            {"label": "base"}]
    recorder = Recorder()
    engine.run(_request(rows, conversations=[QUESTION, QUESTION, QUESTION[:1]]), recorder)
    texts, done, error = recorder.final
    assert error is None and done
    assert loader.loaded == ["tiny-llama", "full-finetune"]
    assert texts == [_expected("tiny-llama", adapters["mora"]), _expected(str(full), None),
                     _expected("tiny-llama", None)]


def test_least_recently_used_models_and_adapters_are_evicted(adapters, tiny_model_dir, tmp_path):
    copies = [str(shutil.copytree(tiny_model_dir, tmp_path / f"copy{i}")) for i in (1, 2)]
    loader = CountingLoader()
    engine = ChatEngine(max_models=2, max_adapters=2, load=loader)
    for base in ("tiny-llama", copies[0], copies[1], copies[0], "tiny-llama"):
        engine.run(_request([{"label": "base"}], base_model=base), recorder := Recorder())
        assert recorder.final[2] is None
    assert loader.loaded == ["tiny-llama", "copy1", "copy2", "tiny-llama"]
    assert [path.name for path in engine.models] == ["copy1", "tiny-llama"]

    resident = engine.models[tiny_model_dir.resolve()]
    for kind in ("mora", "lora", "sharing"):
        engine.run(_request([{"label": kind, "adapter_path": adapters[kind]}]), Recorder())
    assert [path.name for path in resident.adapters] == ["lora", "sharing"]
    assert len(mora.adapter_names(resident.model)) == 2
    engine.run(_request([{"label": "mora", "adapter_path": adapters["mora"]}]), Recorder())
    assert [path.name for path in resident.adapters] == ["sharing", "mora"]

    # a request may use more adapters than the cache holds: none of its own is evicted while it runs
    rows = [{"label": kind, "adapter_path": adapters[kind]} for kind in ("mora", "lora", "sharing")]
    engine.run(_request(rows), recorder := Recorder())
    assert recorder.final[2] is None and len(mora.adapter_names(resident.model)) == 3

    # a folder written again is loaded again, under a new name, and the old copy goes (the cache back to 2)
    old_name = next(name for path, (name, _) in resident.adapters.items() if path.name == "mora")
    later = time.time() + 5
    os.utime(os.path.join(adapters["mora"], "adapter_model.safetensors"), (later, later))
    engine.run(_request(rows[:1]), Recorder())
    assert [path.name for path in resident.adapters] == ["sharing", "mora"]
    assert old_name not in mora.adapter_names(resident.model) and len(mora.adapter_names(resident.model)) == 2


@pytest.mark.parametrize("row, request_change, expected", [
    ({"label": "ghost", "adapter_path": "/nowhere/adapter"}, {}, "row 'ghost': adapter folder /nowhere/adapter does not exist"),
    ({"label": "misfit", "adapter_path": "other_lora"}, {}, "row 'misfit': the adapter does not fit"),
    ({"label": "misfit", "adapter_path": "other_mora"}, {}, "row 'misfit': the adapter does not fit"),
    ({"label": "base"}, {"base_model": "no-such-model"}, "rows 'fine', 'base': unknown model 'no-such-model'"),
    ({"label": "base"}, {"settings": {"temperature": -1}}, "settings: temperature"),
    ({"label": "base"}, {"messages": []}, "'messages' must be a non-empty list"),
    ({"label": "base"}, {"conversations": [QUESTION, [{"role": "user"}]]},
     "row 'base': the conversation: message 1 must be {role: str, content: str}"),
])
def test_a_bad_row_is_an_error_naming_it(adapters, row, request_change, expected):
    if row.get("adapter_path") in adapters:
        row = {**row, "adapter_path": adapters[row["adapter_path"]]}
    engine = ChatEngine()
    rows = [{"label": "fine", "adapter_path": adapters["mora"]}, row]
    engine.run({**_request(rows), **request_change}, recorder := Recorder())
    texts, done, error = recorder.final
    assert done and error.startswith(expected) and "Traceback" not in error
    for resident in engine.models.values():  # a misfit leaves nothing half-attached
        assert len(mora.adapter_names(resident.model)) == len(resident.adapters)


@pytest.mark.parametrize("settings, expected", [
    ({"max_new_tokens": 0}, "settings: max_new_tokens (the longest answer, in tokens) must be between 1 and 4096, "
                            "got 0"),
    ({"max_new_tokens": 300}, "row 'base': max_new_tokens is 300 but this model reads at most 256 tokens"),
])
def test_max_new_tokens_is_bounded_by_the_limit_and_the_context(env, settings, expected):
    ChatEngine().run(_request([{"label": "base"}], settings=settings), recorder := Recorder())
    texts, done, error = recorder.final
    assert done and error.startswith(expected) and not any(texts)


def test_a_prompt_past_the_context_is_refused_before_generating(env):
    messages = [{"role": "user", "content": "The capital of France is Paris. " * 40}]
    engine = ChatEngine()
    engine.run(_request([{"label": "base"}, {"label": "again"}], messages=messages), recorder := Recorder())
    texts, done, error = recorder.final
    assert done and texts == ["", ""]
    assert error.startswith("rows 'base', 'again': the conversation is ")
    assert "reads at most 256 tokens and 12 of them are kept for the answer" in error
    assert all(snapshot[0] == ["", ""] for snapshot in recorder.snapshots), "nothing may be generated"


def test_stop_check_keeps_the_first_reason_and_polls_the_flag_sparingly():
    reads = []
    check = StopCheck(lambda: reads.append(1) or len(reads) >= 2, time_limit_s=60, poll_s=0.05)
    assert not check() and not check()  # the second call comes within poll_s: the flag is not read again
    assert len(reads) == 1
    time.sleep(0.06)
    assert check() and check.reason == "stopped on request"
    late = StopCheck(lambda: False, time_limit_s=0.01)
    time.sleep(0.02)
    assert late() and late.reason.startswith("stopped at the time limit of 0.01 s (MORA_CHAT_TIME_LIMIT_S)")


def test_a_stopped_request_ends_with_what_was_generated(env):
    engine = ChatEngine()
    engine.run(_request([{"label": "base"}], settings={"max_new_tokens": 60, "temperature": 0.0}), full := Recorder())
    flag = {"set": False}

    def stop_after_first_text(texts, done, error, stopped=None):
        recorder(texts, done, error, stopped)
        flag["set"] = flag["set"] or bool(texts[0])

    recorder = Recorder()
    engine.run(_request([{"label": "base"}], settings={"max_new_tokens": 60, "temperature": 0.0}),
               stop_after_first_text, stop_requested=lambda: flag["set"])
    texts, done, error = recorder.final
    assert done and error is None and recorder.stopped[-1] == "stopped on request"
    assert texts[0] and full.final[0][0].startswith(texts[0]) and len(texts[0]) < len(full.final[0][0])


def test_cli_chat_refuses_max_new_tokens_0_in_one_line(capsys):
    from app.cli import main

    assert main(["chat", "--max-new-tokens", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("mora-studio chat: max_new_tokens (the longest answer, in tokens) must be between 1 and "
                            "4096, got 0\n")


# ---- through the queue --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(env, tiny_model_dir, tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("chat-world"), tiny_model_dir)
    world.start_worker("chat")
    yield world
    world.close()


def test_chat_through_the_queue_streams_every_row(world, adapters):
    rows = [{"label": "base"}, {"label": "mora", "adapter_path": adapters["mora"]},
            {"label": "lora", "adapter_path": adapters["lora"]}]
    settings = {"max_new_tokens": 48, "temperature": 0.0}
    request_id = api.start_chat(_request(rows, settings=settings))
    updates = list(api.chat_updates(request_id, timeout_s=60))
    assert updates[-1]["done"] and updates[-1]["error"] is None
    assert all(len(update["texts"]) == 3 for update in updates)
    _assert_growing([update["texts"] for update in updates], 3)
    redis_client = bus.connect(world.redis.url)
    assert len(redis_client.xrange(bus.chat_stream_key(request_id))) >= 3, "empty first, streamed, then final"
    assert 0 < redis_client.ttl(bus.chat_stream_key(request_id)) <= bus.CHAT_TTL_S
    assert updates[-1]["texts"] == [_expected("tiny-llama", path, settings=settings)
                                    for path in (None, adapters["mora"], adapters["lora"])]

    bad = api.start_chat(_request([{"label": "ghost", "adapter_path": "/nowhere"}]))
    final = list(api.chat_updates(bad, timeout_s=60))[-1]
    assert final["done"] and final["error"].startswith("row 'ghost': adapter folder /nowhere does not exist")


def test_chat_without_a_worker_says_how_to_start_one(env, monkeypatch):
    with EmbeddedRedis() as redis_server:
        monkeypatch.setenv("REDIS_URL", redis_server.url)
        started = time.monotonic()
        updates = list(api.chat_updates(api.start_chat(_request([{"label": "base"}])), answer_within_s=1))
    assert time.monotonic() - started < 5
    assert updates == [{"texts": [], "done": True, "error": "no chat worker answered within 1 s; start one with "
                                                             "mora-studio worker --queues chat"}]


def test_the_web_side_api_imports_no_torch():
    code = "import sys, workers.api; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.stdout.split() == ["False", "False"]


def test_model_turns_serve_in_the_order_asked_on_one_thread():
    """A job that asks for a turn again at once (an evaluation, batch after batch) lets one that asked meanwhile in
    first, and every turn runs on the same one thread, whichever job asked (one OpenMP pool for the models)."""
    import threading
    import time

    from workers.chat import ModelTurns

    turns, order, threads = ModelTurns(), [], set()
    batch_running, release = threading.Event(), threading.Event()

    def turn(name: str, hold: bool = False):
        def job():
            threads.add(threading.get_ident())
            if hold:
                batch_running.set()
                release.wait(10)  # batch 1 holds its turn until the chat has asked for one
            order.append(name)
            return name
        return job

    evaluation = threading.Thread(target=lambda: [turns.run(turn("batch 1", hold=True)), turns.run(turn("batch 2"))])
    evaluation.start()
    assert batch_running.wait(10)
    chat = threading.Thread(target=lambda: turns.run(turn("chat")))
    chat.start()
    deadline = time.monotonic() + 10
    while turns._thread._work_queue.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the chat's turn is queued behind batch 1
    release.set()
    evaluation.join(10)
    chat.join(10)
    assert order == ["batch 1", "chat", "batch 2"]
    assert len(threads) == 1 and threading.get_ident() not in threads
    with pytest.raises(ZeroDivisionError):
        turns.run(lambda: 1 / 0)  # the job's error reaches the job that asked