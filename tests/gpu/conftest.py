"""The device the `gpu` tests run on: CUDA (`make test-gpu`), or the CPU for `benchmarks/gpu_check.sh --dry-run`,
which sets MORA_GPU_TEST_DEVICE=cpu so the same test code runs once, at toy sizes, before any GPU is lent."""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def gpu_device() -> torch.device:
    device = torch.device(os.environ.get("MORA_GPU_TEST_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (torch.cuda.is_available() is False); "
                    "MORA_GPU_TEST_DEVICE=cpu runs them on the CPU as the dry run does")
    return device
