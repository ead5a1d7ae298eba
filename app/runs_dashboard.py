"""The Runs tab's live refresh: what one tick reads and what it sends, so that its cost follows what changed.

The page polls once a second. A tick reads one page of the runs table (filtered, sorted and cut by the store) and the
records of the selected runs, and compares them with what it sent last time (kept per browser session in
`DashboardState`):

- the table and the run choices are sent only when their rows changed;
- a run's curves are read again only when its record says it has something new (its status, step or eval loss
  moved), and then as at most `buckets_per_run` sampled buckets (`Store.sampled_series`: each bucket's last point
  with its min and max), whatever the run logged; the figure, the config differences and the adapter tables are
  rebuilt only when a curve, the selection or a display setting changed.

Everything that did not change comes back as `UNCHANGED`, which the view turns into `gr.skip()`: a quiet tick sends
nothing. Functions here are plain (service and values in, values out) and tested without a browser.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Optional

import pandas as pd

from app import runs_view, system_view
from app.charts import EVAL_METRIC, TRAIN_METRIC, effective_rank_figure, loss_figure
from app.service import StudioService
from storage.records import RunRecord, SampledPointRecord
from storage.repo import TERMINAL_STATUSES

UNCHANGED = object()
"""A part of the page that is already up to date: the view sends nothing for it."""
PAGE_SIZE = 25
MAX_SELECTED = 10
"""Runs compared at once: each is a curve in one figure; past ten the colours repeat and the legend stops helping."""
FIGURE_BUCKETS = 2000
"""Sampled buckets drawn in the loss figure, shared by the selected runs (so 10 runs get 200 each)."""
MIN_BUCKETS_PER_RUN, MAX_BUCKETS_PER_RUN = 100, 1500
CURVES = (TRAIN_METRIC, EVAL_METRIC)
SORTS = {"newest": ("created_at", True), "oldest": ("created_at", False), "name": ("name", False),
         "final loss": ("last_loss", False), "tokens/s": ("tokens_per_second", True), "status": ("status", False)}
MAX_SEARCH = 200


@dataclass(frozen=True)
class RunsQuery:
    """What the table shows: filters (empty: all), a sort from `SORTS`, and a 0-based page."""

    status: str = ""
    adapter: str = ""
    tag: str = ""
    group: str = ""
    search: str = ""
    sort: str = "newest"
    page: int = 0

    def store_arguments(self) -> dict[str, Any]:
        if self.sort not in SORTS:
            raise ValueError(f"sort: expected one of {', '.join(SORTS)}, got {self.sort!r}")
        if len(self.search) > MAX_SEARCH or len(self.tag) > MAX_SEARCH or len(self.group) > MAX_SEARCH:
            raise ValueError(f"search, tag and group: at most {MAX_SEARCH} characters")
        column, descending = SORTS[self.sort]
        return {"status": self.status or None, "adapter": self.adapter or None, "tag": self.tag.strip() or None,
                "group_name": self.group.strip() or None, "search": self.search, "sort": column,
                "descending": descending, "offset": max(0, self.page) * PAGE_SIZE, "limit": PAGE_SIZE}


@dataclass(frozen=True)
class CurveView:
    """How the selected runs are drawn; a change of any of it redraws the figure."""

    run_ids: tuple[str, ...] = ()
    x_axis: str = "step"
    smoothing: float = 0.0
    log_scale: bool = False
    step_range: Optional[tuple[int, int]] = None
    """A zoom: only these steps, read at full resolution when they hold no more points than the bucket budget."""


@dataclass
class DashboardState:
    """What this browser session was last sent (lives in a `gr.State`)."""

    rows: Optional[list] = None
    choices: Optional[list] = None
    page_note: Optional[str] = None
    view: Optional[CurveView] = None
    versions: dict[str, tuple] = field(default_factory=dict)
    """Each drawn run's (status, step, last eval loss, finished_at): when it moves, the run has new points."""
    curves: dict[str, dict[str, list]] = field(default_factory=dict)
    """The sampled curves drawn, by run: only runs whose version moved are read again."""
    tables_for: Optional[tuple] = None


@dataclass
class Tick:
    state: DashboardState
    table: Any = UNCHANGED
    choices: Any = UNCHANGED
    page_note: Any = UNCHANGED
    figure: Any = UNCHANGED
    diff: Any = UNCHANGED
    metrics: Any = UNCHANGED
    ranks: Any = UNCHANGED


def zoom_range(first: Any, last: Any) -> Optional[tuple[int, int]]:
    """The zoom boxes as a step range. A blank box is open at its end, and a number box that a user cleared sends 0,
    so 'to step' 0 is open too; both open is no zoom."""
    try:
        low = int(first) if first not in (None, "") else 0
        high = int(last) if last not in (None, "", 0) else None
    except (TypeError, ValueError):
        raise ValueError(f"zoom: steps are whole numbers, got {first!r} to {last!r}") from None
    if low < 0 or (high is not None and high < low):
        raise ValueError(f"zoom: 'from step' ({low}) must be at least 0 and at most 'to step' ({high})")
    if high is None:
        return None if low == 0 else (low, 2**31 - 1)
    return low, high


def buckets_per_run(selected: int) -> int:
    return max(MIN_BUCKETS_PER_RUN, min(MAX_BUCKETS_PER_RUN, FIGURE_BUCKETS // max(1, selected)))


def _version(run: RunRecord) -> tuple:
    return (run.status, run.step, run.last_eval_loss, run.finished_at)


def check_selection(run_ids: list[str]) -> list[str]:
    if len(run_ids) > MAX_SELECTED:
        raise ValueError(f"compare at most {MAX_SELECTED} runs at once; {len(run_ids)} are ticked — untick some")
    return run_ids


def tick(service: StudioService, state: Optional[DashboardState], query: RunsQuery, view: CurveView,
         now: Optional[datetime] = None) -> Tick:
    """One refresh of the Runs tab: reads the visible page and the selected runs, sends only what changed."""
    state = replace(state) if state is not None else DashboardState()
    result = Tick(state)
    page = service.runs_page(**query.store_arguments())
    selected = service.runs_by_id(check_selection(list(view.run_ids)))
    rows = runs_view.runs_table_rows(page.runs, now=now, disk_use=system_view.run_disk_use(page.runs))
    if rows != state.rows:
        state.rows = result.table = rows
    choices = _choices(page.runs, selected)
    if choices != state.choices:
        state.choices = result.choices = choices
    note = page_note(query.page, page.total)
    if note != state.page_note:
        state.page_note = result.page_note = note
    _refresh_curves(service, state, result, selected, view)
    return result


def _choices(page_runs: list[RunRecord], selected: list[RunRecord]) -> list[tuple[str, str]]:
    """The runs on the page, then selected runs from other pages, so a selection survives paging."""
    shown = {run.id: run for run in [*page_runs, *selected]}
    return [(f"{run.name} · {run.id}", run.id) for run in shown.values()]


def _extended(service: StudioService, run_id: str, drawn: dict[str, list], budget: int,
              step_range: Optional[tuple[int, int]]) -> dict[str, list]:
    """A live run's drawn curves with the points logged since: only steps after the last drawn are read (an index
    range, so the cost follows the new points, not the run's history), appended, and pairs of buckets merged while
    a curve holds more than `budget`, keeping each merged bucket's min, max and last point."""
    last_drawn = min((points[-1].step for points in drawn.values() if points), default=-1)
    end = step_range[1] if step_range else 2**31 - 1
    if last_drawn >= end:
        return drawn
    fresh = service.sampled_curves([run_id], CURVES, buckets=budget, step_range=(last_drawn + 1, end))[run_id]
    curves = {}
    for name in CURVES:
        old = drawn.get(name, [])
        after = old[-1].step if old else -1
        merged = old + [point for point in fresh.get(name, []) if point.step > after]
        while len(merged) > budget:
            merged = _coarsened(merged)
        curves[name] = merged
    return curves


def _coarsened(buckets: list[SampledPointRecord]) -> list[SampledPointRecord]:
    """Neighbouring buckets merged two by two: half as many, each still with its min, max and last point."""
    merged = []
    for first, second in zip(buckets[0::2], buckets[1::2]):
        lows = [value for value in (first.low, second.low) if value is not None]
        highs = [value for value in (first.high, second.high) if value is not None]
        merged.append(replace(second, low=min(lows, default=None), high=max(highs, default=None),
                              count=first.count + second.count))
    if len(buckets) % 2:
        merged.append(buckets[-1])
    return merged


def page_note(page: int, total: int) -> str:
    if total == 0:
        return "No runs match."
    pages = -(-total // PAGE_SIZE)
    first = page * PAGE_SIZE + 1
    if first > total:
        return f"Page {page + 1} is past the last ({pages}); {total} runs match."
    return f"Runs {first}–{min(total, first + PAGE_SIZE - 1)} of {total} · page {page + 1} of {pages}"


def _refresh_curves(service: StudioService, state: DashboardState, result: Tick, selected: list[RunRecord],
                    view: CurveView) -> None:
    view = replace(view, run_ids=tuple(run.id for run in selected))
    versions = {run.id: _version(run) for run in selected}
    sampling_changed = state.view is None or (state.view.step_range, len(state.view.run_ids)) != (
        view.step_range, len(view.run_ids))
    budget = buckets_per_run(len(selected))
    moved = [run for run in selected if run.id in state.curves and state.versions.get(run.id) != versions[run.id]]
    # Read whole (sampled by the store): a new selection or zoom, runs not drawn yet, and runs that just ended (so
    # the final curve is the store's own sampling). A live run that moved reads only its steps after the last drawn.
    whole = [run.id for run in selected if sampling_changed or run.id not in state.curves
             or (run in moved and run.status in TERMINAL_STATUSES)]
    growing = [run for run in moved if run.id not in whole]
    if not whole and not growing and view == state.view:
        return
    state.curves = {run_id: curves for run_id, curves in state.curves.items() if run_id in versions}
    if whole:
        state.curves.update(service.sampled_curves(whole, CURVES, buckets=budget, step_range=view.step_range))
    for run in growing:
        state.curves[run.id] = _extended(service, run.id, state.curves[run.id], budget, view.step_range)
    labels = runs_view.run_labels(selected)
    result.figure = loss_figure({run.id: state.curves[run.id] for run in selected}, labels, x_axis=view.x_axis,
                                smoothing=view.smoothing, log_scale=view.log_scale)
    tables_for = tuple((run.id, run.name, run.status) for run in selected)
    if tables_for != state.tables_for:  # config and adapter change only with the selection or a run's end
        artifacts = {run.id: runs_view.primary_artifact(service.artifacts(run.id)) for run in selected}
        result.diff = pd.DataFrame(runs_view.config_diff(selected), columns=["setting", *(labels[r.id] for r in selected)])
        result.metrics = pd.DataFrame(runs_view.adapter_metrics_rows(selected, artifacts),
                                      columns=list(runs_view.ADAPTER_COLUMNS))
        result.ranks = effective_rank_figure(artifacts, labels)
        state.tables_for = tables_for
    state.view, state.versions = view, versions
