"""`mora-studio export` as a user runs it: a real subprocess on a data folder whose SQLite store holds the tiny model's
runs. A run is named by its name or its id; every refusal is one line on stderr with exit status 2, no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mora
import pytest
import torch
from peft import PeftModel

from storage.repo import Store
from tests.workers.test_export import IDS, _adapter_run, _base, _logits, adapter_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    data_dir = tmp_path_factory.mktemp("cli-export") / "data"
    store = Store(f"sqlite:///{data_dir / 'studio.db'}")
    runs, expected = adapter_runs(store, data_dir / "runs", tiny_model_dir, ("sharing", "rope"))
    runs["failed"], _ = _adapter_run(store, data_dir / "runs", tiny_model_dir, "failed", mora.LoRAConfig(r=2),
                                     status="failed")
    store.close()
    env = {**os.environ, "MORA_DATA_DIR": str(data_dir), "MORA_MODELS_DIR": str(Path(tiny_model_dir).parent),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MORA_DB_URL", None)
    return SimpleNamespace(dir=data_dir, runs=runs, expected=expected, env=env, tiny=tiny_model_dir)


def _export(data, *args):
    return subprocess.run([sys.executable, "-m", "app.cli", "export", *map(str, args)], cwd=ROOT, env=data.env,
                          capture_output=True, text=True, timeout=300)


def test_export_by_name_writes_a_lora_peft_loads(data, tmp_path):
    out = tmp_path / "lora"
    result = _export(data, "sharing run", "--format", "lora", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (") and "adapter_model.safetensors" in result.stdout
    assert "checked: logits within" in result.stdout
    peft_model = PeftModel.from_pretrained(_base(data.tiny), str(out)).eval()
    torch.testing.assert_close(_logits(peft_model, IDS), data.expected["sharing"], rtol=1e-5, atol=1e-5)
    marker = json.loads((out / "mora_export.json").read_text())
    assert marker["run_id"] == data.runs["sharing"].id and marker["format"] == "lora"

    again = _export(data, data.runs["sharing"].id, "--format", "lora", "--out", out)  # by id; it exists now
    assert again.returncode == 2 and again.stderr == f"mora-studio export: {out} exists; pass --force to replace it, " \
                                                     f"or choose another --out\n"


@pytest.mark.parametrize("args, message", [
    (["nope", "--format", "merged"], "no run has the id or name 'nope'; `mora-studio runs` lists them"),
    (["sharing run", "--format", "onnx"], "unknown export format 'onnx': the formats are merged, adapter, lora, gguf"),
    (["sharing run", "--format", "gguf", "--gguf-type", "q2"], "unknown GGUF type 'q2': expected f16 or q8_0"),
    (["failed run", "--format", "merged"], "is failed; only a succeeded run can be exported"),
    (["rope run", "--format", "lora"], "the rope variant's update is block-diagonal"),
])
def test_refusals_are_one_line(data, tmp_path, args, message):
    result = _export(data, *args, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("mora-studio export: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
