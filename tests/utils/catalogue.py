"""Test catalogues: real CIFAR-10 images stored through the real writer, read back for checks against
NumPy, and the row counts a write left behind."""

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.embedding.embedder import Embedder
from backend.ingest.populate import ingest
from backend.ingest.writer import IngestReport
from backend.sources.datasets import Dataset, Sample, balanced
from backend.storage import catalogue, vector_reader
from backend.storage.engine import session_scope
from backend.storage.schema import Embedding, Prototype
from backend.storage.schema import Image as ImageRow

MAX_PIXELS = 10**7


def fill(engine: Engine, embedder: Embedder, samples: Sequence[Sample], images: int, reverse: bool = False) -> IngestReport:
    """Store `images` of `samples`, balanced over their labels (the first ones of each), through the
    writer; `reverse` stores them in the opposite order, so the same images get other ids."""
    chosen = balanced(list(samples), images)
    return ingest(Dataset("cifar10", chosen[::-1] if reverse else chosen), embedder, engine, MAX_PIXELS, progress=False)


def small_catalogue(databases, embedder: Embedder, cifar_train: Dataset, images: int = 100) -> Engine:  # type: ignore[no-untyped-def]
    """A new database holding `images` CIFAR-10 train images, balanced over the categories."""
    engine = databases.new()
    fill(engine, embedder, cifar_train.samples, images)
    return engine


@dataclass(frozen=True)
class Stored:
    """What a catalogue database holds for one model, read back in one snapshot."""

    vectors: StoredVectors
    prototypes: PrototypeMatrix
    category_ids: dict[str, int]  # name -> id

    @property
    def names(self) -> dict[int, str]:  # id -> name
        return {cid: name for name, cid in self.category_ids.items()}


def read_stored(engine: Engine, model: str) -> Stored:
    with session_scope(engine) as session:
        return Stored(
            vector_reader.load_vectors(session, model),
            catalogue.load_prototypes(session, model),
            catalogue.category_ids(session),
        )


def row_counts(engine: Engine) -> tuple[int, int, int]:
    """(images, embeddings, images counted in prototype sums)."""
    with session_scope(engine) as s:
        return (
            s.scalar(select(func.count()).select_from(ImageRow)),
            s.scalar(select(func.count()).select_from(Embedding)),
            s.scalar(select(func.coalesce(func.sum(Prototype.count), 0))),
        )
