"""What the store hands back: frozen, plain values.

A caller never holds an ORM object or a session, so nothing it does later can trigger a lazy load on a closed session
or write to the database by accident, and a record can cross a thread or a Gradio state freely. Field names are the
column names, so `storage.repo` builds every record the same way. Datetimes are aware and in UTC.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional


@dataclass(frozen=True)
class DatasetRecord:
    id: int
    name: str
    path: str
    """Where the copied file lives, under MORA_DATA_DIR/datasets/."""
    original_filename: str
    sha256: str
    file_format: str
    schema: str
    rows: int
    columns: list[str]
    preview: list[dict[str, Any]]
    size_bytes: int
    created_at: datetime


@dataclass(frozen=True)
class RunRecord:
    id: str
    name: str
    tags: list[str]
    group_name: Optional[str]
    """A named set of runs meant to be compared, such as a MoRA/LoRA pair at the same budget."""
    config: dict[str, Any]
    model: str
    adapter: str
    r: int
    variant: Optional[str]
    dataset_id: Optional[int]
    status: str
    status_message: str
    error: Optional[str]
    worker: Optional[str]
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    parent_id: Optional[str]
    """The run this one resumes, if any."""
    run_dir: Optional[str]
    output_dir: Optional[str]
    output_kind: Optional[str]
    step: int
    max_steps: Optional[int]
    last_loss: Optional[float]
    last_eval_loss: Optional[float]
    tokens_per_second: Optional[float]
    tokens_seen: Optional[int]
    peak_memory_mb: Optional[float]
    cancel_requested: bool


@dataclass(frozen=True)
class RunsPage:
    """One page of the runs table as `Store.runs_page` filters, sorts and cuts it, with how many runs match."""

    runs: list[RunRecord]
    total: int


@dataclass(frozen=True)
class MetricPointRecord:
    run_id: str
    name: str
    step: int
    value: Optional[float]
    """None where the worker logged NaN or infinity: a gap in the curve."""
    epoch: Optional[float]
    tokens: Optional[int]
    time: Optional[float]
    """Unix seconds on the worker's clock."""


@dataclass(frozen=True)
class SampledPointRecord:
    """One bucket of a sampled curve (`Store.sampled_series`): its last point, and the range of values in it."""

    run_id: str
    name: str
    step: int
    """The bucket's last step; value, epoch, tokens and time are that point's."""
    value: Optional[float]
    epoch: Optional[float]
    tokens: Optional[int]
    time: Optional[float]
    low: Optional[float]
    """The smallest value in the bucket (None if every value in it was a gap)."""
    high: Optional[float]
    count: int
    """How many stored points the bucket stands for (1 when the series came back whole)."""


@dataclass(frozen=True)
class LogLineRecord:
    run_id: str
    seq: int
    time: Optional[float]
    level: str
    message: str


@dataclass(frozen=True)
class ArtifactRecord:
    run_id: str
    kind: str
    """`adapter` (adapter_config.json + weights) or `model` (a whole merged model folder)."""
    path: str
    size_bytes: Optional[int]
    trainable_parameters: Optional[int]
    r_hat: Optional[Any]
    effective_rank: Optional[Any]
    layers: Optional[Any]
    created_at: datetime


@dataclass(frozen=True)
class ChatSessionRecord:
    id: int
    title: str
    base_model: str
    adapters: list[dict[str, Any]]
    """[{"label": ..., "run_id": ...}, ...]: the adapters answering side by side, in column order."""
    settings: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ChatMessageRecord:
    id: int
    session_id: int
    turn: int
    role: str
    content: str
    run_id: Optional[str]
    """The run whose adapter wrote this answer; None for the user's turns and after that run is deleted."""
    label: Optional[str]
    created_at: datetime


@dataclass(frozen=True)
class VoteRecord:
    id: int
    session_id: int
    turn: int
    winner_run_id: str
    loser_run_id: str
    created_at: datetime


@dataclass(frozen=True)
class VoteCounts:
    run_id: str
    wins: int
    losses: int


@dataclass(frozen=True)
class EvaluationRecord:
    id: str
    name: str
    base_model: str
    rows: list[dict[str, Any]]
    """[{"label": ..., "run_id": ... or None (the base model alone)}, ...]: who answers, in column order; an
    answer's or score's `row` is an index into this list."""
    source: dict[str, Any]
    """Where the prompts came from: {"data": file, "split": "all" | "train" | "eval", "limit", ...}."""
    settings: dict[str, Any]
    status: str
    status_message: str
    error: Optional[str]
    worker: Optional[str]
    examples_total: int
    examples_done: int
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]


@dataclass(frozen=True)
class EvaluationExampleRecord:
    evaluation_id: str
    example: int
    source_row: int
    """The example's row in its data file (1-based, as dataset messages count rows)."""
    prompt: list[dict[str, Any]]
    """The conversation up to the answer: [{role, content}, ...]."""
    reference: str
    judgements: Optional[Any]
    """The pairwise judge's verdicts: [{"a": row, "b": row, "winner": row or None (a tie), "reasons": [...]}]."""


@dataclass(frozen=True)
class EvaluationAnswerRecord:
    evaluation_id: str
    example: int
    row: int
    answer: str
    scores: dict[str, Any]
    """Metric name → this answer's value (None where it could not be computed)."""
    judge_score: Optional[float]
    judge_reason: Optional[str]


@dataclass(frozen=True)
class EvaluationScoreRecord:
    evaluation_id: str
    row: int
    run_id: Optional[str]
    step: Optional[int]
    metric: str
    value: Optional[float]
