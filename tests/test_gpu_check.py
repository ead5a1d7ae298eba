"""`benchmarks/gpu_check.sh --dry-run`: every step of the GPU check on the CPU at toy sizes, so the first lent GPU
does not meet a typo. Each step must succeed and write its figures as JSON."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DIR": str(tmp_path / "check"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_ok"], summary["steps"]
    assert [step["step"] for step in summary["steps"]] == [
        "test-gpu", "adapter-overhead", "train-throughput", "memorize", "quantized"]
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 30 and tests["passed"] == tests["tests"] and not tests["failed"], tests
    assert summary["env"]["torch"].startswith("2.13.0") and summary["env"]["cuda_available"] is False

    overhead = json.loads((out / "adapter_overhead.json").read_text())
    assert len(overhead["rows"]) == 6 and all(row["mora_ms"] > 0 and row["lora_ms"] > 0 for row in overhead["rows"])
    throughput = json.loads((out / "train_throughput.json").read_text())
    assert [row["mora"] for row in throughput["rows"]] == ["mora rope r=8", "mora sharing r=256"]
    assert all(row["mora_tokens_per_s"] > 0 for row in throughput["rows"])
    memorize = json.loads((out / "memorize.json").read_text())
    assert len(memorize["rows"]) == 5 and all(row["status"] == "succeeded" for row in memorize["rows"])
    assert all(len(row["recall"]) >= 3 for row in memorize["rows"])
    quantized = json.loads((out / "quantized.json").read_text())
    assert quantized["ok"] and quantized["cases"], quantized
    assert sorted(path.name for path in out.iterdir()) == [
        "adapter_overhead.json", "gpu_check.log", "memorize.json", "quantized.json", "summary.json",
        "train_throughput.json"]  # the device returns at most 8 files
