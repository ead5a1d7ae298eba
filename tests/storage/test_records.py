"""Datasets, artifacts, chats with A/B votes, and the collector's stream positions."""
from __future__ import annotations

import hashlib

import pytest

from storage.repo import NotFound, StorageError

SHA = hashlib.sha256(b"rows").hexdigest()


def _dataset(store, name="alpaca sample", sha256=SHA):
    return store.add_dataset(name=name, path=f"/data/datasets/{name}.jsonl", original_filename="alpaca.jsonl",
                             sha256=sha256, file_format="jsonl", schema="alpaca", rows=52, size_bytes=12345,
                             columns=["instruction", "input", "output"],
                             preview=[{"instruction": "Say hi", "input": "", "output": "hi"}])


def test_datasets(store):
    first = _dataset(store)
    assert (first.rows, first.columns, first.preview[0]["output"], first.size_bytes) == (
        52, ["instruction", "input", "output"], "hi", 12345)
    assert store.get_dataset(first.id) == first
    assert store.find_dataset_by_hash(SHA) == first
    assert store.find_dataset_by_hash("0" * 64) is None
    second = _dataset(store, "other", hashlib.sha256(b"other").hexdigest())
    assert [dataset.id for dataset in store.list_datasets()] == [second.id, first.id]

    run = store.create_run({}, name="on data", model="m", adapter="lora", r=8, dataset_id=first.id)
    assert store.delete_dataset(first.id) == first  # the caller removes first.path
    assert store.get_run(run.id).dataset_id is None
    with pytest.raises(NotFound, match=f"dataset {first.id} not found"):
        store.get_dataset(first.id)


@pytest.mark.parametrize(("change", "message"), [
    ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex digits"),
    ({"rows": -1}, "rows must be an integer >= 0"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"preview": [{"when": object()}]}, "preview must be JSON-serialisable"),
], ids=["sha256", "rows", "name", "preview"])
def test_bad_dataset_input_names_the_field(store, change, message):
    arguments = {"name": "d", "path": "/d.jsonl", "original_filename": "d.jsonl", "sha256": SHA,
                 "file_format": "jsonl", "schema": "chat", "rows": 1, "columns": ["messages"], "preview": [],
                 "size_bytes": 1, **change}
    with pytest.raises(StorageError, match=message):
        store.add_dataset(**arguments)
    assert store.list_datasets() == []


def test_artifact_upsert(store, run):
    first = store.put_artifact(run.id, "adapter", path="/runs/x/adapter", size_bytes=1000, trainable_parameters=4096,
                               r_hat=[16], effective_rank={"mean": 7.5},
                               layers=[{"layer": "model.layers.0.self_attn.q_proj", "effective_rank": 8}])
    assert (first.kind, first.r_hat, first.effective_rank["mean"], first.layers[0]["effective_rank"]) == (
        "adapter", [16], 7.5, 8)
    replaced = store.put_artifact(run.id, "adapter", path="/runs/x/adapter-2", size_bytes=2000)
    assert (replaced.path, replaced.size_bytes, replaced.r_hat, replaced.layers) == (
        "/runs/x/adapter-2", 2000, None, None)
    store.put_artifact(run.id, "model", path="/runs/x/model")
    assert [(artifact.kind, artifact.path) for artifact in store.get_artifacts(run.id)] == [
        ("adapter", "/runs/x/adapter-2"), ("model", "/runs/x/model")]
    with pytest.raises(StorageError, match="kind must be one of adapter, model"):
        store.put_artifact(run.id, "checkpoint", path="/x")


def test_chats_messages_and_votes(store, run):
    lora = store.create_run({}, name="lora r8", model="tiny-llama", adapter="lora", r=8)
    chat = store.create_chat(title="MoRA vs LoRA", base_model="tiny-llama",
                             adapters=[{"label": "A", "run_id": run.id}, {"label": "B", "run_id": lora.id}],
                             settings={"temperature": 0.0, "max_new_tokens": 64})
    assert chat.adapters == [{"label": "A", "run_id": run.id}, {"label": "B", "run_id": lora.id}]
    assert store.get_chat(chat.id) == chat
    later = store.create_chat(title="solo", base_model="tiny-llama")
    assert [listed.id for listed in store.list_chats()] == [later.id, chat.id]

    store.add_chat_message(chat.id, turn=1, role="user", content="What is 2+2?")
    store.add_chat_message(chat.id, turn=1, role="assistant", content="4", run_id=run.id, label="A")
    store.add_chat_message(chat.id, turn=1, role="assistant", content="5", run_id=lora.id, label="B")
    store.add_chat_message(chat.id, turn=0, role="system", content="Be brief.")
    messages = store.chat_messages(chat.id)
    assert [(message.turn, message.role, message.label) for message in messages] == [
        (0, "system", None), (1, "user", None), (1, "assistant", "A"), (1, "assistant", "B")]
    assert messages[2].run_id == run.id

    store.add_vote(chat.id, turn=1, winner_run_id=run.id, loser_run_id=lora.id)
    store.add_vote(chat.id, turn=2, winner_run_id=run.id, loser_run_id=lora.id)
    vote = store.add_vote(chat.id, turn=3, winner_run_id=lora.id, loser_run_id=run.id)
    assert (vote.session_id, vote.turn, vote.winner_run_id) == (chat.id, 3, lora.id)
    assert (store.votes_for_run(run.id).wins, store.votes_for_run(run.id).losses) == (2, 1)
    assert (store.votes_for_run(lora.id).wins, store.votes_for_run(lora.id).losses) == (1, 2)
    assert (store.votes_for_run("unvoted").wins, store.votes_for_run("unvoted").losses) == (0, 0)


def test_chat_input_errors(store, run):
    with pytest.raises(NotFound, match="run 'gone' not found"):
        store.create_chat(title="t", base_model="m", adapters=[{"label": "A", "run_id": "gone"}])
    with pytest.raises(StorageError, match=r"adapters\[0\]\.label must be a non-empty string"):
        store.create_chat(title="t", base_model="m", adapters=[{"run_id": run.id}])
    chat = store.create_chat(title="t", base_model="m")
    with pytest.raises(StorageError, match="role must be one of system, user, assistant"):
        store.add_chat_message(chat.id, turn=1, role="bot", content="hi")
    with pytest.raises(NotFound, match="chat session 999999 not found"):
        store.add_chat_message(999999, turn=1, role="user", content="hi")
    with pytest.raises(StorageError, match="winner_run_id and loser_run_id must differ"):
        store.add_vote(chat.id, turn=1, winner_run_id=run.id, loser_run_id=run.id)
    with pytest.raises(NotFound, match="loser run 'gone' not found"):
        store.add_vote(chat.id, turn=1, winner_run_id=run.id, loser_run_id="gone")


def test_stream_positions(store):
    assert store.get_stream_position("runs:abc") is None
    store.set_stream_position("runs:abc", "1700000000000-0")
    store.set_stream_position("runs:abc", "1700000000001-3")
    store.set_stream_position("runs:def", "5-0")
    assert store.get_stream_position("runs:abc") == "1700000000001-3"
    assert store.get_stream_position("runs:def") == "5-0"
    with pytest.raises(StorageError, match="last_id must be a non-empty string"):
        store.set_stream_position("runs:abc", "")
