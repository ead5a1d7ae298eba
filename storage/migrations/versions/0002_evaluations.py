"""Evaluations: the evaluation itself, its examples, each row's answers, and each row's scores.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("rows", sa.JSON(), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("examples_total", sa.Integer(), nullable=False),
        sa.Column("examples_done", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
                           name="ck_evaluations_status"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations")
    )
    op.create_index("ix_evaluations_created_at", "evaluations", ["created_at"])
    op.create_table(
        "evaluation_examples",
        sa.Column("id", _ID, nullable=False),
        sa.Column("evaluation_id", sa.String(length=32), nullable=False),
        sa.Column("example", sa.Integer(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("judgements", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"],
                                name="fk_evaluation_examples_evaluation_id_evaluations", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluation_examples"),
        sa.UniqueConstraint("evaluation_id", "example", name="uq_evaluation_examples_evaluation_id_example")
    )
    op.create_table(
        "evaluation_answers",
        sa.Column("id", _ID, nullable=False),
        sa.Column("evaluation_id", sa.String(length=32), nullable=False),
        sa.Column("example", sa.Integer(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("judge_score", sa.Float(), nullable=True),
        sa.Column("judge_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"],
                                name="fk_evaluation_answers_evaluation_id_evaluations", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluation_answers"),
        sa.UniqueConstraint("evaluation_id", "example", "row", name="uq_evaluation_answers_evaluation_id_example_row")
    )
    op.create_table(
        "evaluation_scores",
        sa.Column("id", _ID, nullable=False),
        sa.Column("evaluation_id", sa.String(length=32), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"],
                                name="fk_evaluation_scores_evaluation_id_evaluations", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_evaluation_scores_run_id_runs",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluation_scores"),
        sa.UniqueConstraint("evaluation_id", "row", "metric", name="uq_evaluation_scores_evaluation_id_row_metric")
    )
    op.create_index("ix_evaluation_scores_run_id", "evaluation_scores", ["run_id"])


def downgrade() -> None:
    for table in ("evaluation_scores", "evaluation_answers", "evaluation_examples", "evaluations"):
        op.drop_table(table)
