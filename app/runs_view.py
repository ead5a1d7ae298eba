"""The Runs tab's tables and exports, as plain functions of store records (values in, values out).

Rows are lists in the order of their `*_COLUMNS` tuple, ready for a `gr.Dataframe`. Numbers a user sorts by (r, final
loss, tokens/s in the runs table) stay numbers; the adapter table is for reading, so it speaks in human units.
"""
from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from storage.records import ArtifactRecord, MetricPointRecord, RunRecord
from workers.formatting import format_bytes, format_parameters

RUN_COLUMNS = ("id", "name", "adapter", "r", "status", "progress", "ETA", "final loss", "tokens/s", "disk", "created")
ADAPTER_COLUMNS = ("run", "adapter", "r̂", "trainable params", "adapter size", "mean effective rank", "tokens/s",
                   "peak memory")
CSV_FIELDS = ("step", "epoch", "tokens", "time")
CSV_FIRST_METRICS = ("loss", "eval_loss")
MISSING = "—"
"""Shown for a setting one run has and another lacks (an older config)."""
_ABSENT = object()
SHORT_TEXT = 48

Series = Mapping[str, Mapping[str, Sequence[MetricPointRecord]]]


# -- formatting -------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """45 → "45s", 200 → "3m 20s", 7500 → "2h 05m"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def adapter_label(run: RunRecord) -> str:
    """"mora rope", "mora sharing", "lora" or "full"."""
    return f"mora {run.variant}" if run.adapter == "mora" and run.variant else run.adapter


def run_labels(runs: Sequence[RunRecord]) -> dict[str, str]:
    """{run id: legend label}: the run's name, with its id added where two selected runs share a name."""
    names = [run.name for run in runs]
    return {run.id: run.name if names.count(run.name) == 1 else f"{run.name} ({run.id})" for run in runs}


# -- the runs table ---------------------------------------------------------------------------------------------


def progress_text(run: RunRecord) -> str:
    """"120/300 (40%)"; just the step while the total is unknown."""
    if not run.max_steps or run.max_steps < 0:
        return str(run.step)
    return f"{run.step}/{run.max_steps} ({100 * run.step // run.max_steps}%)"


def eta_seconds(run: RunRecord, now: Optional[datetime] = None) -> Optional[float]:
    """Seconds left at the run's average step rate since it started; None unless it is running with a known total.

    A resumed run counts from step 0 too, so its first estimates are optimistic.
    """
    if run.status != "running" or run.started_at is None or not run.max_steps or run.step <= 0:
        return None
    remaining = run.max_steps - run.step
    if remaining <= 0:
        return None
    elapsed = (_utc(now or datetime.now(timezone.utc)) - _utc(run.started_at)).total_seconds()
    return elapsed * remaining / run.step if elapsed > 0 else None


def runs_table_rows(runs: Sequence[RunRecord], now: Optional[datetime] = None,
                    disk_use: Optional[Mapping[str, int]] = None) -> list[list]:
    """One row per run, columns as RUN_COLUMNS; `now` (aware, default the current time) is for the ETA, `disk_use`
    the bytes of each run's folder by run id (`system_view.run_disk_use`)."""
    now = now or datetime.now(timezone.utc)
    disk_use = disk_use or {}
    rows = []
    for run in runs:
        eta = eta_seconds(run, now)
        rows.append([
            run.id, run.name, adapter_label(run), run.r, run.status, progress_text(run),
            "" if eta is None else format_duration(eta),
            "" if run.last_loss is None else round(run.last_loss, 4),
            "" if run.tokens_per_second is None else round(run.tokens_per_second, 1),
            format_bytes(disk_use.get(run.id)),
            _utc(run.created_at).strftime("%Y-%m-%d %H:%M"),
        ])
    return rows


# -- comparing runs ---------------------------------------------------------------------------------------------


def config_diff(runs: Sequence[RunRecord]) -> list[list]:
    """[setting, value in each run...] for the settings whose values differ across `runs`, sorted by name; every
    setting when there is one run. Values are compared as stored and shown as short strings."""
    keys = sorted({key for run in runs for key in run.config})
    rows = []
    for key in keys:
        values = [run.config.get(key, _ABSENT) for run in runs]
        if len(runs) == 1 or any(value != values[0] for value in values[1:]):
            rows.append([key, *(_short(value) for value in values)])
    return rows


def primary_artifact(artifacts: Sequence[ArtifactRecord]) -> Optional[ArtifactRecord]:
    """Of `Store.get_artifacts(run_id)`, the one to describe: the adapter, else the saved model, else None."""
    by_kind = {artifact.kind: artifact for artifact in artifacts}
    return by_kind.get("adapter") or by_kind.get("model")


def r_hat_text(r_hat: Any) -> str:
    """MoRA's square size r̂: "32", or "28–38" when the layers differ; "" for LoRA and full fine-tuning."""
    if isinstance(r_hat, Mapping):
        r_hat = list(r_hat.values())
    values = sorted({int(value) for value in (r_hat if isinstance(r_hat, (list, tuple)) else [r_hat])
                     if value is not None})
    if not values:
        return ""
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def adapter_metrics_rows(runs: Sequence[RunRecord], artifacts_by_run: Mapping[str, Optional[ArtifactRecord]]
                         ) -> list[list]:
    """One row per run, columns as ADAPTER_COLUMNS; a run without an artifact yet shows its throughput only."""
    rows = []
    for run in runs:
        artifact = artifacts_by_run.get(run.id)
        rank = (artifact.effective_rank if artifact is not None else None) or {}
        rows.append([
            run.name, adapter_label(run),
            r_hat_text(artifact.r_hat) if artifact is not None else "",
            format_parameters(artifact.trainable_parameters) if artifact is not None else "",
            format_bytes(artifact.size_bytes) if artifact is not None else "",
            f"{rank['mean']:.1f}" if rank.get("mean") is not None else "",
            "" if run.tokens_per_second is None else f"{run.tokens_per_second:,.0f}",
            "" if run.peak_memory_mb is None else format_bytes(run.peak_memory_mb * 2 ** 20),
        ])
    return rows


# -- export -----------------------------------------------------------------------------------------------------


def metrics_csv(run: RunRecord, series: Series) -> str:
    """The run's metric points as CSV: `step,epoch,tokens,time,<metric names>`, one row per step.

    `series` is what `Store.metric_series` returns (other runs in it are ignored). The names are loss and eval_loss,
    then the others sorted; epoch, tokens and time come from the first of them at that step that has them (the train
    step's, where there is one); a missing value is an empty cell.
    """
    metrics = series.get(run.id, {})
    names = sorted((name for name, points in metrics.items() if points), key=lambda name: (
        CSV_FIRST_METRICS.index(name) if name in CSV_FIRST_METRICS else len(CSV_FIRST_METRICS), name))
    rows: dict[int, dict[str, Any]] = {}
    for name in names:
        for point in metrics[name]:
            row = rows.setdefault(point.step, {"step": point.step})
            row[name] = point.value
            for field in CSV_FIELDS[1:]:
                if row.get(field) is None:
                    row[field] = getattr(point, field)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *names])
    for step in sorted(rows):
        writer.writerow(["" if rows[step].get(column) is None else rows[step][column]
                         for column in (*CSV_FIELDS, *names)])
    return text.getvalue()


def metrics_csv_filename(run: RunRecord) -> str:
    """`<run name slug>-<id>-metrics.csv`, of letters, digits, '-' and '_' only, so it names a file in one folder."""
    return f"{_slug(run.name, 'run')}-{_slug(run.id, 'id')}-metrics.csv"


def write_metrics_csv(run: RunRecord, series: Series, folder: Path) -> Path:
    """Write `metrics_csv` into `folder` (created if needed) and return the file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / metrics_csv_filename(run)
    path.write_text(metrics_csv(run, series), encoding="utf-8")
    return path


# -- helpers ----------------------------------------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    """Records are aware UTC; a naive value (from a caller) is taken as UTC rather than failing a redraw."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _short(value: Any) -> str:
    if value is _ABSENT:
        return MISSING
    if value is None:
        text = "None"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_short(item) for item in value) or "[]"
    elif isinstance(value, Mapping):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = str(value)
    # the end of a long value (a file path) is the part that tells runs apart
    return text if len(text) <= SHORT_TEXT else "…" + text[-(SHORT_TEXT - 1):]


def _slug(text: str, fallback: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text.lower()).strip("-_")[:60].strip("-_")
    return slug or fallback


__all__ = ["RUN_COLUMNS", "ADAPTER_COLUMNS", "runs_table_rows", "config_diff", "adapter_metrics_rows",
           "metrics_csv", "metrics_csv_filename", "write_metrics_csv", "format_duration", "adapter_label", "run_labels", "progress_text", "eta_seconds", "primary_artifact",
           "r_hat_text"]
