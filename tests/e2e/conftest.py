from pathlib import Path

import pytest

from tests.app.test_up import _http_ok, studio_env, studio_process
from tests.workers.queue_harness import wait_for
from workers.embedded_redis import free_port


@pytest.fixture()
def studio(tmp_path, tiny_model_dir):
    """`mora-studio up` with two CPU training workers and the tiny model registered through MORA_MODELS_DIR; yields
    its URL and its data folder."""
    port = free_port()
    env = studio_env(tmp_path, port, MORA_MODELS_DIR=str(Path(tiny_model_dir).parent), OMP_NUM_THREADS="1")
    with studio_process(["up", "--no-prepare", "--cpu-workers", "2"], env, tmp_path):
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _http_ok(url), 120, "the studio to answer", every=0.5)
        yield url, tmp_path / "data"
