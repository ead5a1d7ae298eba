"""A real training run on the GPU: the tiny model through `run_training` (transformers' Trainer), in the dtype the
studio picks there (bfloat16 where supported) and in float16; the loss must fall as it does on the CPU."""
from __future__ import annotations

import pytest
import torch

from tests.workers.sample_data import write_dataset
from workers.events import read_events
from workers.train_config import TrainConfig
from workers.training import run_training

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["auto", "float16"])
@pytest.mark.parametrize("adapter,variant", [("mora", "rope"), ("mora", "sharing"), ("lora", None)])
def test_training_on_the_device_lowers_the_loss(tmp_path, tiny_model_dir, gpu_device, adapter, variant, dtype):
    data = write_dataset(tmp_path, "chat")
    config = TrainConfig(data=str(data), model=str(tiny_model_dir), adapter=adapter, variant=variant, r=8,
                         max_steps=20, batch_size=4, max_length=64, learning_rate=1e-2, warmup_ratio=0.0,
                         lr_scheduler="constant", dtype=dtype)
    result = run_training(config, tmp_path / "run")
    assert result.status == "succeeded", result.message
    steps = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["kind"] == "step"]
    losses = [e["loss"] for e in steps]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    if gpu_device.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # the run (in this process) really allocated on the GPU
