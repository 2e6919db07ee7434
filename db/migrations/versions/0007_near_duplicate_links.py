"""Near-duplicate links and their groups, kept as images arrive (backend/storage/near_duplicates.py).

- `near_duplicate_links`: one row per pair of images of one model whose cosine is at least the threshold
  (image_a < image_b), written with the upload that found it or by the server that follows the change log.
- `near_duplicate_members`: the group (connected component of the links) of every image that has a link.
- `near_duplicate_groups`: per group its size and weakest and strongest link, indexed in the order
  `GET /duplicates` pages them (largest first), so a page reads only its own rows.
- `near_duplicate_state`: per model the threshold the links were computed at, how far along the change log
  they are (`links_seq`: every embedding numbered up to it has had its links searched) and the group count.

No foreign keys to `images`: a link's insert would take a key-share lock on the other image and wait on a
concurrent delete holding it, which itself waits on the uploader's change-log lock. Deleting an image removes
its rows explicitly, in the delete's transaction, under the links' advisory lock.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE near_duplicate_group_seq")
    op.create_table(
        "near_duplicate_links",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("image_a", sa.BigInteger, primary_key=True),
        sa.Column("image_b", sa.BigInteger, primary_key=True),
        sa.Column("score", sa.Float(24), nullable=False),
        sa.CheckConstraint("image_a < image_b", name="near_duplicate_links_ordered"),
    )
    op.create_index("ix_near_duplicate_links_b", "near_duplicate_links", ["model", "image_b"])
    op.create_table(
        "near_duplicate_members",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("image_id", sa.BigInteger, primary_key=True),
        sa.Column("group_id", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_near_duplicate_members_group", "near_duplicate_members", ["model", "group_id"])
    op.create_table(
        "near_duplicate_groups",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("group_id", sa.BigInteger, primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("min_score", sa.Float(24), nullable=False),
        sa.Column("max_score", sa.Float(24), nullable=False),
    )
    op.execute("CREATE INDEX ix_near_duplicate_groups_page ON near_duplicate_groups (model, size DESC, max_score DESC, group_id)")
    op.create_table(
        "near_duplicate_state",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("threshold", sa.Float(24), nullable=False),
        sa.Column("links_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("groups", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for table in ("near_duplicate_state", "near_duplicate_groups", "near_duplicate_members", "near_duplicate_links"):
        op.drop_table(table)
    op.execute("DROP SEQUENCE near_duplicate_group_seq")
