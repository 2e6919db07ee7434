"""Seeding by binary COPY (storage.bulk_load, benchmarks' seed_vectors) writes what add_images writes."""

import numpy as np
from sqlalchemy import Engine

from backend.storage import catalogue, change_log, vector_reader
from backend.storage.engine import session_scope
from benchmarks.harness import clustered, seed_vectors
from tests.storage.test_counts import counted, exact

MODEL = "m/bulk/1280px"


def test_copied_vectors_are_stored_counted_numbered_and_summed(engine: Engine) -> None:
    x, labels, _ = clustered(1200, seed=5, n_queries=1)
    seed_vectors(engine, MODEL, x, labels, chunk=500)
    with session_scope(engine, snapshot=True) as s:
        stored = vector_reader.load_vectors(s, MODEL)
        prototypes = catalogue.load_prototypes(s, MODEL)
        names = {cid: name for name, cid in catalogue.category_ids(s).items()}
        changes = change_log.changes_since(s, MODEL, 0)
    np.testing.assert_array_equal(stored.vectors, x)  # ids in insertion order
    assert [names[int(c)] for c in stored.category_ids] == [f"c{k}" for k in labels]
    assert sorted(changes.added.ids.tolist()) == sorted(stored.ids.tolist()) and changes.seq >= 1200  # numbered
    for row, cid in enumerate(prototypes.category_ids):
        mean = x[labels == int(names[int(cid)][1:])].mean(axis=0)
        np.testing.assert_allclose(prototypes.vectors[row], mean / np.linalg.norm(mean), atol=1e-5)
    assert counted(engine) == exact(engine) and counted(engine)[1] == 1200
