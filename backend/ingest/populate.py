"""`populate`: a labelled dataset through the batch writer, one transaction per batch, its stages overlapped
(`backend.ingest.pipeline`): while one batch is embedded, the next ones are decoded and resized in a thread
pool and the previous one is written. A crash loses at most the batches in flight; a rerun skips what is
stored (by sha256) without re-embedding."""

import time
from dataclasses import dataclass

from sqlalchemy import Engine
from tqdm import tqdm

from backend.embedding.embedder import Embedder
from backend.ingest.categories import StoredPrototypes
from backend.ingest.pipeline import DEFAULT_DECODERS, run_pipeline
from backend.ingest.writer import Batch, BatchWriter, IngestReport
from backend.sources.datasets import Dataset, Sample

MAX_ERRORS = 20  # failures kept in a run's report


@dataclass(frozen=True)
class _Labelled:
    """A dataset sample as the writer's input: it always names its category."""

    sample: Sample
    description: None = None
    image_id: None = None

    @property
    def source(self) -> str:
        return self.sample.source

    @property
    def category(self) -> str:
        return self.sample.label

    def load(self) -> bytes:
        return self.sample.load()


def ingest(
    dataset: Dataset,
    embedder: Embedder,
    engine: Engine,
    max_pixels: int,
    batch_size: int = 128,
    progress: bool = True,
    pipelined: bool = True,
    decoders: int = DEFAULT_DECODERS,
) -> IngestReport:
    """`pipelined=False`: the same stages one after the other (what the pipeline is checked against). The
    images are committed, not yet in a running server's index (it follows the change log)."""
    report = IngestReport(requested=len(dataset.samples), skipped=dataset.skipped)
    start = time.perf_counter()
    embedder.load()
    writer = BatchWriter(engine, embedder, StoredPrototypes(embedder.model_id), max_pixels)
    inputs = [_Labelled(s) for s in dataset.samples]
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    with tqdm(total=len(inputs), unit="img", desc=f"ingest {dataset.name}", disable=not progress) as bar:

        def write(batch: Batch) -> None:
            report.merge(writer.write(batch), keep=MAX_ERRORS)
            bar.update(batch.size)

        if pipelined:
            run_pipeline(batches, writer.decode, writer.embed, write, decoders=decoders)
        else:
            for batch in batches:
                write(writer.embed(writer.decode(batch)))
    report.seconds = time.perf_counter() - start
    return report
