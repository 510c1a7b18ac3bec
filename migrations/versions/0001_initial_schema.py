"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("cache_entries",
    sa.Column("key", sa.String(length=64), nullable=False),
    sa.Column("namespace", sa.String(length=128), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("expires_at", sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint("key", name=op.f("pk_cache_entries"))
    )
    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cache_entries_expires_at"), ["expires_at"], unique=False)

    op.create_table("request_log",
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
    sa.Column("request_id", sa.String(length=128), nullable=False),
    sa.Column("agent", sa.String(length=128), nullable=False),
    sa.Column("requested_model", sa.String(length=200), nullable=False),
    sa.Column("route", sa.String(length=200), nullable=False),
    sa.Column("backend", sa.String(length=128), nullable=True),
    sa.Column("deployment_model", sa.String(length=256), nullable=True),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("outcome", sa.String(length=32), nullable=False),
    sa.Column("cache", sa.String(length=16), nullable=False),
    sa.Column("dedupe", sa.String(length=16), nullable=True),
    sa.Column("stream", sa.Boolean(), nullable=False),
    sa.Column("latency_ms", sa.Float(), nullable=False),
    sa.Column("upstream_ms", sa.Float(), nullable=True),
    sa.Column("ttft_ms", sa.Float(), nullable=True),
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("error_type", sa.String(length=64), nullable=True),
    sa.Column("prompt", sa.Text(), nullable=True),
    sa.Column("completion", sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_request_log"))
    )
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_request_log_agent_ts"), ["agent", "ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_request_log_ts"), ["ts"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_request_log_ts"))
        batch_op.drop_index(batch_op.f("ix_request_log_agent_ts"))

    op.drop_table("request_log")
    with op.batch_alter_table("cache_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cache_entries_expires_at"))

    op.drop_table("cache_entries")
