"""Training a benchmark's whole set in this process, one run after another, without the queue (`--local`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from app import settings
from app.bench.plan import TAGS, group_name, plans_for_seeds
from app.bench.presets import Preset, get_preset
from storage.records import RunRecord
from storage.repo import Store
from workers.train_config import TrainConfig


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
    plans = plans_for_seeds(preset, seeds, ablation, data_dir)
    records = [_record_run(store, plan, group, runs_dir) for plan in plans]
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

