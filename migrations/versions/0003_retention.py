"""Retention: snapshots get an optional label; journal and snapshot queries by VM stay
indexed as pruning deletes by VM and sequence.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("label", sa.String(100), nullable=True))
    op.create_index("ix_vms_deleted", "vms", ["deleted"])


def downgrade() -> None:
    op.drop_index("ix_vms_deleted", table_name="vms")
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("label")
