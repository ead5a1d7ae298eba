"""The tables of the run store, as SQLAlchemy 2 typed models.

Only `storage.repo` touches these classes; callers get `storage.records` instead. Every schema change goes through a
new file in `storage/migrations/versions/`, and `tests/storage` checks that the migrations and these models agree.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.statuses import STATUSES, TERMINAL_STATUSES  # noqa: F401 (re-exported for the store)

ARTIFACT_KINDS = ("adapter", "model")
CHAT_ROLES = ("system", "user", "assistant")

# Fixed constraint names, so a later migration can drop or alter a constraint by name on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Autoincrementing 64-bit ids on PostgreSQL; SQLite autoincrements only a column declared exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in and out: SQLite drops the zone, so it is put back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _json(nullable: bool = False) -> JSON:
    # none_as_null: an absent value is SQL NULL, not the JSON text 'null'.
    return JSON(none_as_null=nullable)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    original_filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    file_format: Mapped[str] = mapped_column(String(32))
    schema: Mapped[str] = mapped_column(String(32))
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[list[str]] = mapped_column(_json())
    preview: Mapped[list[dict[str, Any]]] = mapped_column(_json())
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
        Index(None, "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    tags: Mapped[list[str]] = mapped_column(_json())
    group_name: Mapped[Optional[str]] = mapped_column(String(255), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(_json())
    model: Mapped[str] = mapped_column(String(255))
    adapter: Mapped[str] = mapped_column(String(32))
    r: Mapped[int] = mapped_column(Integer)
    variant: Mapped[Optional[str]] = mapped_column(String(64))
    dataset_id: Mapped[Optional[int]] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    status_message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[Optional[str]] = mapped_column(Text)
    worker: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    parent_id: Mapped[Optional[str]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    run_dir: Mapped[Optional[str]] = mapped_column(Text)
    output_dir: Mapped[Optional[str]] = mapped_column(Text)
    output_kind: Mapped[Optional[str]] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0)
    max_steps: Mapped[Optional[int]] = mapped_column(Integer)
    last_loss: Mapped[Optional[float]] = mapped_column(Float)
    last_eval_loss: Mapped[Optional[float]] = mapped_column(Float)
    tokens_per_second: Mapped[Optional[float]] = mapped_column(Float)
    tokens_seen: Mapped[Optional[int]] = mapped_column(BigInteger)
    peak_memory_mb: Mapped[Optional[float]] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(default=False)


class MetricPoint(Base):
    """One value of one named series at one step; `time` is the worker's clock (Unix seconds) when it was logged."""

    __tablename__ = "metric_points"
    # The unique constraint is also the (run_id, name, step) index that curve reads use; a second one would be
    # a duplicate that every insert pays for.
    __table_args__ = (UniqueConstraint("run_id", "name", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[Optional[float]] = mapped_column(Float)
    epoch: Mapped[Optional[float]] = mapped_column(Float)
    tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    time: Mapped[Optional[float]] = mapped_column(Float)


class RunLog(Base):
    __tablename__ = "run_logs"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[Optional[float]] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("run_id", "kind"),
        CheckConstraint("kind IN ('adapter', 'model')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[Optional[int]] = mapped_column(BigInteger)
    trainable_parameters: Mapped[Optional[int]] = mapped_column(BigInteger)
    r_hat: Mapped[Optional[Any]] = mapped_column(_json(nullable=True))
    effective_rank: Mapped[Optional[Any]] = mapped_column(_json(nullable=True))
    layers: Mapped[Optional[Any]] = mapped_column(_json(nullable=True))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(255))
    base_model: Mapped[str] = mapped_column(String(255))
    adapters: Mapped[list[dict[str, Any]]] = mapped_column(_json())
    settings: Mapped[dict[str, Any]] = mapped_column(_json())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (Index(None, "session_id", "turn"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    run_id: Mapped[Optional[str]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    label: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Vote(Base):
    """An A/B preference between two runs' answers to one chat turn; it goes when either run goes."""

    __tablename__ = "votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True)
    turn: Mapped[int] = mapped_column(Integer)
    winner_run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    loser_run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class StreamPosition(Base):
    """Where the event collector stopped reading a stream, so a restarted web process resumes there."""

    __tablename__ = "stream_positions"

    stream: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_id: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class Evaluation(Base):
    """One evaluation: a dataset's prompts answered by several rows (runs, or the base model alone) side by side."""

    __tablename__ = "evaluations"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
        Index(None, "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    base_model: Mapped[str] = mapped_column(String(255))
    rows: Mapped[list[dict[str, Any]]] = mapped_column(_json())
    source: Mapped[dict[str, Any]] = mapped_column(_json())
    settings: Mapped[dict[str, Any]] = mapped_column(_json())
    status: Mapped[str] = mapped_column(String(16), default="queued")
    status_message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[Optional[str]] = mapped_column(Text)
    worker: Mapped[Optional[str]] = mapped_column(String(255))
    examples_total: Mapped[int] = mapped_column(Integer, default=0)
    examples_done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)


class EvaluationExample(Base):
    """One prompt of an evaluation and its reference answer; `judgements` holds the pairwise judge's verdicts."""

    __tablename__ = "evaluation_examples"
    __table_args__ = (UniqueConstraint("evaluation_id", "example"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    example: Mapped[int] = mapped_column(Integer)
    source_row: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(_json())
    reference: Mapped[str] = mapped_column(Text)
    judgements: Mapped[Optional[Any]] = mapped_column(_json(nullable=True))


class EvaluationAnswer(Base):
    """One row's answer to one example, with its scores (metric name → value) and the pointwise judge's verdict."""

    __tablename__ = "evaluation_answers"
    __table_args__ = (UniqueConstraint("evaluation_id", "example", "row"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    example: Mapped[int] = mapped_column(Integer)
    row: Mapped[int] = mapped_column(Integer)
    answer: Mapped[str] = mapped_column(Text)
    scores: Mapped[dict[str, Any]] = mapped_column(_json())
    judge_score: Mapped[Optional[float]] = mapped_column(Float)
    judge_reason: Mapped[Optional[str]] = mapped_column(Text)


class EvaluationScore(Base):
    """One row's score on one metric over the whole evaluation; `step` is the row's run's step when it was scored."""

    __tablename__ = "evaluation_scores"
    __table_args__ = (UniqueConstraint("evaluation_id", "row", "metric"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    row: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[Optional[str]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    step: Mapped[Optional[int]] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[Optional[float]] = mapped_column(Float)
