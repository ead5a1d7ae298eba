"""Bad and hostile dataset files through the real upload path: each gets a message naming the file and the problem,
and leaves the datasets folder and the store as they were; a ~50 MB JSONL and the Parquet dictionary bomb are
validated in a fresh process whose peak memory above idle is measured (benchmarks/upload_memory.py)."""
import json
import re
from pathlib import Path

import pytest

from app import datasets
from benchmarks.upload_memory import measure, write_chat_jsonl
from storage.repo import Store
from tests.workers.test_data import BAD_DATASETS, BAD_FILES
from workers.data_readers import FORMATS

UPLOADABLE = sorted(name for name in BAD_FILES if Path(name).suffix in FORMATS)


@pytest.fixture()
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    yield store
    store.close()


@pytest.mark.parametrize("name", UPLOADABLE)
def test_a_bad_upload_is_named_and_leaves_nothing_behind(store, tmp_path, name):
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "kept.jsonl").write_text("{}\n")  # something already there must stay exactly as it was
    result = datasets.ingest_upload(store, folder, BAD_DATASETS / name, f"my {name}")
    assert result.dataset is None
    assert re.match("my " + BAD_FILES[name], result.message), result.message
    assert "Traceback" not in result.message and result.message.strip() != "Error"
    assert [p.name for p in folder.iterdir()] == ["kept.jsonl"]
    assert store.list_datasets() == []


def test_the_upload_temp_file_is_deleted_accepted_or_refused(store, tmp_path):
    for name, content in (("good.jsonl", json.dumps({"text": "A document."}) + "\n"), ("bad.jsonl", "{nope}\n")):
        upload_dir = tmp_path / "gradio" / name
        upload_dir.mkdir(parents=True)
        uploaded = upload_dir / name
        uploaded.write_text(content)
        try:
            datasets.ingest_upload(store, tmp_path / "datasets", uploaded, name)
        finally:
            datasets.discard_upload(uploaded)
        assert not uploaded.exists() and not upload_dir.exists()
    assert [d.original_filename for d in store.list_datasets()] == ["good.jsonl"]


def test_the_dictionary_bomb_is_refused_in_little_memory():
    result = measure("web", BAD_DATASETS / "dictionary_bomb.parquet")
    assert "MORA_MAX_DECODED_MB" in result["message"]
    assert result["peak_above_idle_mb"] < 100, result


def test_validating_fifty_megabytes_of_jsonl_stays_small(tmp_path):
    """Reading the whole file into Python objects, as before, peaked at about 190 MB above idle here; now about 2 MB."""
    path = write_chat_jsonl(tmp_path / "big.jsonl", 50)
    result = measure("web", path)
    assert re.match(r"big\.jsonl: \d+ rows, jsonl, chat format", result["message"]), result
    assert result["peak_above_idle_mb"] < 50, result
