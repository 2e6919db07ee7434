"""Stage 1's learned rankers (backend/search/stage1.py): one row per model, derived from the given labels, with
the change number they were trained at; a row that no longer fits the catalogue is not used.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage1_models",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("trained_change", sa.BigInteger, nullable=False),  # the catalogue's change number at training
        sa.Column("labels", sa.Integer, nullable=False),  # given labels it learned from (held-out ones included)
        sa.Column("category_ids", postgresql.ARRAY(sa.Integer), nullable=False),  # column order of the weights
        sa.Column("classifier_weights", sa.LargeBinary, nullable=False),  # float32 (dim, categories)
        sa.Column("classifier_bias", sa.LargeBinary, nullable=False),  # float32 (categories,)
        sa.Column("centroid_vectors", sa.LargeBinary, nullable=False),  # float32 (sub-centroids, dim)
        sa.Column("centroid_offsets", postgresql.ARRAY(sa.Integer), nullable=False),
        sa.Column("temperatures", postgresql.JSONB, nullable=False),  # per ranker, fitted on the held-out labels
        sa.Column("heldout", postgresql.JSONB, nullable=False),  # per ranker: held-out top-1 / top-3 accuracy
        sa.Column("train_seconds", postgresql.JSONB, nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("stage1_models")
