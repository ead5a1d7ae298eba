"""The Data and Train tabs' logic as plain functions, against a real SQLite store and a real (embedded) Redis queue."""
import base64
import json
import os

import pytest

from app import datasets, train_view
from app.service import ServiceError, StudioService
from storage.repo import Store
from tests.workers.sample_data import write_dataset
from workers import bus
from workers.embedded_redis import EmbeddedRedis
from workers.train_config import ConfigError, TrainConfig


@pytest.fixture()
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    yield store
    store.close()


@pytest.fixture()
def service(store, tmp_path, monkeypatch):
    with EmbeddedRedis() as redis:
        monkeypatch.setenv("REDIS_URL", redis.url)
        yield StudioService(store, runs_dir=tmp_path / "runs")


def test_upload_is_validated_copied_under_a_generated_name_and_recorded(store, tmp_path):
    good = write_dataset(tmp_path, "alpaca")
    folder = tmp_path / "datasets"
    result = datasets.ingest_upload(store, folder, good, "../../etc/my data.jsonl")
    assert result.dataset is not None and result.dataset.rows == 8 and result.dataset.schema == "alpaca"
    stored = folder.resolve() / result.dataset.path.rsplit("/", 1)[-1]
    assert stored.exists() and stored.parent == folder.resolve() and "my data" not in stored.name
    assert result.dataset.original_filename == "my data.jsonl"
    again = datasets.ingest_upload(store, folder, good, "copy.jsonl")
    assert "already stored" in again.message and len(store.list_datasets()) == 1
    assert datasets.datasets_rows(store)[0][1] == "my data"


def test_bad_uploads_get_a_message_and_store_nothing(store, tmp_path):
    folder = tmp_path / "datasets"
    bad = tmp_path / "upload.jsonl"
    bad.write_text('{"messages": "hello"}\n')
    result = datasets.ingest_upload(store, folder, bad, "mine.jsonl")
    assert result.dataset is None
    assert result.message.startswith("mine.jsonl") and "row 1" in result.message and "'messages'" in result.message
    assert not store.list_datasets() and not list(folder.iterdir())
    sheet = tmp_path / "x.xlsx"
    sheet.write_bytes(b"PK")
    assert "unsupported file type .xlsx" in datasets.ingest_upload(store, folder, sheet, "x.xlsx").message
    big = write_dataset(tmp_path, "chat")
    assert "over the" in datasets.ingest_upload(store, folder, big, "big.jsonl", max_bytes=10).message


def test_delete_dataset_removes_the_file(store, tmp_path):
    result = datasets.ingest_upload(store, tmp_path / "d", write_dataset(tmp_path, "chat"), "c.jsonl")
    path = result.dataset.path
    assert datasets.delete_dataset(store, result.dataset.id) == "deleted c"
    assert not store.list_datasets() and not (tmp_path / "d" / path.rsplit("/", 1)[-1]).exists()


def test_preview_html_escapes_text_and_marks_trained_tokens():
    html = datasets.preview_html([[("<b>user</b>: hi\n", False), ("answer<script>", True)]])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<span class="trained">answer&lt;script&gt;</span>' in html


def test_form_values_become_a_validated_config():
    values = {"adapter": "mora", "r": 8.0, "variant": "auto", "learning_rate": 0, "max_steps": 50.0, "batch_size": 2,
              "target_modules": "q_proj, v_proj", "lora_alpha": 0, "name": ""}
    config = train_view.config_from_form(values, "/data/x.jsonl")
    assert config.r == 8 and config.variant is None and config.learning_rate is None
    assert config.target_modules == ["q_proj", "v_proj"] and config.max_steps == 50
    with pytest.raises(ConfigError, match="batch_size: must be at least 1"):
        train_view.config_from_form({**values, "batch_size": 0}, "/data/x.jsonl")
    with pytest.raises(ConfigError, match="r: expected a whole number"):
        train_view.config_from_form({**values, "r": "eight"}, "/data/x.jsonl")
    assert "variant rope (the paper's choice at this r)" in train_view.defaults_note("mora", 8, "auto")
    assert "default learning rate 5e-05" in train_view.defaults_note("mora", 256, None)


def test_presets_round_trip_and_stay_inside_their_folder(tmp_path):
    values = {"adapter": "lora", "r": 16, "learning_rate": 1e-4, "unknown": 1}
    path = train_view.save_preset(tmp_path, "../../evil name", values)
    assert path.parent == tmp_path and path.name == "evil name.json"
    assert train_view.load_preset(tmp_path, "evil name") == {"adapter": "lora", "r": 16, "learning_rate": 1e-4}
    assert train_view.list_presets(tmp_path) == ["evil name"]
    with pytest.raises(ValueError, match="preset name"):
        train_view.save_preset(tmp_path, "../..", values)


def test_the_pair_shares_data_seed_and_budget_and_is_queued(service, store, tmp_path):
    dataset = datasets.ingest_upload(store, tmp_path / "d", write_dataset(tmp_path, "chat"), "c.jsonl").dataset
    values = {"adapter": "lora", "r": 8, "max_steps": 30, "seed": 7, "learning_rate": 0}
    mora_run, lora_run = train_view.launch_from_form(service, values, dataset.id, pair=True)
    assert mora_run.group_name == lora_run.group_name and mora_run.group_name.startswith("MoRA vs LoRA r=8")
    assert (mora_run.adapter, lora_run.adapter) == ("mora", "lora")
    for key in ("data", "seed", "r", "max_steps", "batch_size"):
        assert mora_run.config[key] == lora_run.config[key]
    assert mora_run.config["learning_rate"] == 3e-4 and lora_run.config["learning_rate"] == 2e-4
    assert bus.queue_lengths(bus.connect(os.environ["REDIS_URL"]))["train"] == 2
    with pytest.raises(ConfigError, match="dataset: upload a dataset"):
        train_view.launch_from_form(service, values, None, pair=False)


def queued_training_settings() -> list[dict]:
    """The settings each training task waiting in the queue carries, read from its Celery message in Redis (protocol
    2: the body is [args, kwargs, embed], and args are run id, settings, run folder, resume folder)."""
    client = bus.connect(os.environ["REDIS_URL"])
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][1] for raw in client.lrange("train", 0, -1)]


def test_a_launch_checks_each_config_once_and_sends_the_settings_the_run_records(service, store, tmp_path,
                                                                                  monkeypatch):
    checked = []
    validate = TrainConfig.validate
    monkeypatch.setattr(TrainConfig, "validate", lambda config: (checked.append(config.adapter), validate(config))[1])
    dataset = datasets.ingest_upload(store, tmp_path / "d", write_dataset(tmp_path, "chat"), "c.jsonl").dataset
    values = {"adapter": "mora", "r": 8, "max_steps": 30, "learning_rate": 0, "variant": "sharing"}
    [run] = train_view.launch_from_form(service, values, dataset.id, pair=False)
    assert checked == ["mora"]
    assert queued_training_settings() == [run.config] and run.config["learning_rate"] == 5e-5
    checked.clear()
    train_view.launch_from_form(service, values, dataset.id, pair=True)
    assert checked == ["mora", "mora", "lora"]  # the form's config, then each of the pair: once each
    as_text = lambda settings: sorted(json.dumps(s, sort_keys=True) for s in settings)  # noqa: E731
    assert as_text(queued_training_settings()) == as_text(r.config for r in store.list_runs())
    # ReMoRA fits MoRA sharing but not LoRA: the pair is refused before either run is queued
    with pytest.raises(ConfigError, match="remora_steps: ReMoRA applies to MoRA adapters only"):
        train_view.launch_from_form(service, {**values, "remora_steps": 10}, dataset.id, pair=True)
    assert len(store.list_runs()) == 3 and len(queued_training_settings()) == 3


def test_service_refuses_what_cannot_be_done(service, store, tmp_path):
    run = service.submit({"data": str(write_dataset(tmp_path, "chat")), "max_steps": 5}, name="x")
    assert (tmp_path / "runs" / run.id).is_dir() and run.status == "queued"
    with pytest.raises(ServiceError, match="only failed or cancelled runs can be resumed"):
        service.resume(run.id)
    with pytest.raises(ServiceError, match="cancel it before deleting it"):
        service.delete(run.id)
    assert service.cancel(run.id).status == "cancelled"
    with pytest.raises(ServiceError, match="has no checkpoint"):
        service.resume(run.id)
    with pytest.raises(ServiceError, match="name: give the run a name"):
        service.rename(run.id, "  ")
    assert service.rename(run.id, "better").name == "better"
    with pytest.raises(ServiceError, match="name: at most 200 characters, got 5,242,880"):
        service.rename(run.id, "x" * 5 * 2**20)  # a 5 MB name would make every Runs refresh 5 MB
    assert service.run(run.id).name == "better"
    data = str(write_dataset(tmp_path, "chat"))
    with pytest.raises(ServiceError, match="tags: at most 20, each at most 64 characters"):
        service.submit({"data": data, "max_steps": 5}, tags=["t" * 65])
    with pytest.raises(ServiceError, match="group: at most 200 characters"):
        service.submit({"data": data, "max_steps": 5}, group_name="g" * 201)
    assert [r.id for r in service.runs()] == [run.id]  # nothing was queued by the refusals
    service.delete(run.id)
    assert not service.runs()
