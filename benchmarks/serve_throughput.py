"""Serving throughput of the OpenAI-compatible API over many adapters: total generated tokens per second for 8 greedy
requests sent at once spread over 4 adapters, the same 8 sent at once to one adapter, and the 8 (over 4 adapters)
sent one after another.

It starts the real parts: an embedded Redis, one Celery chat worker process, and the web process (`mora-studio web`)
serving the API, with 4 random MoRA adapters registered as succeeded runs; the clients are the `openai` package in
threads. Each answer is made exactly `--tokens` long (the model's end token is suppressed), so every case generates
the same number of tokens.

    python benchmarks/serve_throughput.py [--model FOLDER] [--tokens 32] [--repeats 2] [--window-ms 30]

Without --model it uses the tiny test model; give the converted SmolLM2 folder to measure the default model.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402
import torch  # noqa: E402

import mora  # noqa: E402
from storage.repo import Store  # noqa: E402
from tests.fixtures.tiny_model import build_tiny_model  # noqa: E402
from tests.workers.queue_harness import make_world, wait_for  # noqa: E402
from workers.embedded_redis import free_port  # noqa: E402
from workers.model_loading import load_model  # noqa: E402

REQUESTS = 8
ADAPTERS = 4


def prepare_model(source: Path | None, models: Path) -> Path:
    """The model folder to serve, under `models`, with its end and pad tokens suppressed so answers run to their
    length."""
    folder = models / (source.name if source else "tiny-llama")
    if source is None:
        build_tiny_model(folder)
    else:
        shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    ends = set()
    for source_config in (config, generation):
        for key in ("eos_token_id", "pad_token_id"):
            value = source_config.get(key)
            ends.update([value] if isinstance(value, int) else value or [])
    generation["suppress_tokens"] = sorted(ends)
    generation_file.write_text(json.dumps(generation))
    return folder


def write_adapters(model_dir: Path, root: Path, store: Store) -> list[str]:
    """Four random MoRA adapters (r=8) saved with mora and registered as succeeded runs; returns their run names."""
    model, _ = load_model(str(model_dir))
    names = []
    for index in range(ADAPTERS):
        name = f"adapter-{index}"
        mora.add_adapter(model, name, mora.MoRAConfig(r=8))
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for layer in mora.adapted_layers(model).values():
                for parameter in layer.adapters[name].parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        folder = root / "adapters" / name
        mora.save_adapter(model, name, folder)
        mora.remove_adapter(model, name)
        run = store.create_run({"model": model_dir.name}, name=name, model=model_dir.name, adapter="mora", r=8)
        store.set_status(run.id, "running")
        store.set_status(run.id, "succeeded")
        store.set_output(run.id, output_dir=str(folder), output_kind="adapter")
        names.append(name)
    return names


def measure(client: openai.OpenAI, jobs: list[tuple[str, str]], tokens: int, together: bool) -> tuple[float, int, int]:
    """(tokens per second, tokens generated, batched generations used) for `jobs` sent at once or one by one."""
    barrier = threading.Barrier(len(jobs)) if together else None

    def ask(job: tuple[str, str]):
        if barrier is not None:
            barrier.wait()
        answer = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                                max_tokens=tokens, temperature=0)
        return answer.usage.completion_tokens, answer.model_extra["mora"]["batch_id"]

    started = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(ask, jobs))
    else:
        results = [ask(job) for job in jobs]
    took = time.perf_counter() - started
    generated = sum(count for count, _ in results)
    return generated / took, generated, len({batch for _, batch in results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a transformers model folder (default: the tiny test model)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per answer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=30, help="MORA_SERVE_WINDOW_MS for the worker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = prepare_model(args.model, root / "models")
        world = make_world(root, model_dir)
        try:
            adapters = write_adapters(model_dir, root, world.store)
            world.env.update({"MORA_SERVE_WINDOW_MS": str(args.window_ms), "MORA_DB_URL": world.store.url,
                              "MORA_DATA_DIR": str(root / "data")})
            world.start_worker("chat")
            port = free_port()
            web_env = {**world.env, "MORA_PORT": str(port)}
            world.group.spawn("web", [sys.executable, "-m", "app.cli", "web"], web_env)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=3600)

            def answering() -> bool:
                try:
                    return bool(client.models.list().data)
                except openai.APIConnectionError:
                    return False

            wait_for(answering, 180, "the web process to serve the API", every=0.5)
            for name in adapters:  # the base and every adapter resident before timing
                client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            prompts = [f"Question {i}: tell me about the number {i}." for i in range(REQUESTS)]
            cases = {
                f"{REQUESTS} at once over {ADAPTERS} adapters": ([(adapters[i % ADAPTERS], p) for i, p in
                                                                 enumerate(prompts)], True),
                f"{REQUESTS} at once to one adapter": ([(adapters[0], p) for p in prompts], True),
                f"{REQUESTS} one after another over {ADAPTERS} adapters": ([(adapters[i % ADAPTERS], p) for i, p in
                                                                           enumerate(prompts)], False),
            }
            results = {}
            for label, (jobs, together) in cases.items():
                runs = [measure(client, jobs, args.tokens, together) for _ in range(args.repeats)]
                results[label] = (statistics.median(r[0] for r in runs), runs[-1][1], max(r[2] for r in runs))
        finally:
            world.close()
    machine = f"{os.cpu_count()} CPU cores, {platform.machine()}, " + (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    print(f"model {model_dir.name}, {args.tokens} tokens an answer, window {args.window_ms} ms, "
          f"median of {args.repeats}, {machine}")
    print(f"{'case':<44} {'tokens/s':>9} {'tokens':>7} {'generations':>12}")
    for label, (rate, generated, batches) in results.items():
        print(f"{label:<44} {rate:>9.1f} {generated:>7} {batches:>12}")
    spread, one, serial = (results[label][0] for label in cases)
    print(f"over {ADAPTERS} adapters at once / one after another: {spread / serial:.2f}x; "
          f"over {ADAPTERS} adapters / one adapter, both at once: {spread / one:.2f}")


if __name__ == "__main__":
    main()
