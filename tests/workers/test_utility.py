"""Small calls a chat worker answers for the torch-free web process (`call_worker`): the trained-token preview and the
MoRA/LoRA parameter budget, through a real embedded Redis and a real Celery worker, checked against the same
computation done in-process on the real tiny model."""
import json
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import mora
from tests.workers.queue_harness import make_world
from tests.workers.sample_data import write_dataset
from workers import api
from workers.embedded_redis import EmbeddedRedis
from workers.utility import handle


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))  # the tiny model is "tiny-llama"
        patch.setenv("REDIS_URL", "")
        world = make_world(tmp_path_factory.mktemp("utility-world"), tiny_model_dir)
        world.start_worker("utility")
        yield world
        world.close()


def test_preview_marks_the_answers_as_trained(world, tiny_model_dir, tmp_path):
    path = write_dataset(tmp_path, "chat")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    answer = api.call_worker("preview", {"path": str(path), "model": "tiny-llama", "max_length": 64, "n": 3})
    assert answer["has_chat_template"] is True and len(answer["examples"]) == 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for segments, row in zip(answer["examples"], rows):
        assert all(isinstance(text, str) and isinstance(trained, bool) for text, trained in segments)
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert "".join(text for text, _ in segments) == rendered
        assistant = row["messages"][-1]["content"]
        assert [text for text, trained in segments if trained] == [assistant + tokenizer.eos_token]


def test_a_dataset_problem_comes_back_as_an_error(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "reply": "a"}\n')
    answer = api.call_worker("preview", {"path": str(bad), "model": "tiny-llama", "max_length": 64, "n": 1})
    assert set(answer) == {"error"} and "bad.jsonl" in answer["error"] and "'messages'" in answer["error"]


@pytest.mark.parametrize("r, variant", [(8, "rope"), (64, "sharing")])
def test_budget_equals_the_adapter_on_the_real_model(world, tiny_model_dir, r, variant):
    answer = api.call_worker("budget", {"model": "tiny-llama", "r": r, "variant": variant})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_parameters = sum(p.numel() for p in model.parameters())
    info = mora.add_adapter(model, "real", mora.MoRAConfig(r=r, variant=variant))
    assert (answer["model"], answer["r"], answer["variant"]) == ("tiny-llama", r, variant)
    assert answer["base_parameters"] == base_parameters
    assert answer["mora_parameters"] == info.trainable_parameters
    assert [row["layer"] for row in answer["layers"]] == info.layers
    assert {row["layer"]: row["r_hat"] for row in answer["layers"]} == info.r_hat
    layers = mora.adapted_layers(model)
    for row in answer["layers"]:
        layer = layers[row["layer"]]
        assert (row["in_features"], row["out_features"]) == (layer.in_features, layer.out_features)
        assert row["mora_parameters"] == row["r_hat"] ** 2
        assert row["lora_parameters"] == (row["in_features"] + row["out_features"]) * r
    assert answer["lora_parameters"] == sum((layer.in_features + layer.out_features) * r for layer in layers.values())
    assert answer["lora_parameters"] == info.lora_equivalent_parameters


def test_budget_of_chosen_modules_and_bad_payloads(world):
    answer = api.call_worker("budget", {"model": "tiny-llama", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert {row["layer"].rsplit(".", 1)[-1] for row in answer["layers"]} == {"q_proj", "v_proj"}
    assert answer["variant"] == "rope"  # the paper's default at r ≤ 32
    assert api.call_worker("budget", {"model": "tiny-llama", "r": 8, "target_modules": ["nope"]}) == {
        "error": "no linear layer of LlamaForCausalLM matches ['nope']"}
    assert api.call_worker("budget", {"model": "tiny-llama"}) == {"error": "the payload needs 'r'"}


def test_handle_refuses_what_it_does_not_know():
    assert handle("bogus", {}) == {"error": "unknown call 'bogus': the calls are budget, export, preview"}
    assert "unknown model 'nah'" in handle("budget", {"model": "nah", "r": 8})["error"]
    assert handle("preview", {"model": "tiny-llama", "path": 3}) == {"error": "'path' must be str, found int"}


def test_no_worker_raises_worker_unavailable_quickly(monkeypatch):
    with EmbeddedRedis() as redis_server:
        monkeypatch.setenv("REDIS_URL", redis_server.url)
        started = time.monotonic()
        with pytest.raises(api.WorkerUnavailable, match="no chat worker answered the 'budget' call within 1 s; "
                                                         "start one with mora-studio worker --queues chat"):
            api.call_worker("budget", {"model": "tiny-llama", "r": 8}, timeout_s=1)
    assert time.monotonic() - started < 3
