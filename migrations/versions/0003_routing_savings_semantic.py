"""route decision, prices and estimated usage in the request log; the semantic cache's index

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("route_by", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("route_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("price_usd", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("reference_usd", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("usage_estimated", sa.Boolean(), server_default=sa.false(), nullable=False))

    op.create_table("semantic_entries",
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
    sa.Column("scope", sa.String(length=64), nullable=False),
    sa.Column("cache_key", sa.String(length=64), nullable=False),
    sa.Column("vector", sa.LargeBinary(), nullable=False),
    sa.Column("features", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("expires_at", sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_semantic_entries"))
    )
    with op.batch_alter_table("semantic_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_semantic_entries_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("semantic_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_semantic_entries_expires_at"))
    op.drop_table("semantic_entries")

    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.drop_column("usage_estimated")
        batch_op.drop_column("reference_usd")
        batch_op.drop_column("price_usd")
        batch_op.drop_column("route_score")
        batch_op.drop_column("route_by")
