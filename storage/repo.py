"""`Store`: the one way the rest of MoRA Studio reads and writes the run store.

Every method is one unit of work in its own session and transaction, and returns frozen records
(`storage.records`), so callers never see a session. Writes that the event collector repeats when it replays a stream
(metric points, log lines, artifacts, stream positions, a terminal status) are idempotent.
"""
from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Optional, TypeVar, Union

from sqlalchemy import Table, Text, cast, delete, func, make_url, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session

from storage import sampling, settings
from storage.db import WRITE, create_store_engine, migrate
from storage.models import (
    ARTIFACT_KINDS,
    CHAT_ROLES,
    STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    Base,
    ChatMessage,
    ChatSession,
    Dataset,
    Evaluation,
    EvaluationAnswer,
    EvaluationExample,
    EvaluationScore,
    MetricPoint,
    Run,
    RunLog,
    StreamPosition,
    Vote,
    utcnow,
)
from storage.records import (
    ArtifactRecord,
    ChatMessageRecord,
    ChatSessionRecord,
    DatasetRecord,
    EvaluationAnswerRecord,
    EvaluationExampleRecord,
    EvaluationRecord,
    EvaluationScoreRecord,
    LogLineRecord,
    MetricPointRecord,
    RunRecord,
    RunsPage,
    SampledPointRecord,
    VoteCounts,
    VoteRecord,
)

PROGRESS_FIELDS = ("step", "max_steps", "last_loss", "last_eval_loss", "tokens_per_second", "tokens_seen",
                   "peak_memory_mb")
_INTEGER_PROGRESS_FIELDS = ("step", "max_steps", "tokens_seen")
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
_SHA256 = re.compile(r"[0-9a-f]{64}")

RUN_SORT_COLUMNS = ("created_at", "name", "status", "adapter", "r", "step", "last_loss", "last_eval_loss",
                    "tokens_per_second")
MAX_PAGE = 500
"""The most runs one page may hold: a page is what a screen shows, never the history."""

RecordT = TypeVar("RecordT")

__all__ = ["Store", "StorageError", "NotFound", "InvalidTransition", "STATUSES", "TERMINAL_STATUSES",
           "PROGRESS_FIELDS"]


class StorageError(ValueError):
    """Bad input or a request the store refuses; the message names the field or the record concerned."""


class NotFound(StorageError):
    """No record with that id."""


class InvalidTransition(StorageError):
    """A status change the run's current status does not allow, such as a late event after a cancel."""


# ---------------------------------------------------------------------------------------------------------------
# Input checks: each names the field, so the message is something a caller can act on.


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StorageError(f"{field} must be a non-empty string, got {value!r}")
    return value.strip()


def _optional_text(field: str, value: Any) -> Optional[str]:
    return None if value is None else _text(field, value)


def _integer(field: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StorageError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _like_escape(text: str) -> str:
    """`text` matched literally inside a LIKE pattern (escape character: backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _optional_integer(field: str, value: Any) -> Optional[int]:
    return None if value is None else _integer(field, value)


def _number(field: str, value: Any) -> Optional[float]:
    """A float, or None for a missing, NaN or infinite value (a diverged step is a gap, not an error)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StorageError(f"{field} must be a number, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _choice(field: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise StorageError(f"{field} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _json(field: str, value: Any) -> Any:
    """A JSON copy of `value`: tuples become lists, and later changes by the caller do not reach the store."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise StorageError(f"{field} must be JSON-serialisable (no NaN): {error}") from None


def _model(model: Any) -> str:
    """A model name or folder; empty means the default model, resolved by the worker."""
    if not isinstance(model, str):
        raise StorageError(f"model must be a string (empty for the default model), got {model!r}")
    return model.strip()


def _strings(field: str, values: Iterable[str]) -> list[str]:
    """The items of a list of strings; a lone string is refused, since iterating it would give its characters."""
    if isinstance(values, str):
        raise StorageError(f"{field} must be a list of strings, got the string {values!r}")
    return [_text(field, value) for value in values]


def _tags(tags: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(_strings("tags", tags)))


def _aware(field: str, value: Optional[datetime]) -> datetime:
    if value is None:
        return utcnow()
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise StorageError(f"{field} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(timezone.utc)


def _record(cls: type[RecordT], row: Base) -> RecordT:
    return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})


def _metric_row(run_id: str, index: int, point: Mapping[str, Any]) -> dict[str, Any]:
    where = f"points[{index}]"
    if not isinstance(point, Mapping):
        raise StorageError(f"{where} must be a mapping with name, step and value, got {point!r}")
    return {
        "run_id": run_id,
        "name": _text(f"{where}.name", point.get("name")),
        "step": _integer(f"{where}.step", point.get("step")),
        "value": _number(f"{where}.value", point.get("value")),
        "epoch": _number(f"{where}.epoch", point.get("epoch")),
        "tokens": _optional_integer(f"{where}.tokens", point.get("tokens")),
        "time": _number(f"{where}.time", point.get("time")),
    }


def _log_row(run_id: str, index: int, line: Mapping[str, Any]) -> dict[str, Any]:
    where = f"lines[{index}]"
    if not isinstance(line, Mapping):
        raise StorageError(f"{where} must be a mapping with seq and message, got {line!r}")
    message = line.get("message")
    if not isinstance(message, str):
        raise StorageError(f"{where}.message must be a string, got {message!r}")
    return {
        "run_id": run_id,
        "seq": _integer(f"{where}.seq", line.get("seq")),
        "time": _number(f"{where}.time", line.get("time")),
        "level": _text(f"{where}.level", line.get("level", "info")),
        "message": message,
    }


def _unique_by(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """The first row per key, as the database keeps the first stored one (a batch may repeat an event)."""
    unique: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(tuple(row[key] for key in keys), row)
    return list(unique.values())


class Store:
    """The run store over one database (SQLite file by default, or PostgreSQL).

    Opening migrates the schema to the newest revision. One `Store` may be shared by threads, and several `Store`s,
    in threads or processes, may share one database. Writes about a missing run, dataset or chat raise `NotFound`;
    reads of a missing run's points, logs or artifacts return nothing, so a chart redrawn while a run is deleted
    shows an empty curve instead of an error.
    """

    def __init__(self, url: Optional[str] = None) -> None:
        """Open (and migrate) the database at `url`; None means MORA_DB_URL or the SQLite file in MORA_DATA_DIR."""
        url = url or settings.db_url()
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError as error:
            raise StorageError(f"url: {error}") from None
        if backend not in _INSERTS:
            raise StorageError(f"url: the store supports sqlite and postgresql, not {backend!r}")
        self._engine = create_store_engine(url)
        try:
            migrate(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self._write_engine = self._engine.execution_options(**WRITE)
        self._insert = _INSERTS[backend]

    @property
    def url(self) -> str:
        """The database URL, password hidden: safe to log or show."""
        return self._engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        """Close every pooled connection (a later call opens new ones)."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _unit(self, write: bool = False) -> Iterator[Session]:
        """One session, one transaction: committed at the end, rolled back on an exception."""
        with Session(self._write_engine if write else self._engine) as session, session.begin():
            yield session

    @staticmethod
    def _get(session: Session, model: type[Base], key: Union[int, str], what: str, lock: bool = False) -> Any:
        row = session.get(model, key, with_for_update=lock)
        if row is None:
            raise NotFound(f"{what} {key!r} not found")
        return row

    # -- datasets -----------------------------------------------------------------------------------------------

    def add_dataset(self, *, name: str, path: str, original_filename: str, sha256: str, file_format: str,
                    schema: str, rows: int, columns: Sequence[str], preview: Sequence[Mapping[str, Any]],
                    size_bytes: int) -> DatasetRecord:
        """Record an uploaded file once it is copied under MORA_DATA_DIR/datasets (the store keeps no bytes)."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise StorageError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        dataset = Dataset(
            name=_text("name", name), path=_text("path", path),
            original_filename=_text("original_filename", original_filename), sha256=sha256,
            file_format=_text("file_format", file_format), schema=_text("schema", schema),
            rows=_integer("rows", rows), columns=_strings("columns", columns),
            preview=_json("preview", list(preview)), size_bytes=_integer("size_bytes", size_bytes),
        )
        with self._unit(write=True) as session:
            session.add(dataset)
            session.flush()
            return _record(DatasetRecord, dataset)

    def get_dataset(self, dataset_id: int) -> DatasetRecord:
        with self._unit() as session:
            return _record(DatasetRecord, self._get(session, Dataset, dataset_id, "dataset"))

    def find_dataset_by_hash(self, sha256: str) -> Optional[DatasetRecord]:
        """The earliest dataset with these bytes, so an upload of a known file can reuse it instead of copying."""
        with self._unit() as session:
            dataset = session.scalars(
                select(Dataset).where(Dataset.sha256 == sha256).order_by(Dataset.id).limit(1)).first()
            return None if dataset is None else _record(DatasetRecord, dataset)

    def list_datasets(self) -> list[DatasetRecord]:
        """Newest first."""
        with self._unit() as session:
            return [_record(DatasetRecord, dataset)
                    for dataset in session.scalars(select(Dataset).order_by(Dataset.id.desc()))]

    def delete_dataset(self, dataset_id: int) -> DatasetRecord:
        """Forget a dataset (its runs keep their config, with dataset_id set to None) and return what it was, so the
        caller can remove the file: the store never touches files."""
        with self._unit(write=True) as session:
            dataset = self._get(session, Dataset, dataset_id, "dataset")
            record = _record(DatasetRecord, dataset)
            session.execute(delete(Dataset).where(Dataset.id == dataset_id))
            return record

    # -- runs -----------------------------------------------------------------------------------------------------

    def create_run(self, config: Mapping[str, Any], *, name: str, model: str, adapter: str, r: int,
                   variant: Optional[str] = None, dataset_id: Optional[int] = None, tags: Iterable[str] = (),
                   group_name: Optional[str] = None, parent_id: Optional[str] = None,
                   run_dir: Optional[str] = None) -> RunRecord:
        """Record a new run as `queued`, before its task is sent, so the task only ever carries the run id."""
        if not isinstance(config, Mapping):
            raise StorageError(f"config must be a mapping, got {type(config).__name__}")
        run = Run(
            id=secrets.token_hex(6), name=_text("name", name), tags=_tags(tags),
            group_name=_optional_text("group_name", group_name), config=_json("config", dict(config)),
            model=_model(model), adapter=_text("adapter", adapter), r=_integer("r", r),
            variant=_optional_text("variant", variant), dataset_id=_optional_integer("dataset_id", dataset_id),
            status="queued", status_message="", parent_id=_optional_text("parent_id", parent_id),
            run_dir=_optional_text("run_dir", run_dir), step=0, cancel_requested=False,
        )
        with self._unit(write=True) as session:
            if dataset_id is not None:
                self._get(session, Dataset, dataset_id, "dataset")
            if parent_id is not None:
                self._get(session, Run, parent_id, "parent run")
            session.add(run)
            session.flush()
            return _record(RunRecord, run)

    def get_run(self, run_id: str) -> RunRecord:
        with self._unit() as session:
            return _record(RunRecord, self._get(session, Run, run_id, "run"))

    def list_runs(self, status: Optional[str] = None, group_name: Optional[str] = None,
                  limit: Optional[int] = None) -> list[RunRecord]:
        """Newest first, optionally only one status and/or one group."""
        query = select(Run).order_by(Run.created_at.desc(), Run.id.desc())
        if status is not None:
            query = query.where(Run.status == _choice("status", status, STATUSES))
        if group_name is not None:
            query = query.where(Run.group_name == group_name)
        if limit is not None:
            query = query.limit(_integer("limit", limit, minimum=1))
        with self._unit() as session:
            return [_record(RunRecord, run) for run in session.scalars(query)]

    def runs_by_id(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The runs with these ids, in the order asked, leaving out ids that no longer exist (one query)."""
        run_ids = list(dict.fromkeys(_strings("run_ids", run_ids)))
        if not run_ids:
            return []
        with self._unit() as session:
            found = {run.id: _record(RunRecord, run) for run in session.scalars(select(Run).where(Run.id.in_(run_ids)))}
        return [found[run_id] for run_id in run_ids if run_id in found]

    def runs_page(self, *, status: Optional[str] = None, adapter: Optional[str] = None, tag: Optional[str] = None,
                  group_name: Optional[str] = None, search: Optional[str] = None, sort: str = "created_at",
                  descending: bool = True, offset: int = 0, limit: int = 25) -> RunsPage:
        """The runs table's visible page, filtered, sorted and cut in the query, so its cost follows the page and
        not the history. `search` matches names case-insensitively; `tag` one tag exactly. Empty values filter
        nothing. Runs with no value in the sort column come last in both directions."""
        column = _choice("sort", sort, RUN_SORT_COLUMNS)
        offset = _integer("offset", offset)
        limit = _integer("limit", limit, minimum=1)
        if limit > MAX_PAGE:
            raise StorageError(f"limit must be at most {MAX_PAGE} runs a page, got {limit}")
        where = []
        if status:
            where.append(Run.status == _choice("status", status, STATUSES))
        if adapter:
            where.append(Run.adapter == adapter)
        if group_name:
            where.append(Run.group_name == group_name)
        if tag:
            # the tags column holds JSON text such as ["a", "b"]; a tag matches as its JSON string, quotes included
            where.append(cast(Run.tags, Text).like(f"%{_like_escape(json.dumps(tag))}%", escape="\\"))
        if search and search.strip():
            where.append(func.lower(Run.name).like(f"%{_like_escape(search.strip().lower())}%", escape="\\"))
        key = getattr(Run, column)
        order = [key.is_(None), key.desc() if descending else key.asc(),
                 Run.id.desc() if descending else Run.id.asc()]
        with self._unit() as session:
            total = session.scalar(select(func.count()).select_from(Run).where(*where))
            rows = session.scalars(select(Run).where(*where).order_by(*order).offset(offset).limit(limit))
            return RunsPage(runs=[_record(RunRecord, run) for run in rows], total=total)

    def runs_with_status(self, statuses: Iterable[str]) -> list[RunRecord]:
        """Oldest first: what the collector walks after a restart to find runs still queued or running."""
        wanted = [_choice("statuses", status, STATUSES) for status in _strings("statuses", statuses)]
        with self._unit() as session:
            runs = session.scalars(select(Run).where(Run.status.in_(wanted)).order_by(Run.created_at, Run.id))
            return [_record(RunRecord, run) for run in runs]

    def set_status(self, run_id: str, status: str, message: str = "", worker: Optional[str] = None,
                   error: Optional[str] = None, *, force: bool = False, at: Optional[datetime] = None) -> RunRecord:
        """Move a run to `status`, stamping started_at on `running` and finished_at on a terminal status.

        A terminal status (succeeded, failed, cancelled) is final: the same status again is a no-op (a replayed
        event), and any other raises `InvalidTransition`, so a late `running` event cannot resurrect a cancelled run.
        `force=True` overrides that, for a deliberate retry. `at` is when it happened (the event's time), default now.
        """
        _choice("status", status, STATUSES)
        if not isinstance(message, str):
            raise StorageError(f"message must be a string, got {message!r}")
        when = _aware("at", at)
        with self._unit(write=True) as session:
            run = self._get(session, Run, run_id, "run", lock=True)
            current = run.status
            if current in TERMINAL_STATUSES and not force:
                if status == current:
                    return _record(RunRecord, run)
                raise InvalidTransition(
                    f"run {run_id!r} is {current}; refusing to set it {status} (force=True overrides)")
            if status == "running" and (current != "running" or run.started_at is None):
                run.started_at = when
            if status in TERMINAL_STATUSES:
                run.finished_at = when
            else:
                run.finished_at = None
                if current in TERMINAL_STATUSES:
                    run.cancel_requested = False
            run.status, run.status_message = status, message
            if worker is not None:
                run.worker = _text("worker", worker)
            if error is not None:
                run.error = error
            session.flush()
            return _record(RunRecord, run)

    def update_progress(self, run_id: str, **progress: Any) -> RunRecord:
        """Update the run's live progress columns (see PROGRESS_FIELDS) as step events arrive.

        A None value leaves that column as it was, so a collector can pass an event's fields straight through;
        NaN or infinity is stored as unknown.
        """
        unknown = sorted(set(progress) - set(PROGRESS_FIELDS))
        if unknown:
            raise StorageError(f"unknown progress field(s) {', '.join(unknown)}; known: {', '.join(PROGRESS_FIELDS)}")
        return self._update_run(run_id, **{
            key: (_integer(key, value) if key in _INTEGER_PROGRESS_FIELDS else _number(key, value))
            for key, value in progress.items() if value is not None})

    def request_cancel(self, run_id: str) -> RunRecord:
        """Flag the run; its worker sees the flag between steps, saves and stops. A finished run is left as is."""
        with self._unit(write=True) as session:
            run = self._get(session, Run, run_id, "run")
            if run.status not in TERMINAL_STATUSES:
                run.cancel_requested = True
            session.flush()
            return _record(RunRecord, run)

    def rename_run(self, run_id: str, name: str) -> RunRecord:
        return self._update_run(run_id, name=_text("name", name))

    def set_tags(self, run_id: str, tags: Iterable[str]) -> RunRecord:
        """Replace the run's tags (blank-free, duplicates dropped, order kept)."""
        return self._update_run(run_id, tags=_tags(tags))

    def set_output(self, run_id: str, run_dir: Optional[str] = None, output_dir: Optional[str] = None,
                   output_kind: Optional[str] = None) -> RunRecord:
        """Record where the run writes; None leaves a value as it was."""
        values = {"run_dir": _optional_text("run_dir", run_dir),
                  "output_dir": _optional_text("output_dir", output_dir),
                  "output_kind": _optional_text("output_kind", output_kind)}
        return self._update_run(run_id, **{key: value for key, value in values.items() if value is not None})

    def _update_run(self, run_id: str, **values: Any) -> RunRecord:
        with self._unit(write=True) as session:
            run = self._get(session, Run, run_id, "run")
            for key, value in values.items():
                setattr(run, key, value)
            session.flush()
            return _record(RunRecord, run)

    def delete_run(self, run_id: str) -> None:
        """Delete a run with its metric points, logs, artifacts and votes; runs that resume it stay, unparented.

        The files in its run folder are the caller's to remove.
        """
        with self._unit(write=True) as session:
            self._get(session, Run, run_id, "run")
            session.execute(delete(Run).where(Run.id == run_id))

    # -- metric points --------------------------------------------------------------------------------------------

    def add_metric_points(self, run_id: str, points: Iterable[Mapping[str, Any]]) -> int:
        """Store points ({name, step, value, epoch?, tokens?, time?}) and return how many were new.

        Idempotent: a (run, name, step) already stored is skipped by the database itself (INSERT ... ON CONFLICT DO
        NOTHING), so replaying a stream, or two collectors racing, never duplicates a point or fails.
        """
        rows = _unique_by([_metric_row(run_id, index, point) for index, point in enumerate(points)], "name", "step")
        table: Table = MetricPoint.__table__
        statement = (self._insert(table).on_conflict_do_nothing(index_elements=["run_id", "name", "step"])
                     .returning(table.c.id))
        return self._insert_rows(run_id, statement, rows)

    def _insert_rows(self, run_id: str, statement: Any, rows: list[dict[str, Any]]) -> int:
        with self._unit(write=True) as session:
            self._get(session, Run, run_id, "run")
            if not rows:
                return 0
            return len(session.execute(statement, rows).all())

    def metric_series(self, run_ids: Iterable[str], names: Optional[Iterable[str]] = None
                      ) -> dict[str, dict[str, list[MetricPointRecord]]]:
        """{run_id: {name: points ordered by step}} for several runs in one query: what a chart redraw needs.

        Every requested run id is a key, and with `names` given every requested name is too (possibly with an
        empty list), so a caller can index without checking.
        """
        run_ids = list(dict.fromkeys(_strings("run_ids", run_ids)))
        wanted = None if names is None else list(dict.fromkeys(_strings("names", names)))
        series: dict[str, dict[str, list[MetricPointRecord]]] = {
            run_id: {name: [] for name in wanted or ()} for run_id in run_ids}
        if not run_ids or wanted == []:
            return series
        query = (select(MetricPoint).where(MetricPoint.run_id.in_(run_ids))
                 .order_by(MetricPoint.run_id, MetricPoint.name, MetricPoint.step))
        if wanted is not None:
            query = query.where(MetricPoint.name.in_(wanted))
        with self._unit() as session:
            for point in session.scalars(query):
                series[point.run_id].setdefault(point.name, []).append(_record(MetricPointRecord, point))
        return series

    def sampled_series(self, run_ids: Iterable[str], names: Optional[Iterable[str]] = None,
                       buckets: int = sampling.DEFAULT_BUCKETS, step_range: Optional[tuple[int, int]] = None
                       ) -> dict[str, dict[str, list[SampledPointRecord]]]:
        """Like `metric_series`, but at most `buckets` points a series, chosen in the query (see `storage.sampling`):
        what a chart draws, whatever a run logged. `step_range` (first, last) samples only that range, for a zoom."""
        run_ids = list(dict.fromkeys(_strings("run_ids", run_ids)))
        wanted = None if names is None else list(dict.fromkeys(_strings("names", names)))
        sampling.check_buckets(buckets)
        if step_range is not None:
            step_range = (_integer("step_range", step_range[0], -1), _integer("step_range", step_range[1], -1))
        series: dict[str, dict[str, list[SampledPointRecord]]] = {
            run_id: {name: [] for name in wanted or ()} for run_id in run_ids}
        if not run_ids or wanted == []:
            return series
        with self._unit() as session:
            for row in session.execute(sampling.sampled_query(run_ids, wanted, buckets, step_range)):
                series[row.run_id].setdefault(row.name, []).append(SampledPointRecord(
                    run_id=row.run_id, name=row.name, step=row.step, value=row.value, epoch=row.epoch,
                    tokens=row.tokens, time=row.time, low=row.low, high=row.high, count=row.count))
        return series

    def latest_point_ids(self, run_ids: Iterable[str]) -> dict[str, int]:
        """The id of each run's newest stored point (0 for none): ids only grow, so a chart whose runs' ids are
        unchanged since its last draw has nothing new to draw, and this index-only read is all a quiet tick costs."""
        run_ids = list(dict.fromkeys(_strings("run_ids", run_ids)))
        latest = dict.fromkeys(run_ids, 0)
        if not run_ids:
            return latest
        query = (select(MetricPoint.run_id, func.max(MetricPoint.id)).where(MetricPoint.run_id.in_(run_ids))
                 .group_by(MetricPoint.run_id))
        with self._unit() as session:
            latest.update({run_id: newest for run_id, newest in session.execute(query)})
        return latest

    def metric_count(self, run_id: str, name: Optional[str] = None) -> int:
        query = select(func.count()).select_from(MetricPoint).where(MetricPoint.run_id == run_id)
        if name is not None:
            query = query.where(MetricPoint.name == name)
        with self._unit() as session:
            return session.scalar(query)

    # -- logs -----------------------------------------------------------------------------------------------------

    def add_log_lines(self, run_id: str, lines: Iterable[Mapping[str, Any]]) -> int:
        """Store log lines ({seq, message, level?, time?}); idempotent on (run, seq) like `add_metric_points`."""
        rows = _unique_by([_log_row(run_id, index, line) for index, line in enumerate(lines)], "seq")
        table: Table = RunLog.__table__
        statement = self._insert(table).on_conflict_do_nothing(index_elements=["run_id", "seq"]).returning(table.c.id)
        return self._insert_rows(run_id, statement, rows)

    def run_logs(self, run_id: str, after_seq: int = -1, limit: Optional[int] = None) -> list[LogLineRecord]:
        """Lines with seq > after_seq in order: a log view polls with the last seq it shows."""
        query = (select(RunLog).where(RunLog.run_id == run_id, RunLog.seq > _integer("after_seq", after_seq, -1))
                 .order_by(RunLog.seq))
        if limit is not None:
            query = query.limit(_integer("limit", limit, minimum=1))
        with self._unit() as session:
            return [_record(LogLineRecord, line) for line in session.scalars(query)]

    # -- artifacts ------------------------------------------------------------------------------------------------

    def put_artifact(self, run_id: str, kind: str, *, path: str, size_bytes: Optional[int] = None,
                     trainable_parameters: Optional[int] = None, r_hat: Any = None, effective_rank: Any = None,
                     layers: Any = None) -> ArtifactRecord:
        """Record the run's adapter or model folder; a second call for the same (run, kind) replaces the first."""
        values = {
            "run_id": run_id, "kind": _choice("kind", kind, ARTIFACT_KINDS), "path": _text("path", path),
            "size_bytes": _optional_integer("size_bytes", size_bytes),
            "trainable_parameters": _optional_integer("trainable_parameters", trainable_parameters),
            "r_hat": _json("r_hat", r_hat), "effective_rank": _json("effective_rank", effective_rank),
            "layers": _json("layers", layers), "created_at": utcnow(),
        }
        table: Table = Artifact.__table__
        statement = self._insert(table).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=["run_id", "kind"],
            set_={key: statement.excluded[key] for key in values if key not in ("run_id", "kind")})
        with self._unit(write=True) as session:
            self._get(session, Run, run_id, "run")
            session.execute(statement)
            artifact = session.scalars(select(Artifact).where(Artifact.run_id == run_id, Artifact.kind == kind)).one()
            return _record(ArtifactRecord, artifact)

    def get_artifacts(self, run_id: str) -> list[ArtifactRecord]:
        with self._unit() as session:
            artifacts = session.scalars(select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.kind))
            return [_record(ArtifactRecord, artifact) for artifact in artifacts]

    # -- chats and votes ------------------------------------------------------------------------------------------

    def create_chat(self, *, title: str, base_model: str, adapters: Iterable[Mapping[str, Any]] = (),
                    settings: Optional[Mapping[str, Any]] = None) -> ChatSessionRecord:
        """Start a chat in which each adapter ({label, run_id}) answers side by side on the same base model;
        a row with run_id None is the base model answering alone."""
        columns = []
        for index, adapter in enumerate(adapters):
            if not isinstance(adapter, Mapping):
                raise StorageError(f"adapters[{index}] must be a mapping with label and run_id, got {adapter!r}")
            run_id = adapter.get("run_id")
            columns.append({**_json(f"adapters[{index}]", dict(adapter)),
                            "label": _text(f"adapters[{index}].label", adapter.get("label")),
                            "run_id": None if run_id is None else _text(f"adapters[{index}].run_id", run_id)})
        chat = ChatSession(title=_text("title", title), base_model=_text("base_model", base_model), adapters=columns,
                           settings=_json("settings", dict(settings or {})))
        with self._unit(write=True) as session:
            for column in columns:
                if column["run_id"] is not None:
                    self._get(session, Run, column["run_id"], "run")
            session.add(chat)
            session.flush()
            return _record(ChatSessionRecord, chat)

    def get_chat(self, session_id: int) -> ChatSessionRecord:
        with self._unit() as session:
            return _record(ChatSessionRecord, self._get(session, ChatSession, session_id, "chat session"))

    def list_chats(self) -> list[ChatSessionRecord]:
        """Newest first."""
        with self._unit() as session:
            return [_record(ChatSessionRecord, chat)
                    for chat in session.scalars(select(ChatSession).order_by(ChatSession.id.desc()))]

    def add_chat_message(self, session_id: int, *, turn: int, role: str, content: str, run_id: Optional[str] = None,
                         label: Optional[str] = None) -> ChatMessageRecord:
        """Append a message; an assistant's answer names the run (adapter) that wrote it and its column label."""
        if not isinstance(content, str):
            raise StorageError(f"content must be a string, got {content!r}")
        message = ChatMessage(session_id=session_id, turn=_integer("turn", turn),
                              role=_choice("role", role, CHAT_ROLES), content=content, run_id=run_id,
                              label=_optional_text("label", label))
        with self._unit(write=True) as session:
            self._get(session, ChatSession, session_id, "chat session")
            if run_id is not None:
                self._get(session, Run, run_id, "run")
            session.add(message)
            session.flush()
            return _record(ChatMessageRecord, message)

    def chat_messages(self, session_id: int) -> list[ChatMessageRecord]:
        """In conversation order: by turn, then as written."""
        query = (select(ChatMessage).where(ChatMessage.session_id == session_id)
                 .order_by(ChatMessage.turn, ChatMessage.id))
        with self._unit() as session:
            return [_record(ChatMessageRecord, message) for message in session.scalars(query)]

    def add_vote(self, session_id: int, *, turn: int, winner_run_id: str, loser_run_id: str) -> VoteRecord:
        """Record that the user preferred one run's answer to another's at one turn of a chat."""
        if winner_run_id == loser_run_id:
            raise StorageError(f"winner_run_id and loser_run_id must differ, both are {winner_run_id!r}")
        vote = Vote(session_id=session_id, turn=_integer("turn", turn), winner_run_id=winner_run_id,
                    loser_run_id=loser_run_id)
        with self._unit(write=True) as session:
            self._get(session, ChatSession, session_id, "chat session")
            self._get(session, Run, winner_run_id, "winner run")
            self._get(session, Run, loser_run_id, "loser run")
            session.add(vote)
            session.flush()
            return _record(VoteRecord, vote)

    def votes_for_run(self, run_id: str) -> VoteCounts:
        """How often the run's answers won and lost A/B votes, over every chat."""
        query = select(func.count().filter(Vote.winner_run_id == run_id),
                       func.count().filter(Vote.loser_run_id == run_id)
                       ).where(or_(Vote.winner_run_id == run_id, Vote.loser_run_id == run_id))
        with self._unit() as session:
            wins, losses = session.execute(query).one()
        return VoteCounts(run_id=run_id, wins=wins, losses=losses)

    # -- evaluations ----------------------------------------------------------------------------------------------

    def create_evaluation(self, *, name: str, base_model: str, rows: Sequence[Mapping[str, Any]],
                          source: Mapping[str, Any], settings: Optional[Mapping[str, Any]] = None
                          ) -> EvaluationRecord:
        """Record an evaluation as `queued` before its job is sent: `rows` ({label, run_id or None for the base
        model alone}) answer the prompts of `source` side by side."""
        columns = []
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise StorageError(f"rows[{index}] must be a mapping with label and run_id, got {row!r}")
            run_id = row.get("run_id")
            columns.append({"label": _text(f"rows[{index}].label", row.get("label")),
                            "run_id": None if run_id is None else _text(f"rows[{index}].run_id", run_id)})
        if not columns:
            raise StorageError("rows: an evaluation needs at least one row (a run or the base model)")
        if not isinstance(source, Mapping):
            raise StorageError(f"source must be a mapping, got {type(source).__name__}")
        evaluation = Evaluation(
            id=secrets.token_hex(6), name=_text("name", name), base_model=_model(base_model), rows=columns,
            source=_json("source", dict(source)), settings=_json("settings", dict(settings or {})),
            status="queued", status_message="", examples_total=0, examples_done=0)
        with self._unit(write=True) as session:
            for column in columns:
                if column["run_id"] is not None:
                    self._get(session, Run, column["run_id"], "run")
            session.add(evaluation)
            session.flush()
            return _record(EvaluationRecord, evaluation)

    def get_evaluation(self, evaluation_id: str) -> EvaluationRecord:
        with self._unit() as session:
            return _record(EvaluationRecord, self._get(session, Evaluation, evaluation_id, "evaluation"))

    def list_evaluations(self, limit: int = 100) -> list[EvaluationRecord]:
        """Newest first, at most `limit`."""
        query = (select(Evaluation).order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
                 .limit(_integer("limit", limit, minimum=1)))
        with self._unit() as session:
            return [_record(EvaluationRecord, evaluation) for evaluation in session.scalars(query)]

    def set_evaluation_status(self, evaluation_id: str, status: str, message: str = "", *,
                              worker: Optional[str] = None, examples_total: Optional[int] = None,
                              at: Optional[datetime] = None) -> EvaluationRecord:
        """Move an evaluation to `status` as `set_status` moves a run: a terminal status is final (the same one again
        is a no-op, another raises `InvalidTransition`)."""
        _choice("status", status, STATUSES)
        if not isinstance(message, str):
            raise StorageError(f"message must be a string, got {message!r}")
        when = _aware("at", at)
        with self._unit(write=True) as session:
            evaluation = self._get(session, Evaluation, evaluation_id, "evaluation", lock=True)
            if evaluation.status in TERMINAL_STATUSES:
                if status == evaluation.status:
                    return _record(EvaluationRecord, evaluation)
                raise InvalidTransition(f"evaluation {evaluation_id!r} is {evaluation.status}; refusing to set it "
                                        f"{status}")
            if status == "running" and evaluation.started_at is None:
                evaluation.started_at = when
            if status in TERMINAL_STATUSES:
                evaluation.finished_at = when
            evaluation.status, evaluation.status_message = status, message
            if status == "failed":
                evaluation.error = message
            if worker is not None:
                evaluation.worker = _text("worker", worker)
            if examples_total is not None:
                evaluation.examples_total = _integer("examples_total", examples_total)
            session.flush()
            return _record(EvaluationRecord, evaluation)

    def add_evaluation_examples(self, evaluation_id: str, examples: Iterable[Mapping[str, Any]]) -> int:
        """Store examples ({example, source_row, prompt, reference}); idempotent on (evaluation, example)."""
        rows = []
        for index, item in enumerate(examples):
            where = f"examples[{index}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("reference"), str):
                raise StorageError(f"{where} must be a mapping with example, source_row, prompt and a reference "
                                   f"string, got {item!r}")
            rows.append({"evaluation_id": evaluation_id, "example": _integer(f"{where}.example", item.get("example")),
                         "source_row": _integer(f"{where}.source_row", item.get("source_row")),
                         "prompt": _json(f"{where}.prompt", list(item.get("prompt") or [])),
                         "reference": item["reference"], "judgements": None})
        table: Table = EvaluationExample.__table__
        statement = (self._insert(table).on_conflict_do_nothing(index_elements=["evaluation_id", "example"])
                     .returning(table.c.id))
        return self._insert_evaluation_rows(evaluation_id, statement, _unique_by(rows, "example"))

    def add_evaluation_answers(self, evaluation_id: str, answers: Iterable[Mapping[str, Any]],
                               examples_done: Optional[int] = None) -> int:
        """Store answers ({example, row, answer, scores}); idempotent on (evaluation, example, row). `examples_done`
        is the evaluation's progress after them (it only grows)."""
        rows = []
        for index, item in enumerate(answers):
            where = f"answers[{index}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("answer"), str):
                raise StorageError(f"{where} must be a mapping with example, row and an answer string, got {item!r}")
            scores = item.get("scores") or {}
            if not isinstance(scores, Mapping):
                raise StorageError(f"{where}.scores must be a mapping of metric names to numbers, got {scores!r}")
            rows.append({"evaluation_id": evaluation_id, "example": _integer(f"{where}.example", item.get("example")),
                         "row": _integer(f"{where}.row", item.get("row")), "answer": item["answer"],
                         "scores": {_text(f"{where}.scores", name): _number(f"{where}.scores.{name}", value)
                                    for name, value in scores.items()},
                         "judge_score": None, "judge_reason": None})
        table: Table = EvaluationAnswer.__table__
        statement = (self._insert(table).on_conflict_do_nothing(index_elements=["evaluation_id", "example", "row"])
                     .returning(table.c.id))
        added = self._insert_evaluation_rows(evaluation_id, statement, _unique_by(rows, "example", "row"))
        if examples_done is not None:
            done = _integer("examples_done", examples_done)
            with self._unit(write=True) as session:
                evaluation = self._get(session, Evaluation, evaluation_id, "evaluation")
                evaluation.examples_done = max(evaluation.examples_done, done)
        return added

    def _insert_evaluation_rows(self, evaluation_id: str, statement: Any, rows: list[dict[str, Any]]) -> int:
        with self._unit(write=True) as session:
            self._get(session, Evaluation, evaluation_id, "evaluation")
            if not rows:
                return 0
            return len(session.execute(statement, rows).all())

    def put_evaluation_scores(self, evaluation_id: str, scores: Iterable[Mapping[str, Any]]) -> None:
        """Store each row's score per metric ({row, metric, value, run_id?, step?}); a second score for the same
        (evaluation, row, metric) replaces the first."""
        rows = []
        for index, item in enumerate(scores):
            where = f"scores[{index}]"
            if not isinstance(item, Mapping):
                raise StorageError(f"{where} must be a mapping with row, metric and value, got {item!r}")
            rows.append({"evaluation_id": evaluation_id, "row": _integer(f"{where}.row", item.get("row")),
                         "run_id": _optional_text(f"{where}.run_id", item.get("run_id")),
                         "step": _optional_integer(f"{where}.step", item.get("step")),
                         "metric": _text(f"{where}.metric", item.get("metric")),
                         "value": _number(f"{where}.value", item.get("value"))})
        rows = _unique_by(rows, "row", "metric")
        table: Table = EvaluationScore.__table__
        statement = self._insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=["evaluation_id", "row", "metric"],
            set_={key: statement.excluded[key] for key in ("run_id", "step", "value")})
        with self._unit(write=True) as session:
            self._get(session, Evaluation, evaluation_id, "evaluation")
            known = {run_id for run_id in session.scalars(
                select(Run.id).where(Run.id.in_(sorted({row["run_id"] for row in rows if row["run_id"]}))))}
            for row in rows:  # a run deleted meanwhile: its score stays, unattached, like its answers
                if row["run_id"] not in known:
                    row["run_id"] = None
            if rows:
                session.execute(statement, rows)

    def judge_evaluation(self, evaluation_id: str, answers: Iterable[Mapping[str, Any]] = (),
                         examples: Iterable[Mapping[str, Any]] = ()) -> None:
        """Store a judge's verdicts: pointwise on answers ({example, row, score, reason}), pairwise on examples
        ({example, judgements}); each replaces what was there."""
        with self._unit(write=True) as session:
            self._get(session, Evaluation, evaluation_id, "evaluation")
            for index, item in enumerate(answers):
                where = f"answers[{index}]"
                reason = item.get("reason")
                if reason is not None and not isinstance(reason, str):
                    raise StorageError(f"{where}.reason must be a string, got {reason!r}")
                answer = session.scalars(select(EvaluationAnswer).where(
                    EvaluationAnswer.evaluation_id == evaluation_id,
                    EvaluationAnswer.example == _integer(f"{where}.example", item.get("example")),
                    EvaluationAnswer.row == _integer(f"{where}.row", item.get("row")))).first()
                if answer is None:
                    raise NotFound(f"{where}: no answer of row {item['row']} to example {item['example']}")
                answer.judge_score, answer.judge_reason = _number(f"{where}.score", item.get("score")), reason
            for index, item in enumerate(examples):
                where = f"examples[{index}]"
                example = session.scalars(select(EvaluationExample).where(
                    EvaluationExample.evaluation_id == evaluation_id,
                    EvaluationExample.example == _integer(f"{where}.example", item.get("example")))).first()
                if example is None:
                    raise NotFound(f"{where}: no example {item['example']}")
                example.judgements = _json(f"{where}.judgements", item.get("judgements"))

    def evaluation_examples(self, evaluation_id: str) -> list[EvaluationExampleRecord]:
        """In example order."""
        query = (select(EvaluationExample).where(EvaluationExample.evaluation_id == evaluation_id)
                 .order_by(EvaluationExample.example))
        with self._unit() as session:
            return [_record(EvaluationExampleRecord, example) for example in session.scalars(query)]

    def evaluation_answers(self, evaluation_id: str) -> list[EvaluationAnswerRecord]:
        """By example, then row."""
        query = (select(EvaluationAnswer).where(EvaluationAnswer.evaluation_id == evaluation_id)
                 .order_by(EvaluationAnswer.example, EvaluationAnswer.row))
        with self._unit() as session:
            return [_record(EvaluationAnswerRecord, answer) for answer in session.scalars(query)]

    def evaluation_scores(self, evaluation_id: str) -> list[EvaluationScoreRecord]:
        """By row, then metric."""
        query = (select(EvaluationScore).where(EvaluationScore.evaluation_id == evaluation_id)
                 .order_by(EvaluationScore.row, EvaluationScore.metric))
        with self._unit() as session:
            return [_record(EvaluationScoreRecord, score) for score in session.scalars(query)]

    def run_scores(self, run_ids: Iterable[str], metric: str) -> list[EvaluationScoreRecord]:
        """Every evaluation's score of these runs on `metric`, ordered by run and step (one indexed query)."""
        run_ids = list(dict.fromkeys(_strings("run_ids", run_ids)))
        if not run_ids:
            return []
        query = (select(EvaluationScore).where(EvaluationScore.run_id.in_(run_ids),
                                               EvaluationScore.metric == _text("metric", metric))
                 .order_by(EvaluationScore.run_id, EvaluationScore.step))
        with self._unit() as session:
            return [_record(EvaluationScoreRecord, score) for score in session.scalars(query)]

    def delete_evaluation(self, evaluation_id: str) -> None:
        """Delete an evaluation with its examples, answers and scores."""
        with self._unit(write=True) as session:
            self._get(session, Evaluation, evaluation_id, "evaluation")
            session.execute(delete(Evaluation).where(Evaluation.id == evaluation_id))

    # -- stream positions -----------------------------------------------------------------------------------------

    def get_stream_position(self, stream: str) -> Optional[str]:
        """The last event id the collector stored from `stream`, or None to read it from the start."""
        with self._unit() as session:
            position = session.get(StreamPosition, stream)
            return None if position is None else position.last_id

    def set_stream_position(self, stream: str, last_id: str) -> None:
        values = {"stream": _text("stream", stream), "last_id": _text("last_id", last_id), "updated_at": utcnow()}
        statement = self._insert(StreamPosition.__table__).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=["stream"], set_={"last_id": statement.excluded.last_id,
                                             "updated_at": statement.excluded.updated_at})
        with self._unit(write=True) as session:
            session.execute(statement)
