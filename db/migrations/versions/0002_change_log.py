"""Catalogue identity and a change log that index caches follow incrementally.

- `catalogue_meta`: one row with a random catalogue id made here (at init-db), so a cache file built from
  another database is never believed, and how far the deletion log has been pruned.
- `catalogue_change_seq`: every inserted or updated embedding and prototype row gets the next number, and
  every deleted embedding is written to `deleted_embeddings` with one. Triggers do it, so no writer (nor a
  hand-written SQL statement) can skip it.
- Numbers are handed out under a transaction-level advisory lock held until commit, so they are in commit
  order: once a reader sees number N committed, every smaller number is committed or gone for good. A
  reader that has applied everything up to N therefore needs only the rows numbered above N.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Also in backend/catalogue.py (CHANGE_LOCK): writers take it early to keep one lock order.
CHANGE_LOCK = 7305104221


def upgrade() -> None:
    op.execute("CREATE SEQUENCE catalogue_change_seq")
    op.create_table(
        "catalogue_meta",
        sa.Column("id", sa.SmallInteger, primary_key=True, server_default="1"),
        sa.Column("catalogue_id", sa.Uuid, nullable=False, server_default=sa.text("gen_random_uuid()")),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("deletions_pruned_through", sa.BigInteger, nullable=False, server_default="0"),
        sa.CheckConstraint("id = 1", name="catalogue_meta_one_row"),
    )
    op.execute("INSERT INTO catalogue_meta DEFAULT VALUES")
    op.create_table(
        "deleted_embeddings",
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("image_id", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_deleted_embeddings_model_seq", "deleted_embeddings", ["model", "seq"])
    for table, order in (("embeddings", "image_id, model"), ("prototypes", "model, category_id")):
        op.add_column(table, sa.Column("seq", sa.BigInteger))
        op.execute(
            f"UPDATE {table} t SET seq = s.seq FROM (SELECT ctid, nextval('catalogue_change_seq') AS seq "
            f"FROM (SELECT ctid FROM {table} ORDER BY {order}) o) s WHERE t.ctid = s.ctid"
        )
        op.alter_column(table, "seq", nullable=False)
        op.create_index(f"ix_{table}_model_seq", table, ["model", "seq"])
    op.execute(f"""
        CREATE FUNCTION catalogue_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({CHANGE_LOCK});
            IF TG_TABLE_NAME = 'embeddings' AND TG_OP = 'UPDATE' THEN
                INSERT INTO deleted_embeddings (seq, model, image_id)
                VALUES (nextval('catalogue_change_seq'), OLD.model, OLD.image_id);
            END IF;
            NEW.seq := nextval('catalogue_change_seq');
            RETURN NEW;
        END $$;
        CREATE FUNCTION catalogue_log_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({CHANGE_LOCK});
            INSERT INTO deleted_embeddings (seq, model, image_id)
            VALUES (nextval('catalogue_change_seq'), OLD.model, OLD.image_id);
            RETURN OLD;
        END $$;
        CREATE FUNCTION catalogue_restamp_image() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE embeddings SET seq = 0 WHERE image_id = NEW.id;  -- re-stamped by its trigger
            RETURN NEW;
        END $$;
        CREATE TRIGGER embeddings_stamp BEFORE INSERT OR UPDATE ON embeddings
            FOR EACH ROW EXECUTE FUNCTION catalogue_stamp_change();
        CREATE TRIGGER embeddings_log_deletion AFTER DELETE ON embeddings
            FOR EACH ROW EXECUTE FUNCTION catalogue_log_deletion();
        CREATE TRIGGER prototypes_stamp BEFORE INSERT OR UPDATE ON prototypes
            FOR EACH ROW EXECUTE FUNCTION catalogue_stamp_change();
        CREATE TRIGGER images_category_change AFTER UPDATE OF category_id ON images
            FOR EACH ROW WHEN (OLD.category_id IS DISTINCT FROM NEW.category_id)
            EXECUTE FUNCTION catalogue_restamp_image();
    """)


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER images_category_change ON images;
        DROP TRIGGER prototypes_stamp ON prototypes;
        DROP TRIGGER embeddings_log_deletion ON embeddings;
        DROP TRIGGER embeddings_stamp ON embeddings;
        DROP FUNCTION catalogue_restamp_image();
        DROP FUNCTION catalogue_log_deletion();
        DROP FUNCTION catalogue_stamp_change();
    """)
    for table in ("prototypes", "embeddings"):
        op.drop_index(f"ix_{table}_model_seq", table)
        op.drop_column(table, "seq")
    op.drop_table("deleted_embeddings")
    op.drop_table("catalogue_meta")
    op.execute("DROP SEQUENCE catalogue_change_seq")
