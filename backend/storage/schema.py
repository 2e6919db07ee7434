"""ORM schema. The database is the source of truth; FAISS indexes are caches derived from it."""

import uuid
from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    FetchedValue,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    deferred,
    mapped_column,
    relationship,
)


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # Deferred so listing and counting never pull image bytes.
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id", ondelete="RESTRICT"), index=True)
    # True: the label was given by the user or dataset; False: predicted from the nearest prototype.
    label_given: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    category: Mapped[Category | None] = relationship(lazy="joined")


class Embedding(Base):
    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little endian, L2-normalised
    # Change number, set by a trigger in commit order (migration 0002): index caches follow it.
    seq: Mapped[int] = mapped_column(BigInteger, server_default=FetchedValue(), server_onupdate=FetchedValue())

    # The map's sample: the images of smallest hash, read along this index (migration 0008).
    __table_args__ = (Index("ix_embeddings_map_sample", "model", func.hashint8(image_id), "image_id"),)


class Prototype(Base):
    """Running sum and count of the given-label embeddings of one category, for one model."""

    __tablename__ = "prototypes"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector_sum: Mapped[bytes] = mapped_column(LargeBinary)  # float64 sum: stays exact over updates
    count: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger, server_default=FetchedValue(), server_onupdate=FetchedValue())


class DeletedEmbedding(Base):
    """An embedding that left the catalogue, numbered like the changes, until pruned."""

    __tablename__ = "deleted_embeddings"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    image_id: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CategoryImageCount(Base):
    """Images and given labels per category (0: no category), kept by triggers with every write (migration 0008)."""

    __tablename__ = "category_image_counts"

    category_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    images: Mapped[int] = mapped_column(BigInteger, server_default="0")
    labelled: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ModelVectorCount(Base):
    """Stored vectors per model, kept by triggers with every write (migration 0008)."""

    __tablename__ = "model_vector_counts"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    vectors: Mapped[int] = mapped_column(BigInteger, server_default="0")


class CatalogueMeta(Base):
    """One row: which catalogue this database is (made at init-db) and how far deletions were pruned."""

    __tablename__ = "catalogue_meta"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, default=1)
    catalogue_id: Mapped[uuid.UUID] = mapped_column(Uuid, server_default=FetchedValue())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deletions_pruned_through: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ShardAssignment(Base):
    """Which category group holds each category in the cluster (backend/cluster/), per epoch: routers use the
    newest active epoch; an older one is kept while its actors drain."""

    __tablename__ = "shard_assignments"

    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    category_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_no: Mapped[int] = mapped_column(Integer)
    vectors: Mapped[int] = mapped_column(BigInteger)  # the category's vectors when it was packed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ShardEpoch(Base):
    """One epoch of the cluster's assignment (migration 0010): building (a rebalance makes its replicas),
    active (routers use the newest active one; older active ones drain), retired (their actors are gone)."""

    __tablename__ = "shard_epochs"
    __table_args__ = (CheckConstraint("state IN ('building', 'active', 'retired')", name="ck_shard_epochs_state"),)

    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    groups: Mapped[int] = mapped_column(Integer)
    replicas: Mapped[int | None] = mapped_column(Integer)  # NULL: stored before 0010 (the server's SHARD_REPLICAS)
    state: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ShardRouter(Base):
    """A server routing searches to the cluster (migration 0010): the epoch it searches on, reported about once
    a second; an epoch is retired only once no router seen lately is still on it."""

    __tablename__ = "shard_routers"

    router_id: Mapped[str] = mapped_column(Text, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """An API key: its public prefix, a SHA-256 of the whole key (the key itself is never stored), its scopes."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(16)))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CatalogueJob(Base):
    """One user request to fill the catalogue (migration 0004); its chunks run on procrastinate workers."""

    __tablename__ = "catalogue_jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), server_default="queued")
    model: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict] = mapped_column(JSONB, server_default="{}")
    message: Mapped[str | None] = mapped_column(Text)
    chunks: Mapped[int] = mapped_column(Integer, server_default="0")
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    done: Mapped[int] = mapped_column(Integer, server_default="0")
    added: Mapped[int] = mapped_column(Integer, server_default="0")
    duplicates: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    skipped: Mapped[int] = mapped_column(Integer, server_default="0")
    failures: Mapped[list] = mapped_column(JSONB, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str | None] = mapped_column(String(16))


class CatalogueJobChunk(Base):
    __tablename__ = "catalogue_job_chunks"

    job_id: Mapped[int] = mapped_column(ForeignKey("catalogue_jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CatalogueJobItem(Base):
    __tablename__ = "catalogue_job_items"

    job_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    item: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    image_id: Mapped[int | None] = mapped_column(BigInteger)


class Stage1Model(Base):
    """Stage 1's learned rankers for one model (migration 0006), derived from the given labels."""

    __tablename__ = "stage1_models"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    trained_change: Mapped[int] = mapped_column(BigInteger)
    labels: Mapped[int] = mapped_column(Integer)
    category_ids: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    classifier_weights: Mapped[bytes] = mapped_column(LargeBinary)
    classifier_bias: Mapped[bytes] = mapped_column(LargeBinary)
    centroid_vectors: Mapped[bytes] = mapped_column(LargeBinary)
    centroid_offsets: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    temperatures: Mapped[dict] = mapped_column(JSONB)
    heldout: Mapped[dict] = mapped_column(JSONB)
    train_seconds: Mapped[dict] = mapped_column(JSONB)
    trained_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class NearDuplicateLink(Base):
    """Two images of one model at or above the near-duplicate threshold (migration 0007), image_a < image_b."""

    __tablename__ = "near_duplicate_links"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    image_a: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    image_b: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    score: Mapped[float] = mapped_column(Float(24))


class NearDuplicateMember(Base):
    """The group (connected component of the links) of an image that has at least one link."""

    __tablename__ = "near_duplicate_members"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    group_id: Mapped[int] = mapped_column(BigInteger)


class NearDuplicateGroup(Base):
    __tablename__ = "near_duplicate_groups"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    group_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    min_score: Mapped[float] = mapped_column(Float(24))  # the weakest link in the group
    max_score: Mapped[float] = mapped_column(Float(24))


class NearDuplicateState(Base):
    """Per model: the threshold the links hold, how far along the change log they are, how many groups."""

    __tablename__ = "near_duplicate_state"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float(24))
    links_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    groups: Mapped[int] = mapped_column(Integer, server_default="0")
