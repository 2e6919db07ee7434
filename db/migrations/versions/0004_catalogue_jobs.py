"""Catalogue jobs: one row a user request (ingest an archive, a URL list, a folder, re-embed), one row a chunk
of it; the chunks are run by procrastinate workers, whose queue tables live in this database too.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from procrastinate.schema import SchemaManager

    # procrastinate's own tables and functions (its SQL, applied once, in this migration's transaction).
    with op.get_bind().connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(SchemaManager.get_schema())  # no parameters, so its '%' stay as they are
    op.create_table(
        "catalogue_jobs",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("message", sa.Text),  # why a job failed, or what it was cancelled by
        sa.Column("chunks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("added", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),  # archive entries refused (links, ../)
        sa.Column("failures", postgresql.JSONB, nullable=False, server_default="[]"),  # the first 100 items that failed
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("created_by", sa.String(16)),  # the API key prefix, when one was used
    )
    op.create_table(
        "catalogue_job_chunks",
        sa.Column("job_id", sa.BigInteger, sa.ForeignKey("catalogue_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True),
        # Set in the same transaction as the chunk's images: a chunk retried after a crash does nothing twice.
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    # What a chunk will ingest, staged in the database so that a worker on any machine can read it (an
    # uploaded archive is on the server's disk only); deleted by the chunk's own transaction.
    op.create_table(
        "catalogue_job_items",
        sa.Column("job_id", sa.BigInteger, primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),  # the archive entry, file or URL: for failure reports
        sa.Column("category", sa.String(200)),
        sa.Column("description", sa.Text),
        sa.Column("url", sa.Text),  # download this, or:
        sa.Column("data", sa.LargeBinary),  # these bytes, or:
        sa.Column("image_id", sa.BigInteger),  # re-embed this stored image
        sa.ForeignKeyConstraint(
            ["job_id", "chunk"], ["catalogue_job_chunks.job_id", "catalogue_job_chunks.chunk"], ondelete="CASCADE"
        ),
    )


DROP_PROCRASTINATE = """
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'procrastinate%' LOOP
    EXECUTE 'DROP TABLE IF EXISTS ' || quote_ident(r.tablename) || ' CASCADE';
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate%' LOOP
    EXECUTE 'DROP FUNCTION IF EXISTS ' || r.f || ' CASCADE';
  END LOOP;
  FOR r IN SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate%' AND t.typtype IN ('e', 'c') LOOP
    EXECUTE 'DROP TYPE IF EXISTS ' || quote_ident(r.typname) || ' CASCADE';
  END LOOP;
END $$;
"""


def downgrade() -> None:
    op.drop_table("catalogue_job_items")
    op.drop_table("catalogue_job_chunks")
    op.drop_table("catalogue_jobs")
    with op.get_bind().connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(DROP_PROCRASTINATE)
