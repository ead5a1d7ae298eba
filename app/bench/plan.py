"""The runs of one benchmark: each seed's pairs file, one TrainConfig per method and learning rate, submitted through
`StudioService.launch` as one named group, and the group's progress as its runs finish."""
from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from app import settings
from app.bench.presets import Preset, get_preset
from storage.repo import Store
from storage.statuses import TERMINAL_STATUSES
from workers.memorize import make_uuid_pairs, write_pairs_dataset
from workers.train_config import TrainConfig

TAGS = ("bench", "memorize")


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
    return [config.to_dict() for config in preset.run_configs(str(pairs_file(preset, seed, data_dir)), seed, ablation)]


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


def plans_for_seeds(preset: Preset, seeds: Union[int, Iterable[int]], ablation: bool,
           data_dir: Optional[Path]) -> list[dict[str, Any]]:
    """Seed by seed, so the first seed's whole table is ready first."""
    plans = []
    for seed in _seed_list(seeds):
        write_pairs(preset, seed, data_dir)
        plans += plan_runs(preset, seed, ablation, data_dir)
    return plans


def submit_benchmark(service, preset: Union[str, Preset], seeds: Union[int, Iterable[int]] = 1,
                     ablation: bool = False, data_dir: Optional[Path] = None) -> str:
    """Write the pairs and queue every run through `StudioService.launch` as one named group; return its name. The
    plans were checked as they were made (`Preset.run_configs`), so they are launched without a second check."""
    preset = get_preset(preset)
    group = group_name(preset, ablation)
    for plan in plans_for_seeds(preset, seeds, ablation, data_dir):
        service.launch(TrainConfig.from_dict(plan), name=plan["name"], tags=TAGS, group_name=group)
    return group



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

