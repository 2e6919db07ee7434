"""Counts kept with the writes, and an index that keeps the map's sample (issue 29).

- `category_image_counts` (images and given labels per category; category 0 = no category) and
  `model_vector_counts` (vectors per model), kept by statement-level triggers with transition tables:
  one aggregated upsert per INSERT, UPDATE, DELETE or COPY, whoever writes (server, worker, CLI, psql), in
  the writer's transaction. They take the change log's lock first (CHANGE_LOCK, as 0002's triggers do), so
  every counter update happens in one lock order and concurrent writers never deadlock on the counter
  rows. Filled here from the rows already stored, under a SHARE lock so no write slips between.
- `ix_embeddings_map_sample` on (model, hashint8(image_id), image_id): the map's sample is the MAP_POINTS
  images of smallest hash (a bottom-k sketch: a uniform sample, kept by every insert and delete), read by
  `ORDER BY ... LIMIT` along this index in O(MAP_POINTS) whatever the catalogue's size.

Revision ID: 0008
Revises: 0006 (the lead re-chains it after 0007)
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CHANGE_LOCK = 7305104221  # 0002's: every writer of the catalogue takes it before counting or stamping

_IMAGE_DELTAS = {  # per trigger: the rows it counts, +1 for new rows and -1 for old ones
    "INSERT": "SELECT category_id, label_given, 1 AS sign FROM new_rows",
    "DELETE": "SELECT category_id, label_given, -1 AS sign FROM old_rows",
    "UPDATE": "SELECT category_id, label_given, 1 AS sign FROM new_rows "
    "UNION ALL SELECT category_id, label_given, -1 FROM old_rows",
}
_VECTOR_DELTAS = {
    "INSERT": "SELECT model, 1 AS sign FROM new_rows",
    "DELETE": "SELECT model, -1 AS sign FROM old_rows",
}


def _image_counter(op_name: str) -> str:
    deltas = (
        "SELECT coalesce(category_id, 0), sum(sign), coalesce(sum(sign) FILTER (WHERE label_given), 0) "
        f"FROM ({_IMAGE_DELTAS[op_name]}) d GROUP BY 1 "
        "HAVING sum(sign) <> 0 OR coalesce(sum(sign) FILTER (WHERE label_given), 0) <> 0"
    )
    return f"""
        CREATE FUNCTION catalogue_count_images_{op_name.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS ({deltas}) THEN  -- not for an update that leaves categories and labels alone
                PERFORM pg_advisory_xact_lock({CHANGE_LOCK});
                INSERT INTO category_image_counts AS c (category_id, images, labelled) {deltas} ORDER BY 1
                ON CONFLICT (category_id) DO UPDATE SET images = c.images + EXCLUDED.images,
                    labelled = c.labelled + EXCLUDED.labelled;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER images_count_{op_name.lower()} AFTER {op_name} ON images
            REFERENCING {"NEW TABLE AS new_rows" if op_name != "DELETE" else ""}
                {"OLD TABLE AS old_rows" if op_name != "INSERT" else ""}
            FOR EACH STATEMENT EXECUTE FUNCTION catalogue_count_images_{op_name.lower()}();
    """


def _vector_counter(op_name: str) -> str:
    return f"""
        CREATE FUNCTION catalogue_count_vectors_{op_name.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT FROM {"new_rows" if op_name == "INSERT" else "old_rows"}) THEN
                PERFORM pg_advisory_xact_lock({CHANGE_LOCK});
                INSERT INTO model_vector_counts AS c (model, vectors)
                SELECT model, sum(sign) FROM ({_VECTOR_DELTAS[op_name]}) d GROUP BY 1 ORDER BY 1
                ON CONFLICT (model) DO UPDATE SET vectors = c.vectors + EXCLUDED.vectors;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER embeddings_count_{op_name.lower()} AFTER {op_name} ON embeddings
            REFERENCING {"NEW" if op_name == "INSERT" else "OLD"} TABLE AS {"new_rows" if op_name == "INSERT" else "old_rows"}
            FOR EACH STATEMENT EXECUTE FUNCTION catalogue_count_vectors_{op_name.lower()}();
    """


def upgrade() -> None:
    op.create_table(
        "category_image_counts",
        sa.Column("category_id", sa.Integer, primary_key=True),  # 0: images without a category
        sa.Column("images", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("labelled", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "model_vector_counts",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("vectors", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute("LOCK TABLE images, embeddings IN SHARE MODE")  # no write between the backfill and the triggers
    op.execute(
        "INSERT INTO category_image_counts (category_id, images, labelled) "
        "SELECT coalesce(category_id, 0), count(*), count(*) FILTER (WHERE label_given) FROM images GROUP BY 1"
    )
    op.execute("INSERT INTO model_vector_counts (model, vectors) SELECT model, count(*) FROM embeddings GROUP BY 1")
    for name in ("INSERT", "DELETE", "UPDATE"):
        op.execute(_image_counter(name))
    for name in ("INSERT", "DELETE"):
        op.execute(_vector_counter(name))
    op.execute("""
        CREATE FUNCTION catalogue_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_TABLE_NAME = 'images' THEN DELETE FROM category_image_counts; END IF;
            DELETE FROM model_vector_counts;  -- a truncated images table takes its embeddings with it
            RETURN NULL;
        END $$;
        CREATE TRIGGER images_count_truncate AFTER TRUNCATE ON images
            FOR EACH STATEMENT EXECUTE FUNCTION catalogue_count_truncate();
        CREATE TRIGGER embeddings_count_truncate AFTER TRUNCATE ON embeddings
            FOR EACH STATEMENT EXECUTE FUNCTION catalogue_count_truncate();
    """)
    op.execute("CREATE INDEX ix_embeddings_map_sample ON embeddings (model, hashint8(image_id), image_id)")


def downgrade() -> None:
    op.execute("DROP INDEX ix_embeddings_map_sample")
    for table, name in (
        ("images", "insert"),
        ("images", "delete"),
        ("images", "update"),
        ("embeddings", "insert"),
        ("embeddings", "delete"),
    ):
        kind = "images" if table == "images" else "vectors"
        op.execute(f"DROP TRIGGER {table}_count_{name} ON {table}; DROP FUNCTION catalogue_count_{kind}_{name}()")
    op.execute(
        "DROP TRIGGER images_count_truncate ON images; DROP TRIGGER embeddings_count_truncate ON embeddings; "
        "DROP FUNCTION catalogue_count_truncate()"
    )
    op.drop_table("model_vector_counts")
    op.drop_table("category_image_counts")
