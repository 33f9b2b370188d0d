"""The prediction store's first schema: predictions and labels with their indexes, as schema.py has them.

Written out rather than built from schema.py's tables: a revision must keep creating what it created when it was
written, whatever schema.py says later. tests/test_store.py checks that upgrading to head matches schema.py.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("predicted", sa.String(128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("topk", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("input_sha256", sa.String(64), nullable=True),
        sa.Column("input_bytes", sa.Integer(), nullable=True),
        sa.Column("input_stats", sa.JSON(), nullable=True),
        sa.Column("ood_score", sa.Float(), nullable=True),
        sa.Column("adv_score", sa.Float(), nullable=True),
        sa.Column("sampled", sa.Boolean(), nullable=False),
        sa.Column("input_path", sa.String(512), nullable=True),
    )
    op.create_index("ix_predictions_request", "predictions", ["request_id", "item"])
    op.create_index("ix_predictions_model_time", "predictions", ["model", "created_at"])
    op.create_index("ix_predictions_time", "predictions", ["created_at"])
    op.create_table(
        "labels",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("label", sa.String(128), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_labels_request", "labels", ["request_id", "item"])


def downgrade() -> None:
    op.drop_index("ix_labels_request", table_name="labels")
    op.drop_table("labels")
    op.drop_index("ix_predictions_time", table_name="predictions")
    op.drop_index("ix_predictions_model_time", table_name="predictions")
    op.drop_index("ix_predictions_request", table_name="predictions")
    op.drop_table("predictions")
