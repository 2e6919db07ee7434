"""The cluster's epochs (backend/cluster/): one row per epoch with its group and replica counts and its state.
A rebalance stores a new epoch as `building`, makes it `active` once its replicas are built and caught up,
and older epochs become `retired` when their actors are gone. Routers use the newest active epoch and report
it in shard_routers (an epoch is retired only once no router seen lately is still on it).

Epochs stored before this revision are filled in: the newest one active, older ones retired. Their replica
count was not stored (NULL: the server's SHARD_REPLICAS).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shard_epochs",
        sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("groups", sa.Integer, nullable=False),
        sa.Column("replicas", sa.Integer, nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('building', 'active', 'retired')", name="ck_shard_epochs_state"),
    )
    op.create_table(
        "shard_routers",
        sa.Column("router_id", sa.Text, primary_key=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.execute(
        """
        INSERT INTO shard_epochs (epoch, groups, replicas, state, created_at, activated_at, retired_at)
        SELECT epoch, max(group_no) + 1, NULL,
               CASE WHEN epoch = (SELECT max(epoch) FROM shard_assignments) THEN 'active' ELSE 'retired' END,
               min(created_at), min(created_at),
               CASE WHEN epoch = (SELECT max(epoch) FROM shard_assignments) THEN NULL ELSE now() END
        FROM shard_assignments GROUP BY epoch
        """
    )


def downgrade() -> None:
    # Epochs never activated (or newer than the newest active one) would be taken for the newest by 0009.
    op.execute(
        """
        DELETE FROM shard_assignments
        WHERE epoch > coalesce((SELECT max(epoch) FROM shard_epochs WHERE state = 'active'), 0)
        """
    )
    op.drop_table("shard_routers")
    op.drop_table("shard_epochs")
