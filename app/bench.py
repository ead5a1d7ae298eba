"""Reproduce the paper's central claim inside the studio: at the same parameter budget, MoRA memorises random
UUID pairs that LoRA learns slowly (issue 6; MORA_SPEC.md §6, the paper's Table 2, and its Table 4 ablation).

One benchmark is a group of ordinary runs: for each seed, every method (full fine-tuning as the ceiling; LoRA and
MoRA at a small and a large budget) at each learning rate of a small sweep, all on the same pairs with the same
seed, batch and steps. Each run measures recall by greedy generation at four checkpoints (`workers.memorize`), so
its curves appear in the Runs tab like any run's. The table picks, for each method, the learning rate with the best
final character accuracy (mean over seeds) and reports the whole sweep beside it.

How the presets are sized (two budgets from the model's width): the paper adapts a 4096-wide model at r=8 and
r=256; a model of width w gets the same ratios, r = paper r · w / 4096 rounded to a power of two (SmolLM2-135M,
w=576: r=1 and r=32). LoRA keeps the paper's alpha/r (16/8 at the small budget, 128/256 at the large). MoRA takes the
paper's variants: rope at the small budget, sharing at the large. Learning rates start from the paper's
continual-pretraining rates (the loss there, as here, falls on every token): LoRA 3.5e-4, MoRA rope 4.5e-4, MoRA
sharing 6e-5, and for full fine-tuning this project's default of 2e-5 (the paper gives none). A model w wide takes
them times 4096 / w (the width ratio), and the sweep multiplies that by each factor of the preset. Checkpoints fall at 3/9, 5/9, 7/9 and 9/9 of the steps, where the
paper's 300, 500, 700 and 900 fall in its 900.

The web process imports this module: it must not import torch (a test checks). Only `run_local` trains, and it
imports the training code when called.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app import settings
from app.charts import PALETTE
from storage.records import RunRecord
from storage.repo import TERMINAL_STATUSES, Store
from workers.memorize import FORMAT_ONLY_CHAR_ACCURACY, make_uuid_pairs, write_pairs_dataset
from mora.variants import ablation_variants
from workers.train_config import TrainConfig

PAPER_WIDTH = 4096
PAPER_BUDGETS = (8, 256)
PAPER_LEARNING_RATES = {"full": 2e-5, "lora": 3.5e-4, "rope": 4.5e-4, "sharing": 6e-5}
PAPER_CHECKPOINTS = (300, 500, 700, 900)
PAPER_TABLE2 = {  # MORA_SPEC.md §6: character accuracy (%) on LLaMA-2-7B, 10k pairs
    "full fine-tuning": (42.5, 100, 100, 100),
    "LoRA r=8": (9.9, 10.0, 10.7, 54.2),
    "MoRA r=8": (10.1, 15.7, 87.4, 100),
    "LoRA r=256": (9.9, 70.6, 100, 100),
    "MoRA r=256": (41.6, 100, 100, 100),
}
ABLATION = ablation_variants()  # the paper's Table 4, in its order, from the variant registry
"""The paper's Table 4: MoRA's compression variants, compared at the small budget."""
METRICS = ("char_accuracy", "exact_match")
TAGS = ("bench", "memorize")


@dataclass(frozen=True)
class Method:
    adapter: str
    r: int = 8
    variant: Optional[str] = None
    lora_alpha: Optional[float] = None
    base_learning_rate: float = 0.0
    """The paper's rate for this method, before width scaling and the sweep."""

    @property
    def key(self) -> str:
        return method_key(self.adapter, self.r, self.variant)

    @property
    def label(self) -> str:
        return method_label(self.adapter, self.r, self.variant)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: Optional[str]
    """A model name or folder; None is the default model (SmolLM2-135M-Instruct)."""
    width: int
    """The model's hidden size, from which the budgets and learning rates are scaled."""
    pairs: int
    steps: int
    batch_size: int
    max_length: int
    lr_factors: tuple[float, ...]

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(max(1, round(self.steps * k / 9)) for k in (3, 5, 7, 9))

    @property
    def budgets(self) -> tuple[int, int]:
        return tuple(_power_of_two(r * self.width / PAPER_WIDTH) for r in PAPER_BUDGETS)

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / self.pairs

    def learning_rates(self, base: float) -> tuple[float, ...]:
        return tuple(_round(base * PAPER_WIDTH / self.width * factor) for factor in self.lr_factors)

    def methods(self, ablation: bool = False) -> tuple[Method, ...]:
        small, large = self.budgets
        if ablation:
            return tuple(Method("mora", small, variant, base_learning_rate=PAPER_LEARNING_RATES["rope"])
                         for variant in ABLATION)
        return (
            Method("full", base_learning_rate=PAPER_LEARNING_RATES["full"]),
            Method("lora", small, lora_alpha=2.0 * small, base_learning_rate=PAPER_LEARNING_RATES["lora"]),
            Method("mora", small, "rope", base_learning_rate=PAPER_LEARNING_RATES["rope"]),
            Method("lora", large, lora_alpha=large / 2, base_learning_rate=PAPER_LEARNING_RATES["lora"]),
            Method("mora", large, "sharing", base_learning_rate=PAPER_LEARNING_RATES["sharing"]),
        )


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1.0))))


def _round(value: float) -> float:
    return float(f"{value:.2g}")


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        description=(
            "SmolLM2-135M on two CPU cores, about 20 minutes a seed. 16 pairs, batch 4, 45 steps (checkpoints 15, "
            "25, 35, 45: about 11 passes over the pairs, as 900 steps at batch 128 over 10k pairs would be), "
            "max_length 80 (a pair is 61-72 tokens with its end-of-text token). 10 runs a seed (5 methods x 2 "
            "learning rates). Measured on 2 quiet cores, medians of whole runs including model load, four recalls "
            "of the 16 pairs and the save: LoRA r=1 96 s, MoRA r=1 rope 115 s, LoRA r=32 109 s, MoRA r=32 "
            "sharing 108 s, full fine-tuning 126 s; 3 seeds (30 runs) took 59 minutes."),
        model=None, width=576, pairs=16, steps=45, batch_size=4, max_length=80, lr_factors=(0.5, 2.0)),
    "gpu": Preset(
        name="gpu",
        description=(
            "SmolLM2-135M on one large GPU (an H200), estimated at about 10 minutes a seed, not measured. "
            "1000 pairs, batch 64, 180 steps (checkpoints 60, 100, 140, 180; about 11.5 passes over the data), "
            "max_length 80, three learning rates per method: 15 runs of roughly 30-40 s each (a step of this small "
            "model takes tens of milliseconds; recall of 1000 pairs in batches of 256 a few seconds per checkpoint)."),
        model=None, width=576, pairs=1000, steps=180, batch_size=64, max_length=80, lr_factors=(0.5, 1.0, 2.0)),
}
_HIDDEN_PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", description="The tests' tiny random Llama ('tiny-llama' in MORA_MODELS_DIR): a few seconds.",
        model="tiny-llama", width=64, pairs=4, steps=9, batch_size=2, max_length=96, lr_factors=(1.0,)),
}


def with_lr_factors(preset: Union[str, Preset], factors: Sequence[float]) -> Preset:
    """The preset with another learning-rate sweep, for when a method's best rate lies at an edge of the preset's."""
    factors = tuple(float(f) for f in factors)
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise ValueError(f"learning-rate factors must be positive numbers, got {' '.join(map(str, factors)) or 'none'}")
    return replace(get_preset(preset), lr_factors=factors)


def offered_presets(installed_models: Iterable[str]) -> list[str]:
    """The presets the studio offers: the public ones, and any other whose model is installed here (a preset is
    only worth a button when its model can load)."""
    installed = set(installed_models)
    return list(PRESETS) + [name for name, preset in _HIDDEN_PRESETS.items() if preset.model in installed]


def get_preset(preset: Union[str, Preset]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    found = PRESETS.get(preset) or _HIDDEN_PRESETS.get(preset)
    if found is None:
        raise ValueError(f"unknown preset {preset!r}; the presets are {', '.join(PRESETS)}")
    return found


# ---- methods ----------------------------------------------------------------------------------------------------

def method_key(adapter: str, r: int, variant: Optional[str]) -> str:
    if adapter == "full":
        return "full"
    return f"lora r={r}" if adapter == "lora" else f"mora r={r} {variant}"


def method_label(adapter: str, r: int, variant: Optional[str]) -> str:
    if adapter == "full":
        return "full fine-tuning"
    return f"LoRA r={r}" if adapter == "lora" else f"MoRA r={r} ({variant})"


def _method_order(config: dict[str, Any]) -> tuple:
    """The paper's order: full fine-tuning, then by budget, LoRA before MoRA, MoRA variants as in Table 4."""
    adapter, variant = config["adapter"], config.get("variant")
    variant_rank = ABLATION.index(variant) if variant in ABLATION else len(ABLATION)
    return (adapter != "full", config["r"] if adapter != "full" else 0, adapter == "mora", variant_rank)


# ---- planning and submitting ------------------------------------------------------------------------------------

def pairs_file(preset: Union[str, Preset], seed: int, data_dir: Optional[Path] = None) -> Path:
    preset = get_preset(preset)
    folder = Path(data_dir) if data_dir is not None else settings.datasets_dir() / "bench"
    return folder / f"memorize-{preset.name}-{preset.pairs}pairs-seed{seed}.jsonl"


def write_pairs(preset: Union[str, Preset], seed: int, data_dir: Optional[Path] = None) -> Path:
    """The seed's pairs file (the same pairs for the same seed, so it is written once)."""
    preset = get_preset(preset)
    path = pairs_file(preset, seed, data_dir)
    if not path.exists():
        write_pairs_dataset(make_uuid_pairs(preset.pairs, seed), path)
    return path


def plan_runs(preset: Union[str, Preset], seed: int, ablation: bool = False,
              data_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    """Every run of one seed: a TrainConfig dict per method and learning rate, named, all on the seed's pairs with
    the same seed, batch, steps and checkpoints. The pairs file is `pairs_file(...)`; `write_pairs` writes it."""
    preset = get_preset(preset)
    data = str(pairs_file(preset, seed, data_dir))
    plans = []
    for method in preset.methods(ablation):
        for learning_rate in preset.learning_rates(method.base_learning_rate):
            config = TrainConfig(
                data=data, model=preset.model, adapter=method.adapter, r=method.r, variant=method.variant,
                lora_alpha=method.lora_alpha, learning_rate=learning_rate, max_steps=preset.steps,
                batch_size=preset.batch_size, max_length=preset.max_length, seed=seed, pack_text=False,
                memorize_pairs_file=data, memorize_eval_steps=list(preset.checkpoints),
                name=f"{method.label} · lr {learning_rate:g} · seed {seed}")
            config.validate()
            plans.append(config.to_dict())
    return plans


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: "3" is seeds 0, 1, 2; "1,2" is those seeds (to add seeds to a benchmark already run)."""
    try:
        seeds: Union[int, list[int]] = ([int(part) for part in text.split(",") if part.strip()] if "," in text
                                        else int(text))
    except ValueError:
        raise ValueError(f"seeds: expected a count (3) or a comma-separated list (1,2), got {text!r}") from None
    if isinstance(seeds, list) and (any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds)):
        raise ValueError(f"seeds: need at least one seed, none negative or repeated, got {text!r}")
    return _seed_list(seeds)


MAX_SEEDS = 10
"""Seeds in one launch: each seed is a whole group of runs (10 for the memorisation set), so 10 seeds are 100 runs."""
MAX_SEED = 1_000_000


def _seed_list(seeds: Union[int, Iterable[int]]) -> list[int]:
    """Checked before anything is listed: a count of 10^19 must be refused, not expanded."""
    if isinstance(seeds, int):
        if not 1 <= seeds <= MAX_SEEDS:
            raise ValueError(f"seeds: run 1 to {MAX_SEEDS} seeds at once (each seed is a whole set of runs), "
                             f"got {seeds}")
        return list(range(seeds))
    listed = [int(s) for s in seeds]
    if not listed:
        raise ValueError("seeds: run at least one seed")
    if len(listed) > MAX_SEEDS or any(not 0 <= seed <= MAX_SEED for seed in listed):
        raise ValueError(f"seeds: at most {MAX_SEEDS} seeds at once, each from 0 to {MAX_SEED:,}, got {listed[:12]}")
    return listed


def group_name(preset: Union[str, Preset], ablation: bool = False) -> str:
    kind = "memorize-ablation" if ablation else "memorize"
    return f"{kind}-{get_preset(preset).name}-{datetime.now():%Y%m%d-%H%M%S}"


def _plans(preset: Preset, seeds: Union[int, Iterable[int]], ablation: bool,
           data_dir: Optional[Path]) -> list[dict[str, Any]]:
    """Seed by seed, so the first seed's whole table is ready first."""
    plans = []
    for seed in _seed_list(seeds):
        write_pairs(preset, seed, data_dir)
        plans += plan_runs(preset, seed, ablation, data_dir)
    return plans


def submit_benchmark(service, preset: Union[str, Preset], seeds: Union[int, Iterable[int]] = 1,
                     ablation: bool = False, data_dir: Optional[Path] = None) -> str:
    """Write the pairs and queue every run through `StudioService.submit` as one named group; return its name."""
    preset = get_preset(preset)
    group = group_name(preset, ablation)
    for plan in _plans(preset, seeds, ablation, data_dir):
        service.submit(plan, name=plan["name"], tags=TAGS, group_name=group)
    return group


def run_local(store: Store, preset: Union[str, Preset], seeds: Union[int, Iterable[int]] = 1,
              ablation: bool = False, data_dir: Optional[Path] = None, runs_dir: Optional[Path] = None,
              on_event: Optional[Callable[[RunRecord, dict[str, Any]], None]] = None) -> str:
    """Train every run in this process, one after another, without the queue; record them in `store` as one group
    (so they show in the Runs tab afterwards) and store each run's events from its metrics.jsonl. Return the group.

    An interrupt cancels the runs not started yet."""
    from workers.collector import Collector
    from workers.events import CallbackSink, read_events
    from workers.training import run_training

    preset = get_preset(preset)
    group = group_name(preset, ablation)
    runs_dir = Path(runs_dir or settings.runs_dir())
    records = [_record_run(store, plan, group, runs_dir) for plan in _plans(preset, seeds, ablation, data_dir)]
    writer = Collector(store, None)
    for index, run in enumerate(records):
        sinks = [CallbackSink(lambda event, run=run: on_event(run, event))] if on_event else []
        try:
            run_training(TrainConfig.from_dict(run.config), Path(run.run_dir), run_id=run.id, sinks=sinks,
                         worker="local")
        except KeyboardInterrupt:
            for later in records[index:]:
                store.set_status(later.id, "cancelled", message="interrupted")
            raise
        finally:
            writer.apply(read_events(Path(run.run_dir) / "metrics.jsonl"))
    return group


def _record_run(store: Store, plan: dict[str, Any], group: str, runs_dir: Path) -> RunRecord:
    """What `StudioService.submit` records, without sending the task."""
    config = TrainConfig.from_dict(plan).resolved()
    run = store.create_run(config.to_dict(), name=config.name, model=config.model or "", adapter=config.adapter,
                           r=config.r, variant=config.variant, tags=TAGS, group_name=group)
    run_dir = runs_dir / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    return store.set_output(run.id, run_dir=str(run_dir))


def group_progress(store: Store, group: str) -> dict[str, Any]:
    """How far a benchmark group is: counts by status and, for each running run, its step."""
    runs = store.list_runs(group_name=group)
    by_status: dict[str, int] = defaultdict(int)
    for run in runs:
        by_status[run.status] += 1
    running = [f"{run.name}: step {run.step}/{run.max_steps or '?'}" for run in runs if run.status == "running"]
    done = sum(by_status.get(status, 0) for status in TERMINAL_STATUSES)
    return {"total": len(runs), "done": done, "by_status": dict(by_status), "running": running,
            "finished": bool(runs) and done == len(runs)}


def wait_for_group(store: Store, group: str, report: Callable[[str], None] = print, poll_s: float = 5.0,
                   timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Poll the store until every run of the group has finished, reporting each change of progress."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = ""
    while True:
        progress = group_progress(store, group)
        line = (f"[{progress['done']}/{progress['total']} finished] "
                + ("; ".join(progress["running"]) or "waiting for a training worker"))
        if line != last:
            report(line)
            last = line
        if progress["finished"]:
            return progress
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"group {group}: {progress['done']} of {progress['total']} runs finished in time")
        time.sleep(poll_s)


# ---- results ----------------------------------------------------------------------------------------------------

def _stats(values: Sequence[float]) -> Optional[dict[str, float]]:
    """Mean and spread (sample standard deviation; 0 for one seed) in percent, over seeds."""
    if not values:
        return None
    percent = [100 * v for v in values]
    spread = statistics.stdev(percent) if len(percent) > 1 else 0.0
    return {"mean": statistics.fmean(percent), "spread": spread, "n": len(percent)}


Groups = Union[str, Sequence[str]]
"""One benchmark group, or several read as one table (a sweep extended with more rates or seeds later)."""


def group_title(groups: Groups) -> str:
    return groups if isinstance(groups, str) else " + ".join(groups)


def _group_runs(store: Store, groups: Groups) -> list[RunRecord]:
    runs = []
    for group in [groups] if isinstance(groups, str) else groups:
        found = store.list_runs(group_name=group)
        if not found:
            raise ValueError(f"no runs in group {group!r}")
        runs += found
    return sorted(runs, key=lambda run: (_method_order(run.config), run.config["learning_rate"],
                                         run.config["seed"]))


def _final(entry: dict[str, Any], metric: str = "char_accuracy") -> Optional[float]:
    steps = entry[metric]
    final = steps[max(steps)] if steps else None
    return final["mean"] if final else None


def results_table(store: Store, group: Groups) -> list[dict[str, Any]]:
    """One row per method, like the paper's Table 2: character accuracy (%) at each checkpoint step, mean and spread
    over seeds, at the learning rate with the best final character accuracy among the rates tried on the most seeds
    (a rate tried on one seed only, to extend the sweep, does not beat one averaged over three; ties: the best mean
    over the checkpoints, then the lower rate). Each row also carries exact match and the whole sweep."""
    runs = _group_runs(store, group)
    series = store.metric_series([run.id for run in runs], METRICS)
    by_method: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        config = run.config
        by_method[method_key(config["adapter"], config["r"], config.get("variant"))][config["learning_rate"]].append(run)
    rows = []
    for key, by_rate in by_method.items():
        sweep = [_sweep_entry(rate, rate_runs, series) for rate, rate_runs in sorted(by_rate.items())]
        best = max(sweep, key=lambda e: (len(e["runs"]), _or_minus(_final(e)), _or_minus(_mean_over_steps(e)),
                                         -e["learning_rate"]))
        config = by_rate[best["learning_rate"]][0].config
        rows.append({"method": key, "label": method_label(config["adapter"], config["r"], config.get("variant")),
                     "adapter": config["adapter"], "r": config["r"], "variant": config.get("variant"),
                     "learning_rate": best["learning_rate"], "seeds": best["seeds"],
                     "char_accuracy": best["char_accuracy"], "exact_match": best["exact_match"], "sweep": sweep})
    return rows


def _sweep_entry(rate: float, runs: list[RunRecord], series) -> dict[str, Any]:
    steps = sorted({step for run in runs for step in run.config.get("memorize_eval_steps") or ()})
    # Only seeds measured at the last checkpoint count, so a group still running (or a failed run) does not pass
    # for more evidence than it has.
    measured = [run.config["seed"] for run in runs
                if steps and any(p.step == steps[-1] and p.value is not None for p in series[run.id]["char_accuracy"])]
    entry: dict[str, Any] = {"learning_rate": rate, "seeds": sorted(measured),
                             "runs": [run.id for run in runs], "statuses": [run.status for run in runs]}
    for metric in METRICS:
        values = defaultdict(list)
        for run in runs:
            for point in series[run.id][metric]:
                if point.value is not None:
                    values[point.step].append(point.value)
        entry[metric] = {step: _stats(values[step]) for step in steps}
    return entry


def _mean_over_steps(entry: dict[str, Any]) -> Optional[float]:
    means = [cell["mean"] for cell in entry["char_accuracy"].values() if cell]
    return statistics.fmean(means) if means else None


def _or_minus(value: Optional[float]) -> float:
    return -math.inf if value is None else value


def _cell(stats: Optional[dict[str, float]], seeds: int = 1) -> str:
    """Mean ± spread; a cell measured on fewer seeds than the table's says how many."""
    if stats is None:
        return "–"
    text = f"{stats['mean']:.1f}" + (f" ± {stats['spread']:.1f}" if stats["n"] > 1 else "")
    return text + (f" (n={stats['n']})" if stats["n"] < seeds else "")


def _steps_of(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({step for row in rows for step in row["char_accuracy"]})


def markdown_table(rows: list[dict[str, Any]], group: Groups = "") -> str:
    """The table (character accuracy, then exact match, in %), the sweep behind it, and the paper's Table 2."""
    steps = _steps_of(rows)
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    header = "| method | learning rate | " + " | ".join(f"step {s}" for s in steps) + " |\n"
    rule = "|---|---|" + "---|" * len(steps) + "\n"
    statuses = [status for row in rows for entry in row["sweep"] for status in entry["statuses"]]
    unfinished = sum(status not in TERMINAL_STATUSES for status in statuses)
    lines = [f"### Memorisation{f' — {group_title(group)}' if group else ''}\n"]
    if unfinished:
        lines.append(f"**In progress:** {len(statuses) - unfinished} of {len(statuses)} runs finished; the table "
                     "fills in as the others do.\n")
    lines += [f"Character accuracy (%) of greedy recall, mean ± standard deviation over {len(seeds)} seed(s) "
              f"({', '.join(map(str, seeds))}), at each method's best learning rate.\n", header + rule.rstrip()]
    lines += [f"| {row['label']} | {row['learning_rate']:g} | "
              + " | ".join(_cell(row["char_accuracy"].get(s), len(seeds)) for s in steps) + " |" for row in rows]
    lines += ["", f"A model that has learnt only the UUID format, none of the values, scores "
                  f"{100 * FORMAT_ONLY_CHAR_ACCURACY:.1f}% (hyphens and version digit right, the other digits by "
                  "chance).", "", "Exact match (%), same runs.", "", header + rule.rstrip()]
    lines += [f"| {row['label']} | {row['learning_rate']:g} | "
              + " | ".join(_cell(row["exact_match"].get(s), len(seeds)) for s in steps) + " |" for row in rows]
    lines += ["", "Learning-rate sweep: final character accuracy and exact match (%), the chosen rate in bold.", "",
              "| method | learning rate | seeds | final char accuracy | final exact match |", "|---|---|---|---|---|"]
    for row in rows:
        for entry in row["sweep"]:
            rate = f"{entry['learning_rate']:g}"
            rate = f"**{rate}**" if entry["learning_rate"] == row["learning_rate"] else rate
            final_step = max(entry["char_accuracy"]) if entry["char_accuracy"] else None
            lines.append(f"| {row['label']} | {rate} | {len(entry['seeds'])} | "
                         f"{_cell(entry['char_accuracy'].get(final_step))} | "
                         f"{_cell(entry['exact_match'].get(final_step))} |")
    edges = [row["label"] for row in rows if len(row["sweep"]) > 1
             and row["learning_rate"] == max(entry["learning_rate"] for entry in row["sweep"])]
    if edges:
        lines += ["", f"The best rate is the largest swept for {', '.join(edges)}: a larger one may do better "
                      "(sweep further with `--lr-factors`)."]
    if any(row["adapter"] == "lora" for row in rows):
        lines += ["", "The paper (LLaMA-2-7B, 10k pairs), character accuracy (%):", "",
                  "| method | " + " | ".join(f"step {s}" for s in PAPER_CHECKPOINTS) + " |",
                  "|---|" + "---|" * len(PAPER_CHECKPOINTS)]
        lines += [f"| {label} | " + " | ".join(f"{v:g}" for v in values) + " |"
                  for label, values in PAPER_TABLE2.items()]
    return "\n".join(lines) + "\n"


def results_figure(store: Store, rows: list[dict[str, Any]], group: Groups) -> go.Figure:
    """Training loss (left) and character accuracy at the checkpoints (right) of each method at its chosen
    learning rate, averaged over seeds, with the spread as error bars. `rows` is `results_table(store, group)`."""
    chosen = {row["method"]: next(e for e in row["sweep"] if e["learning_rate"] == row["learning_rate"])
              for row in rows}
    losses = store.metric_series([rid for entry in chosen.values() for rid in entry["runs"]], ["loss"])
    figure = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "character accuracy (%)"))
    for index, row in enumerate(rows):
        colour, name = PALETTE[index % len(PALETTE)], f"{row['label']} (lr {row['learning_rate']:g})"
        by_step = defaultdict(list)
        for run_id in chosen[row["method"]]["runs"]:
            for point in losses[run_id]["loss"]:
                if point.value is not None:
                    by_step[point.step].append(point.value)
        steps = sorted(by_step)
        figure.add_trace(go.Scatter(x=steps, y=[statistics.fmean(by_step[s]) for s in steps], name=name,
                                    mode="lines", line={"color": colour, "width": 2}, legendgroup=row["method"]),
                         row=1, col=1)
        cells = [(s, c) for s, c in sorted(row["char_accuracy"].items()) if c]
        figure.add_trace(go.Scatter(x=[s for s, _ in cells], y=[c["mean"] for _, c in cells], name=name,
                                    mode="lines+markers", line={"color": colour, "width": 2}, showlegend=False,
                                    error_y={"type": "data", "array": [c["spread"] for _, c in cells]},
                                    legendgroup=row["method"]), row=1, col=2)
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    figure.update_layout(template="plotly_white", title=f"{group_title(group)}: memorisation of UUID pairs "
                                                        f"({len(seeds)} seed(s), best learning rate per method)",
                         legend_title_text="method", margin={"l": 60, "r": 20, "t": 70, "b": 50})
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text="loss", row=1, col=1)
    figure.update_yaxes(title_text="%", range=[0, 101], row=1, col=2)
    figure.add_hline(y=100 * FORMAT_ONLY_CHAR_ACCURACY, line_dash="dot", line_color="#888", row=1, col=2,
                     annotation_text="format only", annotation_position="top left")
    return figure


@dataclass
class ResultFiles:
    json: Path
    markdown: Path
    html: Path
    png: Optional[Path]
    problems: list[str] = field(default_factory=list)
    """What could not be written, and why (the PNG needs a Chrome or Chromium for kaleido)."""


def write_results(store: Store, group: Groups, folder: Union[str, Path]) -> ResultFiles:
    """results.json (the table with every sweep entry and run id), results.md, curves.html (self-contained, works
    offline) and curves.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = results_table(store, group)
    runs = _group_runs(store, group)
    files = ResultFiles(json=folder / "results.json", markdown=folder / "results.md", html=folder / "curves.html",
                        png=folder / "curves.png")
    summary = {"group": group_title(group), "groups": [group] if isinstance(group, str) else list(group),
               "written": datetime.now().isoformat(timespec="seconds"), "metric_unit": "percent",
               "steps": _steps_of(rows), "runs": {run.id: {"name": run.name, "status": run.status,
                                                           "run_dir": run.run_dir} for run in runs},
               "rows": rows}
    files.json.write_text(json.dumps(summary, indent=2) + "\n")
    files.markdown.write_text(markdown_table(rows, group))
    figure = results_figure(store, rows, group)
    figure.write_html(files.html, include_plotlyjs=True)
    try:
        figure.write_image(files.png, width=1400, height=550)
    except Exception as error:  # kaleido without a browser, or one that fails to start: the rest still stands
        files.png = None
        files.problems.append(f"curves.png not written: {type(error).__name__}: {error}")
    return files


def default_output_dir(group: Groups) -> Path:
    return settings.data_dir() / "bench" / re.sub(r"[^A-Za-z0-9._-]+", "-", group_title(group))
