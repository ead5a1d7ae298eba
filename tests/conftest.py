"""Shared test settings: one torch thread (two threads on a busy 2-core machine were up to 30x slower) and no hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama + tokenizer folder, built once per test session."""
    from tests.fixtures.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture()
def queue_world(tmp_path, tiny_model_dir, monkeypatch):
    """A fresh embedded Redis, store file and process group for one test (tests/workers/queue_harness.py); workers
    and the collector are started by the test."""
    from tests.workers.queue_harness import make_world

    monkeypatch.delenv("REDIS_URL", raising=False)
    world = make_world(tmp_path, tiny_model_dir)
    yield world
    world.close()
