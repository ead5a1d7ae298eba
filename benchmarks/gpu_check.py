"""The Python steps of `benchmarks/gpu_check.sh`: what the machine is, the model the timed steps train, the paper's
memorisation preset trimmed to fit the check's minutes, and the quantised-base (QLoRA / QMoRA) check. Each step
writes one JSON file; `summary` gathers the steps' outcomes into `summary.json`.

    python benchmarks/gpu_check.py prepare --env OUT/env.json --folder DIR [--skeleton DIR] [--dry-run]
        (writes what the machine is; makes the model folder and prints its JSON description)
    python benchmarks/gpu_check.py memorize --model DIR --out OUT/memorize.json [--dry-run]
    python benchmarks/gpu_check.py quantized --model DIR --out OUT/quantized.json [--dry-run]
    python benchmarks/gpu_check.py summary --steps STEPS.tsv --out OUT/summary.json

The model: the default model (SmolLM2-135M-Instruct) where its weights are installed; otherwise, as on a lent GPU
machine that reaches no package index, SmolLM2-135M's own config.json and tokenizer (carried by `gpu_check.sh
--fetch`) with random weights: the same shapes, so the same time and memory per step, but not its knowledge, so the
memorisation figures then measure what the adapters learn on an untrained base, and say so. The dry run takes the
tests' tiny model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SKELETON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja")
TRIMMED_PAIRS, TRIMMED_STEPS = 500, 120
"""The GPU preset's 1000 pairs and 180 steps at batch 64, halved in pairs and cut to two thirds in steps (the same
passes over the data, about 15), with one learning rate (the paper's, factor 1) and one seed: five runs that fit
the check's minutes on one GPU."""


def write_json(path: str | Path, value: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")


def env_report() -> dict[str, Any]:
    import torch
    import transformers

    report: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torch_pin_met": torch.__version__.split("+")[0] == "2.13.0", "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report.update(device=props.name, device_count=torch.cuda.device_count(),
                      capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                      bf16_supported=torch.cuda.is_bf16_supported())
    else:
        report["device"] = f"CPU ({os.cpu_count()} cores)"
    from workers.quantization import backend_problem

    report["quantization_backend"] = backend_problem() or "available"
    return report


def build_model(folder: Path, dry_run: bool, skeleton: Path) -> dict[str, Any]:
    """The model folder the timed steps train, and what its weights are. `skeleton`: SmolLM2-135M's config.json and
    tokenizer files, copied by `gpu_check.sh --fetch` from the converted default model (a few MB, no weights)."""
    folder = Path(folder)
    if dry_run:
        from tests.fixtures.tiny_model import build_tiny_model

        if not (folder / "config.json").exists():
            build_tiny_model(folder)
        return {"path": str(folder), "weights": "the tests' tiny random Llama (dry run)"}
    from workers.default_model import ensure_default_model
    from workers.models import ModelError

    try:
        return {"path": str(ensure_default_model(progress=lambda line: print(line, file=sys.stderr))),
                "weights": "SmolLM2-135M-Instruct (trained weights)"}
    except ModelError as error:
        reason = str(error)
    if not (folder / "model.safetensors").exists():
        _random_smollm2(folder, skeleton)
    return {"path": str(folder), "weights": f"SmolLM2-135M's config and tokenizer with random weights (the trained "
                                            f"weights are not installed here: {reason})"}


def _random_smollm2(folder: Path, skeleton: Path) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in SKELETON_FILES if not (skeleton / name).exists()]
    if missing:
        raise SystemExit(f"no model to train: the default model is not installed and {skeleton} lacks "
                         f"{', '.join(missing)}; run `benchmarks/gpu_check.sh --fetch` where the default model is "
                         f"prepared, and carry .gpu-check")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(skeleton))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(skeleton).save_pretrained(folder)
    shutil.copy(skeleton / "generation_config.json", folder / "generation_config.json")


def memorize(model: str, out: Path, dry_run: bool, work: Path) -> dict[str, Any]:
    """The memorisation benchmark's five methods, trained here one after another (no store, no queue), and each
    one's character accuracy and exact match at its four checkpoints, read from the run folders."""
    from app.bench.presets import get_preset
    from workers.events import read_events
    from workers.memorize import make_uuid_pairs, write_pairs_dataset
    from workers.training import run_training

    size = {"pairs": 2, "steps": 3} if dry_run else {"pairs": TRIMMED_PAIRS, "steps": TRIMMED_STEPS}
    preset = replace(get_preset("tiny" if dry_run else "gpu"), model=model, lr_factors=(1.0,), **size)
    data = write_pairs_dataset(make_uuid_pairs(preset.pairs, seed=0), work / "pairs.jsonl")
    rows = []
    for index, config in enumerate(preset.run_configs(str(data), seed=0)):
        run_dir = work / f"run-{index}"
        started = time.perf_counter()
        result = run_training(config, run_dir)
        events = read_events(run_dir / "metrics.jsonl")
        steps = [e for e in events if e["kind"] == "step"]
        rows.append({
            "method": config.name, "adapter": config.adapter, "r": config.r, "variant": config.variant,
            "learning_rate": config.learning_rate, "status": result.status, "message": result.message,
            "seconds": round(time.perf_counter() - started, 1),
            "median_tokens_per_s": _median([e["tokens_per_second"] for e in steps[2:]]),
            "peak_memory_mb": max((e["peak_memory_mb"] for e in steps), default=None),
            "recall": [{"step": e["step"], "char_accuracy": e["char_accuracy"], "exact_match": e["exact_match"]}
                       for e in events if e["kind"] == "eval" and "char_accuracy" in e],
        })
        print(f"{config.name}: {result.status} in {rows[-1]['seconds']} s; recall {rows[-1]['recall'][-1:]}",
              file=sys.stderr)
    report = {"benchmark": "memorize", "preset": preset.name, "pairs": preset.pairs, "steps": preset.steps,
              "batch_size": preset.batch_size, "max_length": preset.max_length, "checkpoints": preset.checkpoints,
              "seed": 0, "rows": rows}
    write_json(out, report)
    return report


QUANTIZED_CASES = [("nf4", "mora", "rope"), ("nf4", "lora", None), ("int8", "mora", "rope"), ("int8", "lora", None)]


def quantized(model: str, out: Path, dry_run: bool, work: Path) -> dict[str, Any]:
    """QLoRA and QMoRA: each quantisation with each adapter trains 20 steps on the sample chat data through the
    engine (loss must fall), then the merged export (which dequantises the base) is made and checked by the export
    itself against the adapted quantised model. Where the backend is missing (the dry run's CPU), every case must be
    refused with the reason, and that is what the report holds."""
    from tests.workers.sample_data import write_dataset
    from workers.events import read_events
    from workers.export import ExportError, ExportRequest, export_to
    from workers.quantization import backend_problem
    from workers.train_config import TrainConfig
    from workers.training import run_training

    work.mkdir(parents=True, exist_ok=True)
    data = write_dataset(work, "chat")
    problem = backend_problem()
    cases = []
    for kind, adapter, variant in QUANTIZED_CASES:
        run_dir = work / f"{kind}-{adapter}"
        config = TrainConfig(data=str(data), model=model, adapter=adapter, variant=variant, r=8, max_steps=20,
                             batch_size=4, max_length=64, learning_rate=1e-2 if dry_run else 2e-3, warmup_ratio=0.0,
                             lr_scheduler="constant", quantization=kind)
        started = time.perf_counter()
        result = run_training(config, run_dir)
        steps = [e for e in read_events(run_dir / "metrics.jsonl") if e["kind"] == "step"]
        case: dict[str, Any] = {"quantization": kind, "adapter": adapter, "variant": variant, "status": result.status,
                                "message": result.message, "seconds": round(time.perf_counter() - started, 1),
                                "losses": [round(e["loss"], 4) for e in steps],
                                "peak_memory_mb": max((e["peak_memory_mb"] for e in steps), default=None)}
        if result.status == "succeeded":
            request = ExportRequest(run_id=f"{kind}-{adapter}", run_name=f"{kind}-{adapter}", run_dir=str(run_dir),
                                    output_dir=str(result.output_dir), output_kind="adapter", base_model=model,
                                    adapter=adapter, variant=variant, remora=False, format="merged",
                                    quantization=kind)
            try:
                case["merged_export"] = export_to(request, work / f"merged-{kind}-{adapter}").check
            except ExportError as error:
                case["merged_export"] = {"error": str(error)}
        losses = case["losses"]
        case["ok"] = (result.message == f"quantization {kind}: {problem}" if problem else
                      result.status == "succeeded" and losses[-1] < losses[0] and "error" not in case["merged_export"])
        cases.append(case)
        print(f"{kind} {adapter}: {result.status} {result.message}", file=sys.stderr)
    report = {"benchmark": "quantized", "backend": problem or "available", "model": model,
              "ok": all(case["ok"] for case in cases), "cases": cases}
    write_json(out, report)
    return report


def _median(values: list[float]) -> Optional[float]:
    import statistics

    return statistics.median(values) if values else None


def test_counts(junit: Path) -> Optional[dict[str, Any]]:
    """The gpu tests' counts and the failed tests' names, from pytest's JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    if not Path(junit).exists():
        return None
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = sum(case.find("skipped") is not None for case in cases)
    return {"tests": len(cases), "passed": len(cases) - len(failed) - skipped, "failed": failed, "skipped": skipped}


def summary(steps_file: Path, junit: Path, out: Path, started: float) -> dict[str, Any]:
    """Every step's outcome (from the shell's steps file: name, exit code, seconds) with the machine's report."""
    steps = []
    for line in Path(steps_file).read_text(encoding="utf-8").splitlines():
        name, code, seconds, note = (line.split("\t") + [""])[:4]
        steps.append({"step": name, "exit_code": int(code), "seconds": float(seconds), "ok": code == "0",
                      "note": note or ("timed out" if code in ("124", "137") else "")})
    env_file = Path(out).parent / "env.json"
    report = {"gpu_check": "benchmarks/gpu_check.sh", "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.time() - started, 1), "all_ok": all(step["ok"] for step in steps),
              "steps": steps, "gpu_tests": test_counts(junit),
              "env": json.loads(env_file.read_text()) if env_file.exists() else None}
    write_json(out, report)
    env_file.unlink(missing_ok=True)  # folded into the summary: the device returns at most 8 files
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    prepare = steps.add_parser("prepare")
    prepare.add_argument("--env", required=True, type=Path)
    prepare.add_argument("--folder", required=True, type=Path)
    prepare.add_argument("--skeleton", type=Path, default=ROOT / ".gpu-check" / "smollm2")
    prepare.add_argument("--dry-run", action="store_true")
    for name in ("memorize", "quantized"):
        step = steps.add_parser(name)
        step.add_argument("--model", required=True)
        step.add_argument("--out", required=True, type=Path)
        step.add_argument("--work", required=True, type=Path, help="a scratch folder for the runs")
        step.add_argument("--dry-run", action="store_true")
    done = steps.add_parser("summary")
    done.add_argument("--steps", required=True, type=Path)
    done.add_argument("--junit", required=True, type=Path)
    done.add_argument("--out", required=True, type=Path)
    done.add_argument("--started", required=True, type=float)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        write_json(args.env, env_report())
        print(json.dumps(build_model(args.folder, args.dry_run, args.skeleton)))
    elif args.step == "memorize":
        rows = memorize(args.model, args.out, args.dry_run, args.work)["rows"]
        return 0 if all(row["status"] == "succeeded" for row in rows) else 1
    elif args.step == "quantized":
        return 0 if quantized(args.model, args.out, args.dry_run, args.work)["ok"] else 1
    else:
        report = summary(args.steps, args.junit, args.out, args.started)
        return 0 if report["all_ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
