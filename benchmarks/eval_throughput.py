"""Evaluation throughput: answers per second when 4 adapters answer a set of prompts together (one batched
`generate` over prompts × adapters on one copy of the base, `workers.evaluation.answer_batches` as an evaluation
runs it) against the same 4 adapters evaluated one after another (each adapter's prompts in batches of their own).
Both include the teacher-forced answer-loss pass and the scoring, as an evaluation does.

    python benchmarks/eval_throughput.py [--model FOLDER] [--prompts 8] [--tokens 32] [--repeats 3]

Without --model it uses the default model (SmolLM2-135M-Instruct, converted on first use). The adapters are random
MoRA r=8 adapters (the speed does not depend on what they learned). Answers are cut at `--tokens`; an answer that
ends earlier (its end token) ends its row, as in an evaluation. The two sides run interleaved (together, one after
another, together, ...), each side's figure is its best repeat, and the ratio is printed with the lowest and highest
of the repeats' own ratios, the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mora  # noqa: E402
from benchmarks.arithmetic import load, machine  # noqa: E402
from workers.evaluation import EvalExample, answer_batches  # noqa: E402
from workers.model_loading import load_model  # noqa: E402

ADAPTERS = 4
QUESTIONS = ["What is the capital of France?", "Name a prime number larger than ten.", "What colour is the sky?",
             "Who wrote Hamlet?", "What is two plus two?", "Name a planet of the solar system.",
             "What language is spoken in Brazil?", "How many legs does a spider have?"]


def _adapters(model) -> list[str]:
    names = []
    for index in range(ADAPTERS):
        name = f"a{index}"
        mora.add_adapter(model, name, mora.MoRAConfig(r=8))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for layer in mora.adapted_layers(model).values():
                for parameter in layer.adapters[name].parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        names.append(name)
    return names


def _timed(run) -> tuple[float, int]:
    start = time.perf_counter()
    answers = run()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the default model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=32, help="rows per batched generate (the CPU default)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.eval()
    names = _adapters(model)
    examples = [EvalExample(i, i + 1, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "reference")
                for i in range(args.prompts)]

    def together() -> int:
        return sum(len(batch) for batch in answer_batches(model, tokenizer, examples, list(range(ADAPTERS)), names,
                                                          args.tokens, args.batch_rows))

    def one_after_another() -> int:
        return sum(len(batch) for name in names for batch in answer_batches(
            model, tokenizer, examples, [0], [name], args.tokens, args.batch_rows))

    together()  # warm-up: first-call allocations and kernels
    load_before = load()
    runs = (("4 adapters together", together), ("one after another", one_after_another))
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    answers: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits both sides alike
        for label, run in runs:
            seconds, answers[label] = _timed(run)
            times[label].append(seconds)
    results = {}
    for label, _ in runs:
        best = min(times[label])
        results[label] = {"answers": answers[label], "seconds": [round(t, 2) for t in times[label]],
                          "answers_per_second": round(answers[label] / best, 2)}
        print(f"{label}: {answers[label]} answers in {statistics.median(times[label]):.1f} s "
              f"(best {best:.1f} s) = {answers[label] / best:.2f} answers/s", flush=True)
    together_rate, separate_rate = (results[label]["answers_per_second"] for label, _ in runs)
    ratio = together_rate / separate_rate
    rounds = [s / t for t, s in zip(*times.values())]  # each round's own ratio (equal answer counts per side)
    print(f"together / one after another: {ratio:.2f}x (rounds {min(rounds):.2f}-{max(rounds):.2f}x); "
          f"{machine()}; {load_before} before, {load()} after")
    print(json.dumps({"model": str(args.model or "default (SmolLM2-135M-Instruct)"), "prompts": args.prompts,
                      "tokens": args.tokens, "batch_rows": args.batch_rows, "threads": torch.get_num_threads(),
                      "machine": machine(), "results": results,
                      "ratio": round(ratio, 2), "round_ratios": [round(r, 2) for r in rounds]}, indent=2))


if __name__ == "__main__":
    main()
