"""Event handlers: plain functions from values to values, testable without a browser."""
from __future__ import annotations

from app.service import StudioService

RUN_COLUMNS = ("id", "name", "adapter", "r", "status", "progress", "loss", "tokens/s")


def _progress(run) -> str:
    if not run.max_steps:
        return "" if run.status == "queued" else f"{run.step or 0}"
    return f"{run.step or 0}/{run.max_steps} ({100 * (run.step or 0) / run.max_steps:.0f}%)"


def runs_table(service: StudioService) -> list[list]:
    return [[run.id, run.name, run.adapter, run.r, run.status, _progress(run),
             round(run.last_loss, 4) if run.last_loss is not None else None,
             round(run.tokens_per_second) if run.tokens_per_second else None] for run in service.runs()]
