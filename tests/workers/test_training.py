"""Real training runs on the tiny Llama: every schema, every adapter, events, resume, cancel, ReMoRA, bad configs."""
import json

import pytest
import torch

import mora
from workers.events import read_events
from workers.model_loading import load_model
from workers.train_config import ConfigError, TrainConfig, default_learning_rate
from workers.training import latest_checkpoint, run_training
from tests.workers.sample_data import write_dataset

SCHEMAS = ["chat", "sharegpt", "alpaca", "prompt_completion", "text"]
VARIANTS = ["rope", "sharing", "truncation", "decouple", "type2", "type3", "type4"]


def _config(tiny_model_dir, data, **overrides):
    values = dict(data=str(data), model=str(tiny_model_dir), adapter="mora", r=8, max_steps=20, batch_size=4,
                  max_length=64, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    values.update(overrides)
    return TrainConfig(**values)


def _steps(run_dir):
    return [e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "step"]


def _assert_loss_falls(run_dir, margin=0.3):
    losses = [e["loss"] for e in _steps(run_dir)]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin, losses


def _logits(model, tokenizer):
    ids = tokenizer("What is the capital of Peru?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_schema_trains_and_the_adapter_reloads_to_the_same_logits(tmp_path, tiny_model_dir, schema):
    data = write_dataset(tmp_path, schema, "txt" if schema == "text" else "jsonl")
    result = run_training(_config(tiny_model_dir, data), tmp_path / "run")
    assert result.status == "succeeded", result.message
    _assert_loss_falls(tmp_path / "run")
    model, tokenizer = load_model(str(tiny_model_dir))
    base_logits = _logits(model, tokenizer)
    mora.load_adapter(model, tmp_path / "run" / "adapter", name="trained")
    reloaded = _logits(model, tokenizer)
    assert not torch.allclose(reloaded, base_logits, atol=1e-3)
    assert torch.isfinite(reloaded).all()


@pytest.mark.parametrize("adapter,variant", [("mora", v) for v in VARIANTS] + [("lora", None), ("full", None)])
def test_every_adapter_trains(tmp_path, tiny_model_dir, adapter, variant):
    data = write_dataset(tmp_path, "chat")
    lr = {"mora": 1e-2, "lora": 1e-2, "full": 1e-3}[adapter]
    result = run_training(_config(tiny_model_dir, data, adapter=adapter, variant=variant, learning_rate=lr),
                          tmp_path / "run")
    assert result.status == "succeeded", result.message
    _assert_loss_falls(tmp_path / "run")
    expected_output = "model" if adapter == "full" else "adapter"
    assert result.output_kind == expected_output and (tmp_path / "run" / expected_output).is_dir()


def test_events_config_and_adapter_metadata(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path, "chat")
    run_dir = tmp_path / "run"
    result = run_training(_config(tiny_model_dir, data, eval_fraction=0.25, eval_steps=10, save_steps=10), run_dir,
                          run_id="r1")
    assert result.status == "succeeded", result.message
    events = read_events(run_dir / "metrics.jsonl")
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert {e["run_id"] for e in events} == {"r1"}
    statuses = [e["status"] for e in events if e["kind"] == "status"]
    assert statuses == ["running", "succeeded"]
    step = _steps(run_dir)[-1]
    for key in ("loss", "learning_rate", "grad_norm", "epoch", "tokens_seen", "tokens_per_second", "peak_memory_mb"):
        assert step[key] is not None and step[key] >= 0, key
    assert step["tokens_seen"] > _steps(run_dir)[0]["tokens_seen"] > 0
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals][:2] == [10, 20] and all(e["eval_loss"] > 0 for e in evals)
    checkpoints = [e["step"] for e in events if e["kind"] == "checkpoint"]
    assert checkpoints == [10, 20]
    assert (run_dir / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors").exists()
    assert not list((run_dir / "checkpoints").rglob("model.safetensors")), "checkpoints hold the adapter only"
    adapter = next(e for e in events if e["kind"] == "adapter")
    # rope r=8 per layer: q, o 64→64: r̂=32; k, v 64→32: r̂=28; gate, up, down 64↔128: r̂=38 (rounded down to even)
    assert adapter["trainable_parameters"] == 2 * (2 * 32 ** 2 + 2 * 28 ** 2 + 3 * 38 ** 2)
    assert adapter["r_hat"] == [28, 32, 38]
    assert adapter["size_bytes"] > adapter["trainable_parameters"] * 4
    assert len(adapter["layers"]) == 14 and adapter["effective_rank"]["mean"] > 8
    data_event = next(e for e in events if e["kind"] == "data")
    assert data_event["train_examples"] == 6 and data_event["eval_examples"] == 2
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["variant"] == "rope" and saved["learning_rate"] == 1e-2


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Same losses after resuming from step 10 as without stopping: the checkpoint restores adapter, AdamW moments,
    scheduler, RNG and data position. Tolerance 1e-4 absolute: the only difference is float32 summation order."""
    data = write_dataset(tmp_path, "chat")
    config = _config(tiny_model_dir, data, lr_scheduler="cosine", warmup_ratio=0.1, save_steps=10, dropout=0.1)
    full = run_training(config, tmp_path / "full")
    assert full.status == "succeeded"
    resumed = run_training(config, tmp_path / "resumed", resume_from=tmp_path / "full" / "checkpoints" / "checkpoint-10")
    assert resumed.status == "succeeded", resumed.message
    uninterrupted = {e["step"]: e["loss"] for e in _steps(tmp_path / "full")}
    after = {e["step"]: e["loss"] for e in _steps(tmp_path / "resumed")}
    assert sorted(after) == list(range(11, 21))
    for step, loss in after.items():
        assert loss == pytest.approx(uninterrupted[step], abs=1e-4), (step, loss, uninterrupted[step])


def test_resume_skips_a_checkpoint_left_half_written_by_a_killed_worker(tmp_path):
    """Trainer writes trainer_state.json last: a checkpoint without it (or with it torn) was cut off mid-save."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step, state in ((5, "{}"), (10, '{"global_step": 10}'), (15, None), (20, '{"global_st')):
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (checkpoints / "checkpoint-tmp").mkdir()
    assert latest_checkpoint(tmp_path / "run") == checkpoints / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_cancel_stops_cleanly_and_leaves_a_usable_adapter(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path, "chat")
    calls = {"n": 0}

    def stop_after_five():
        calls["n"] += 1
        return calls["n"] >= 5

    result = run_training(_config(tiny_model_dir, data, max_steps=100), tmp_path / "run", should_stop=stop_after_five)
    assert result.status == "cancelled" and result.steps == 5
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-5"
    model, tokenizer = load_model(str(tiny_model_dir))
    base = _logits(model, tokenizer)
    mora.load_adapter(model, tmp_path / "run" / "adapter")
    assert not torch.allclose(_logits(model, tokenizer), base, atol=1e-4)


def test_remora_run_saves_the_merged_model(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path, "chat")
    result = run_training(_config(tiny_model_dir, data, variant="sharing", remora_steps=5, remora_warmup=2),
                          tmp_path / "run")
    assert result.status == "succeeded", result.message
    _assert_loss_falls(tmp_path / "run")
    logs = [e["message"] for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "log"]
    assert sum("ReMoRA: merged" in m for m in logs) == 3  # steps 5, 10, 15 (not at the last step)
    merged, tokenizer = load_model(str(tmp_path / "run" / "model"))
    base, _ = load_model(str(tiny_model_dir))
    assert not torch.allclose(_logits(merged, tokenizer), _logits(base, tokenizer), atol=1e-3)


def test_bad_configs_fail_with_a_message_not_a_traceback(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="adapter: expected one of mora, lora, full"):
        TrainConfig(data="x.jsonl", adapter="dora").validate()
    with pytest.raises(ConfigError, match="remora_steps: ReMoRA switches groupings"):
        TrainConfig(data="x.jsonl", r=8, remora_steps=10).validate()
    with pytest.raises(ConfigError, match="unknown setting 'lr'"):
        TrainConfig.from_dict({"data": "x", "lr": 1})
    result = run_training(_config(tiny_model_dir, tmp_path / "missing.jsonl"), tmp_path / "run")
    assert result.status == "failed" and "missing.jsonl" in result.message
    statuses = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "status"]
    assert statuses[-1]["status"] == "failed"
    result = run_training(_config(tmp_path / "no-model", write_dataset(tmp_path, "chat")), tmp_path / "run2")
    assert result.status == "failed" and "no-model" in result.message


def test_mora_studio_train_refuses_a_bad_config_before_anything_runs(tmp_path, capsys):
    """The engine trusts its config (the service checks what goes to the queue), so the command line checks its own."""
    from app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--batch-size", "0", "--out", str(out)]) == 2
    assert "mora-studio train: batch_size: must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_paper_default_learning_rates():
    assert default_learning_rate("mora", 8) == 3e-4
    assert default_learning_rate("mora", 256) == 5e-5
    assert default_learning_rate("lora", 8) == 2e-4
    resolved = TrainConfig(data="x", adapter="lora", r=256).resolved()
    assert resolved.lora_alpha == 128 and resolved.learning_rate == 2e-4
    assert TrainConfig(data="x", r=64).resolved().variant == "sharing"


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_model_dir):
    """Checkpointing recomputes activations instead of storing them: same losses as without it, frozen base and all."""
    data = write_dataset(tmp_path, "chat")
    plain = run_training(_config(tiny_model_dir, data, max_steps=5), tmp_path / "plain")
    checkpointed = run_training(_config(tiny_model_dir, data, max_steps=5, gradient_checkpointing=True),
                                tmp_path / "checkpointed")
    assert plain.status == checkpointed.status == "succeeded", checkpointed.message
    for a, b in zip(_steps(tmp_path / "plain"), _steps(tmp_path / "checkpointed")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_running_out_of_memory_says_what_to_lower():
    from workers.training import _user_message

    try:
        torch.empty(2**62, dtype=torch.uint8)  # a real CPU allocation failure (4 EiB)
    except RuntimeError as error:
        cpu = error
    assert _user_message(cpu) == ("the machine ran out of memory: lower batch_size or max_length, or enable "
                                  "gradient_checkpointing")
    assert _user_message(MemoryError()).startswith("the machine ran out of memory")
    assert _user_message(ValueError("data: no rows")) == "data: no rows"
