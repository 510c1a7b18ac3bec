"""endpoint and trace id in the request log; stored Responses API responses

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("endpoint", sa.String(length=32), server_default="chat", nullable=False))
        batch_op.add_column(sa.Column("trace_id", sa.String(length=32), nullable=True))

    op.create_table("stored_responses",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("agent", sa.String(length=128), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("conversation", sa.LargeBinary(), nullable=False),
    sa.Column("response", sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_stored_responses"))
    )
    with op.batch_alter_table("stored_responses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_stored_responses_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stored_responses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stored_responses_created_at"))
    op.drop_table("stored_responses")

    with op.batch_alter_table("request_log", schema=None) as batch_op:
        batch_op.drop_column("trace_id")
        batch_op.drop_column("endpoint")
