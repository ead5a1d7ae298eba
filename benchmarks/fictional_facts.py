"""Which method learns new facts: MoRA vs LoRA at the same parameter budget, and full fine-tuning, trained on facts
the base model cannot know (generated here: fictional devices and their part numbers), then evaluated by generation
on the questions they trained on and on paraphrases of them they never saw (exact match, `workers.evaluation`).

    python benchmarks/fictional_facts.py [--facts 40] [--steps 150] [--seeds 0 1 2] [--lrs mora=3e-4,1e-3 ...]

Each method is trained at each of its learning rates with each seed, in this process, one run after another
(`workers.training.run_training`); every run is then evaluated on both question sets with all adapters of a seed
answering side by side on one copy of the base (`workers.evaluation.run_evaluation`). The table reports, per method,
its best learning rate by mean exact match on the trained questions, and at that rate the mean ± spread over seeds.
Results (JSON and Markdown) go to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAINED_TEMPLATES = ("What is the part number of the {name}?", "Give me the part number of the {name}.")
PARAPHRASE_TEMPLATES = ("Which part number does the {name} have?", "The {name} has which part number?")
PREFIXES = ("Zor", "Quel", "Vask", "Brin", "Tolu", "Mirr", "Xan", "Pello", "Dravo", "Kest", "Ulme", "Fenn")
SUFFIXES = ("blax", "tron", "vane", "quist", "morph", "dyne", "lith", "spar", "wick", "grove")
KINDS = ("valve", "coupler", "regulator", "sensor", "bracket", "manifold", "rotor", "gasket")


def make_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """n (device name, part number) pairs, e.g. ("Zorblax coupler", "QX-4821"), unique names; the same for a seed."""
    rng = random.Random(seed)
    names = sorted({f"{p}{s} {k}" for p in PREFIXES for s in SUFFIXES for k in KINDS})
    if n > len(names):
        raise ValueError(f"facts: at most {len(names)}, got {n}")
    chosen = rng.sample(names, n)
    return [(name, f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}-"
                   f"{rng.randrange(1000, 10000)}") for name in chosen]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_facts(facts: list[tuple[str, str]], folder: Path) -> dict[str, Path]:
    """train.jsonl (each fact under both trained phrasings), trained.jsonl (the first phrasing, to evaluate) and
    paraphrases.jsonl (phrasings never trained on)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": [_chat(t.format(name=name), f"The part number of the {name} is {number}.")
                       for name, number in facts for t in TRAINED_TEMPLATES],
             "trained": [_chat(TRAINED_TEMPLATES[0].format(name=name), f"The part number of the {name} is {number}.")
                         for name, number in facts],
             "paraphrases": [_chat(PARAPHRASE_TEMPLATES[i % 2].format(name=name),
                                   f"The part number of the {name} is {number}.")
                             for i, (name, number) in enumerate(facts)]}
    paths = {}
    for key, rows in files.items():
        paths[key] = folder / f"{key}.jsonl"
        paths[key].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the default model)")
    parser.add_argument("--facts", type=int, default=40)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lrs", nargs="+", default=["mora=3e-4,1e-3", "lora=2e-4,1e-3", "full=2e-5,1e-4"],
                        help="METHOD=LR,LR... for each method to run")
    parser.add_argument("--out", type=Path, default=Path("data/bench/fictional-facts"))
    args = parser.parse_args()

    from workers.chat import ChatEngine
    from workers.evaluation import EvalRequest, run_evaluation
    from workers.train_config import TrainConfig
    from workers.training import run_training

    rates = {method: [float(x) for x in lrs.split(",")] for method, lrs in (item.split("=") for item in args.lrs)}
    results = []
    for seed in args.seeds:
        paths = write_facts(make_facts(args.facts, seed), args.out / f"data-seed{seed}")
        for method, lrs in rates.items():
            for lr in lrs:
                run_dir = args.out / f"{method}-lr{lr:g}-seed{seed}"
                config = TrainConfig(data=str(paths["train"]), model=args.model, adapter=method, r=args.r,
                                     max_steps=args.steps, batch_size=4, max_length=64, learning_rate=lr,
                                     lr_scheduler="constant", warmup_ratio=0.0, seed=seed)
                config.validate()
                started = time.perf_counter()
                trained = run_training(config, run_dir, run_id=run_dir.name)
                if trained.status != "succeeded":
                    raise SystemExit(f"{run_dir.name}: {trained.message}")
                row = {"method": method, "lr": lr, "seed": seed, "train_seconds": time.perf_counter() - started,
                       "final_loss": trained.final_loss, "output": trained.output_dir, "kind": trained.output_kind}
                print(f"{run_dir.name}: loss {trained.final_loss:.3f} in {row['train_seconds']:.0f} s", flush=True)
                results.append(row)
                args.out.mkdir(parents=True, exist_ok=True)  # what is done so far survives an interrupted sweep
                (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        seed_rows = [r for r in results if r["seed"] == seed]
        for split in ("trained", "paraphrases"):
            request = EvalRequest.from_dict({
                "base_model": args.model, "max_new_tokens": 24,
                "rows": [{"label": f"{r['method']} {r['lr']:g}",
                          ("model_path" if r["kind"] == "model" else "adapter_path"): r["output"]} for r in seed_rows],
                "source": {"data": str(paths[split]), "limit": args.facts}})
            scores = run_evaluation(ChatEngine(), request).scores
            for index, row in enumerate(seed_rows):
                row[f"{split}_exact_match"] = scores[index]["exact_match"]
                row[f"{split}_char_accuracy"] = scores[index]["char_accuracy"]
            print(f"seed {seed} {split}: " + ", ".join(f"{r['method']} {r['lr']:g} {r[f'{split}_exact_match']:.2f}"
                                                       for r in seed_rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| method | best lr | exact match, trained questions | exact match, paraphrases | seeds |",
             "|---|---|---|---|---|"]
    for method, lrs in rates.items():
        def mean(lr, key):
            return statistics.fmean(r[key] for r in results if r["method"] == method and r["lr"] == lr)
        # by exact match on the trained questions; a tie (all rates learnt them) goes to the lower final loss, never
        # to the paraphrases, which are the held-out measure
        best = max(lrs, key=lambda lr: (mean(lr, "trained_exact_match"), -mean(lr, "final_loss")))
        cells = []
        for key in ("trained_exact_match", "paraphrases_exact_match"):
            values = [100 * r[key] for r in results if r["method"] == method and r["lr"] == best]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.1f}%{spread}")
        lines.append(f"| {method} r={args.r} | {best:g} | {cells[0]} | {cells[1]} | {len(args.seeds)} |"
                     if method != "full" else f"| full fine-tuning | {best:g} | {cells[0]} | {cells[1]} | "
                                              f"{len(args.seeds)} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
