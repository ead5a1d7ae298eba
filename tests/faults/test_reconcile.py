"""Nothing queued forever: a run whose task cannot be sent is not left `queued`, and queued runs whose task a Redis
restart erased are sent again, once each."""
import subprocess
import sys
from pathlib import Path

import yaml

from tests.app.test_up import ROOT, studio_env
from tests.workers.sample_data import write_dataset
from workers.embedded_redis import free_port


def _config(tmp_path: Path, **overrides) -> dict:
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        write_dataset(tmp_path, "chat")
    values = dict(data=str(data), model="tiny-llama", adapter="mora", r=8, max_steps=3, batch_size=4, max_length=64,
                  learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    values.update(overrides)
    return values


def test_submit_with_redis_down_says_so_in_one_line_and_leaves_no_run(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path)))
    env = studio_env(tmp_path, free_port(), MORA_MODELS_DIR=str(Path(tiny_model_dir).parent))
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    submit = subprocess.run([sys.executable, "-m", "app.cli", "submit", str(config)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert submit.returncode == 2, submit.stderr
    assert submit.stdout == ""
    lines = submit.stderr.strip().splitlines()
    assert len(lines) == 1, submit.stderr
    assert lines[0].startswith("mora-studio submit: the run was not queued: cannot reach the queue's Redis at "
                               "redis://127.0.0.1:")
    assert "mora-studio up" in lines[0] and "REDIS_URL" in lines[0] and "Traceback" not in submit.stderr
    runs = subprocess.run([sys.executable, "-m", "app.cli", "runs"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert runs.returncode == 0 and runs.stdout.strip().splitlines()[1:] == [], runs.stdout
    assert not list((tmp_path / "data" / "runs").glob("*"))
