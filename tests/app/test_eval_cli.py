"""`mora-studio eval` as a user runs it: a real subprocess on a data folder whose SQLite store holds the tiny
model's runs; rows named by run name, run id or folder; the table on stdout, every answer in --json; refusals one
line on stderr with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from storage.repo import Store
from tests.workers.sample_data import write_dataset
from tests.workers.test_export import adapter_runs
from workers.eval_metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli-eval")
    data_dir = root / "data"
    store = Store(f"sqlite:///{data_dir / 'studio.db'}")
    runs, _ = adapter_runs(store, data_dir / "runs", tiny_model_dir, ("sharing", "lora"))
    store.close()
    env = {**os.environ, "MORA_DATA_DIR": str(data_dir), "MORA_MODELS_DIR": str(Path(tiny_model_dir).parent),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MORA_DB_URL", None)
    return SimpleNamespace(dir=data_dir, runs=runs, env=env, chat=write_dataset(root, "chat"), text=write_dataset(
        root, "text"))


def _eval(data, *args):
    return subprocess.run([sys.executable, "-m", "app.cli", "eval", *map(str, args)], cwd=ROOT, env=data.env,
                          capture_output=True, text=True, timeout=300)


def test_runs_by_name_and_id_a_folder_and_the_base_print_one_table(data, tmp_path):
    out = tmp_path / "scores.json"
    folder = data.runs["lora"].output_dir
    result = _eval(data, "sharing run", data.runs["lora"].id, folder, "--base", "--data", data.chat, "--limit", 3,
                   "--max-new-tokens", 5, "--json", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 prompts" and lines[1].split() == ["row", *METRICS]
    assert [line.split()[0] for line in lines[2:6]] == ["base", "sharing", "lora", "adapter"]
    assert lines[-1] == f"wrote {out}"
    written = json.loads(out.read_text())
    assert written["rows"] == ["base model", "sharing run", "lora run", "adapter"] and written["prompts"] == 3
    assert len(written["examples"]) == 3 and set(written["examples"][0]["answers"]) == set(written["rows"])
    # the folder is the same adapter as the lora run: the same answers and scores
    assert written["scores"]["adapter"] == written["scores"]["lora run"]
    assert set(written["scores"]["base model"]) == set(METRICS)


@pytest.mark.parametrize("args, message", [
    (["nope", "--data", "{chat}"], "no run has the id or name 'nope'; `mora-studio runs` lists them"),
    (["--data", "{chat}"], "name the runs or folders to evaluate, or --base"),
    (["--base", "--data", "{text}"], "text.jsonl: raw text has no prompt and reference answer to compare"),
    (["--base", "--data", "{chat}", "--limit", "0"], "limit: between 1 and 1000 prompts"),
    (["--base", "--data", "{chat}", "--max-new-tokens", "5000"], "max_new_tokens: between 1 and 1024"),
])
def test_refusals_are_one_line(data, args, message):
    result = _eval(data, *[a.format(chat=data.chat, text=data.text) for a in args])
    assert result.returncode == 2 and result.stderr.startswith("mora-studio eval: "), result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
