"""The Runs tab's export path without the browser: the service asks a real utility worker process (embedded Redis,
Celery, the tiny model) to export a stored run; the zip lands in the data folder's exports/ and loads; refusals come
back as messages, and a second export while one runs is refused."""
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app import export_view
from app.service import StudioService
from tests.workers.queue_harness import make_world
from tests.workers.test_export import _logits, adapter_runs
from workers import api


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_DATA_DIR", str(root / "data"))
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))
        world = make_world(root, tiny_model_dir)
        world.runs, world.expected = adapter_runs(world.store, root / "data" / "runs", tiny_model_dir,
                                                  ("sharing", "rope"))
        world.start_worker("utility")
        yield world
        world.close()


def test_a_second_export_while_one_runs_is_refused_and_the_first_lands_in_exports(world, tmp_path):
    service = StudioService(world.store)
    first_request = service.export_request(world.runs["sharing"].id, "merged")
    first, second = "a" * 32, "b" * 32
    assert api.call_worker("export", {"export_id": first, "request": first_request}) == {"started": first}
    busy = api.call_worker("export", {"export_id": second, "request": service.export_request(
        world.runs["rope"].id, "gguf")})
    assert busy == {"error": f"this worker is already exporting (run {world.runs['sharing'].id} as merged); one "
                             f"export at a time: try again when it finishes"}
    reply = api._wait_for_reply(first, 120)
    path = Path(reply["path"])
    assert path.parent == world.root / "data" / "exports" and path.suffix == ".zip"
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), world.expected["sharing"], rtol=1e-5, atol=1e-5)


def test_the_view_hands_over_the_file_or_the_reason(world):
    service = StudioService(world.store)
    steps = list(export_view.export_run(service, world.runs["rope"].id, "gguf:q8_0"))
    assert steps[0][0].startswith(f"Exporting run `{world.runs['rope'].id}` as gguf:q8_0") and steps[0][1] is None
    message, path = steps[-1]
    assert path == str(world.root / "data" / "exports" / f"rope-run-{world.runs['rope'].id}-gguf-q8_0.zip")
    assert "download it below" in message
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["Modelfile", "mora_export.json", "rope-run-q8_0.gguf"]
    refused = list(export_view.export_run(service, world.runs["rope"].id, "lora"))
    assert refused[-1] == (f"⚠️ run {world.runs['rope'].id}: the rope variant's update is block-diagonal (one "
                           f"rotated copy of M per chunk of the input), of rank up to n·r̂, not r̂: no LoRA of rank r̂ "
                           f"equals it; merge it instead (format merged or gguf)", None)
    assert list(export_view.export_run(service, "", "merged")) == [("Choose a run first.", None)]
