"""The real default model: a few training steps through the command line, then a chat with the result.

Slow (about two minutes on 2 cores, plus a one-time conversion of the model): `make test-slow`."""
import pytest

from app.cli import main
from tests.workers.sample_data import write_dataset
from workers.events import read_events

pytestmark = pytest.mark.slow


def test_train_smollm2_then_chat_with_the_adapter(tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path, "chat")
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(data), "--adapter", "mora", "--r", "8", "--max-steps", "3",
                 "--batch-size", "2", "--max-length", "96", "--out", str(run_dir)]) == 0
    steps = [e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all(e["tokens_per_second"] > 0 for e in steps)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    answers = iter(["What is the capital of Peru?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    capsys.readouterr()
    assert main(["chat", "--adapter", str(run_dir), "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert "Lima" in capsys.readouterr().out
