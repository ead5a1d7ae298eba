"""Peak memory above idle of an upload, on each side: the web process validating and storing it (`ingest_upload`),
and a worker rendering its preview (`workers.utility.preview_examples`, with the tiny test model's tokenizer), for a
500 MB JSONL generated here and for the Parquet dictionary bomb of tests/workers/bad_datasets. The target is under
300 MB above idle for each.

Each measurement runs in a fresh Python process: idle is its RSS once everything the side needs is imported, and the
figure is its peak RSS from then on (Linux's VmHWM, reset at idle) minus that, so the measurement of one file cannot
hide in the allocations of another.

    python benchmarks/upload_memory.py [--mb 500]
    python benchmarks/upload_memory.py --one web|worker FILE [--model MODEL_DIR]   # one measurement, as JSON
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOMB = ROOT / "tests" / "workers" / "bad_datasets" / "dictionary_bomb.parquet"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Start the peak RSS (VmHWM) again from the current RSS. Not ru_maxrss: it survives exec, so a child would
    report its parent's peak."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_here(side: str, path: Path, model: str | None) -> dict:
    """Run one side on one file in this process and report its peak RSS above idle, in MB."""
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as folder:
        if side == "web":
            from app.datasets import ingest_upload
            from storage.repo import Store

            store = Store(f"sqlite:///{Path(folder) / 'studio.db'}")

            def work() -> str:
                return ingest_upload(store, Path(folder) / "datasets", path, path.name).message
        else:
            from workers.data_readers import DatasetError
            from workers.utility import preview_examples, tokenizer_for

            tokenizer_for(model)

            def work() -> str:
                try:
                    return f"{len(preview_examples({'path': str(path), 'model': model})['examples'])} examples"
                except DatasetError as error:
                    return str(error)
        gc.collect()
        _reset_peak()
        idle = _status_kb("VmRSS") * 1024
        message = work()
        peak = _status_kb("VmHWM") * 1024
    return {"side": side, "file": path.name, "size_mb": round(path.stat().st_size / 1e6, 1),
            "peak_above_idle_mb": round(max(0, peak - idle) / 1e6, 1), "message": message[:200]}


def measure(side: str, path: Path, model: str | None = None) -> dict:
    """`measure_here` in a fresh process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", side, str(path)]
    if model:
        command += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"measuring {side} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_chat_jsonl(path: Path, megabytes: float) -> Path:
    """Chat rows of about 1 KB each, up to the given size."""
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as handle:
        written, index = 0, 0
        while written < target:
            line = json.dumps({"messages": [
                {"role": "user", "content": f"Question {index}: " + "tell me about the capital of France. " * 12},
                {"role": "assistant", "content": f"Answer {index}: " + "The capital of France is Paris. " * 14}]})
            handle.write(line + "\n")
            written += len(line) + 1
            index += 1
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="size of the generated JSONL (default 500)")
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "FILE"), help="one measurement in this process")
    parser.add_argument("--model", help="model folder for the worker side")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_here(args.one[0], Path(args.one[1]), args.model)))
        return
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_model(Path(folder) / "tiny-llama"))
        big = write_chat_jsonl(Path(folder) / "big.jsonl", args.mb)
        print(f"{'side':7} {'file':24} {'MB on disk':>10} {'peak MB above idle':>19}  result")
        for path in (big, BOMB):
            for side in ("web", "worker"):
                result = measure(side, path, model)
                print(f"{side:7} {result['file']:24} {result['size_mb']:>10} {result['peak_above_idle_mb']:>19}  "
                      f"{result['message'][:90]}", flush=True)


if __name__ == "__main__":
    main()
