"""The cluster's category groups (backend/cluster/): which group holds each category, per epoch. Rebalancing
writes a new epoch; routers follow the newest one.

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shard_assignments",
        sa.Column("epoch", sa.Integer, primary_key=True),
        sa.Column("category_id", sa.Integer, primary_key=True),
        sa.Column("group_no", sa.Integer, nullable=False),
        sa.Column("vectors", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("shard_assignments")
