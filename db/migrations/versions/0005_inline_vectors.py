"""Embeddings stored inline (STORAGE MAIN), not in TOAST: a rebuild reads the table's pages in order
instead of fetching every 5 KB vector as three out-of-line chunks through the TOAST index.

MAIN rather than PLAIN: a vector that cannot fit a page (ResNet-50's 2048 floats are 8 KB) still goes out
of line as a last resort, where PLAIN would refuse the row. Existing rows are rewritten once: the same
statement changes the storage and rewrites the table (a type change to bytea itself, which leaves the
values and their change numbers as they are; no trigger fires).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _rewrite(storage: str) -> None:
    # One ALTER TABLE: the rewrite it forces runs after both changes, so it stores every value the new way.
    op.execute(
        "ALTER TABLE embeddings ALTER COLUMN vector TYPE bytea USING vector || ''::bytea, "
        f"ALTER COLUMN vector SET STORAGE {storage}"
    )


def upgrade() -> None:
    _rewrite("MAIN")


def downgrade() -> None:
    _rewrite("EXTENDED")
