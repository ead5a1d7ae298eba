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
them times 4096 / w (the width ratio), and the sweep multiplies that by each factor of the preset. Checkpoints
fall at 3/9, 5/9, 7/9 and 9/9 of the steps, where the paper's 300, 500, 700 and 900 fall in its 900.

The package, one module per job:

- `presets` — the presets and methods, scaled from the paper's figures to a model's width;
- `plan` — the runs of a benchmark (pairs files, seeds, one TrainConfig per method and rate), submitting them
  through `StudioService.submit` as one group, and following the group's progress;
- `local` — training the whole set in this process, without the queue (`--local`);
- `results` — the statistics: per method, the best learning rate and mean ± spread over seeds at each checkpoint;
- `report` — the Markdown table, the Plotly figure and the result files.

The web process imports this package: it must not import torch (a test checks). Only `local.run_local` trains, and
it imports the training code when called. Its names load on first use (PEP 562), so `app.bench.presets` alone needs
neither the store nor plotly (the GPU check trains the presets' runs on a machine that has neither).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "app.bench.local": ("run_local",),
    "app.bench.plan": ("MAX_SEED", "MAX_SEEDS", "TAGS", "group_name", "group_progress", "pairs_file", "parse_seeds",
                       "plan_runs", "submit_benchmark", "wait_for_group", "write_pairs"),
    "app.bench.presets": ("ABLATION", "PAPER_TABLE2", "PRESETS", "Method", "Preset", "get_preset", "method_key",
                          "method_label", "offered_presets", "with_lr_factors"),
    "app.bench.report": ("ResultFiles", "default_output_dir", "markdown_table", "results_figure", "write_results"),
    "app.bench.results": ("METRICS", "Groups", "group_title", "results_table"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'app.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
