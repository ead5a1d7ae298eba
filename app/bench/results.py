"""A benchmark group's statistics: per method, the learning rate with the best final character accuracy, and mean ±
spread over seeds at each checkpoint, with the whole sweep beside it."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Optional, Sequence, Union

from app.bench.presets import method_key, method_label, method_order
from storage.records import RunRecord
from storage.repo import Store

METRICS = ("char_accuracy", "exact_match")


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


def group_runs(store: Store, groups: Groups) -> list[RunRecord]:
    runs = []
    for group in [groups] if isinstance(groups, str) else groups:
        found = store.list_runs(group_name=group)
        if not found:
            raise ValueError(f"no runs in group {group!r}")
        runs += found
    return sorted(runs, key=lambda run: (method_order(run.config), run.config["learning_rate"],
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
    runs = group_runs(store, group)
    series = store.metric_series([run.id for run in runs], METRICS)
    by_method: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        config = run.config
        key = method_key(config["adapter"], config["r"], config.get("variant"))
        by_method[key][config["learning_rate"]].append(run)
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
