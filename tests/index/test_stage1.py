"""Stage 1 (backend/search/stage1.py, backend/index/stage1_models.py): each ranker against NumPy, training on given labels
only, retraining as labels change, stored rankers verified; on the real CIFAR-10 catalogue and PostgreSQL."""

import threading

import numpy as np
import pytest
from sqlalchemy import Engine, select, update

from backend.core.vectors import PrototypeMatrix, StoredVectors
from backend.imaging import ImageBytes
from backend.index.stage1_models import _keep_rows, heldout_mask, softmax, train_rankers
from backend.index.two_stage import TwoStageIndex
from backend.search.stage1 import MIN_LABELS_PER_CATEGORY, RETRAIN_FRACTION, Stage1
from backend.storage import catalogue, change_log, jobs, vector_reader
from backend.storage.engine import session_scope
from backend.storage.schema import Image, Stage1Model
from tests.utils.catalogue import Stored


@pytest.fixture(scope="module")
def catalogue_vectors(stored: Stored) -> StoredVectors:
    return stored.vectors


@pytest.fixture(scope="module")
def trained(catalogue_vectors: StoredVectors):
    return train_rankers(catalogue_vectors.ids, catalogue_vectors.category_ids, catalogue_vectors.vectors)


@pytest.fixture(scope="module")
def index(catalogue_vectors: StoredVectors, embedder) -> TwoStageIndex:
    cats = sorted(set(catalogue_vectors.category_ids.tolist()))
    protos = PrototypeMatrix.of(catalogue_vectors.category_ids, catalogue_vectors.vectors)
    return TwoStageIndex.build(embedder.model_id, embedder.dim, cats, catalogue_vectors, protos)


def copy_catalogue(source: Engine, target: Engine, model: str, given: int | None = None) -> None:
    """The source catalogue's images and vectors into `target`; only the first `given` per category keep a
    given label (the others are stored as predicted). No re-embedding."""
    with session_scope(source) as session:
        vectors = vector_reader.load_vectors(session, model)
        rows = {i.id: i for i in session.scalars(select(Image).order_by(Image.id))}
        names = {cid: name for name, cid in catalogue.category_ids(session).items()}
        images = {i: ImageBytes(r.data, r.sha256, r.format, r.width, r.height) for i, r in rows.items()}
    seen: dict[int, int] = {}
    items = []
    for image_id, cid in zip(vectors.ids.tolist(), vectors.category_ids.tolist(), strict=True):
        seen[cid] = seen.get(cid, 0) + 1
        items.append((images[image_id], names[cid], given is None or seen[cid] <= given))
    with session_scope(target) as session:
        ids = catalogue.ensure_categories(session, names.values())
        new = [catalogue.NewImage(img, ids[name], label_given=g) for img, name, g in items]
        catalogue.add_images(session, model, new, vectors.vectors)


# --- each ranker against NumPy ---------------------------------------------------------------------


def test_centroids_rank_by_their_best_sub_centroid(trained, index: TwoStageIndex, query_vectors, embedder) -> None:
    queries, _ = query_vectors
    c = trained.centroids
    want = np.stack([(queries @ c.vectors[c.offsets[j] : c.offsets[j + 1]].T).max(axis=1) for j in range(len(c.offsets) - 1)], 1)
    np.testing.assert_allclose(c.logits(queries), want, rtol=0, atol=1e-5)
    stage1 = Stage1(None, embedder.model_id, embedder.dim, "centroids")
    stage1.use(trained, 1, None)
    ranking = stage1.rank(index, queries)
    order = np.argsort(-want, axis=1, kind="stable")
    np.testing.assert_allclose(ranking.scores, np.take_along_axis(want, order, 1), rtol=0, atol=1e-5)
    assert ranking.probabilities is not None
    np.testing.assert_allclose(ranking.probabilities, softmax(ranking.scores, trained.temperatures["centroids"]), atol=1e-6)
    nearest = c.nearest_categories(queries, 1)[:, 0]
    block_of = np.repeat(np.arange(len(c.offsets) - 1), np.diff(c.offsets))
    assert (nearest == block_of[np.argmax(queries @ c.vectors.T, axis=1)]).all()


def test_classifier_probabilities_are_a_tempered_softmax(trained, index: TwoStageIndex, query_vectors, embedder) -> None:
    queries, _ = query_vectors
    stage1 = Stage1(None, embedder.model_id, embedder.dim, "classifier")
    stage1.use(trained, 1, None)
    ranking = stage1.rank(index, queries, top=3)
    logits = queries @ trained.classifier.weights + trained.classifier.bias
    probs = np.exp((logits - logits.max(1, keepdims=True)) / trained.temperatures["classifier"])
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    cats = np.asarray(index.category_ids)
    assert (cats[ranking.positions] == trained.category_ids[order]).all()
    assert ranking.probabilities is not None
    np.testing.assert_allclose(ranking.probabilities, np.take_along_axis(probs, order, 1), atol=1e-5)


def test_prototype_ranks_by_normalised_means(catalogue_vectors: StoredVectors, trained, index, query_vectors, embedder) -> None:
    queries, _ = query_vectors
    stage1 = Stage1(None, embedder.model_id, embedder.dim, "prototype")
    stage1.use(trained, 1, None)
    ranking = stage1.rank(index, queries)
    cats = np.asarray(index.category_ids)
    means = np.stack([catalogue_vectors.vectors[catalogue_vectors.category_ids == c].mean(0) for c in cats])
    want = queries @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    np.testing.assert_allclose(ranking.scores, -np.sort(-want, axis=1), atol=1e-5)
    assert (cats[ranking.positions[:, 0]] == cats[want.argmax(1)]).all()


def test_learned_rankers_are_checked_on_held_out_labels(catalogue_vectors: StoredVectors, trained) -> None:
    held = heldout_mask(catalogue_vectors.ids)
    assert 0.05 < held.mean() < 0.15
    # Chance is 0.1; on this 600-image catalogue each ranker reaches about 0.8 (measured).
    for ranker in ("prototype", "centroids", "classifier"):
        assert trained.heldout[ranker]["top1"] > 0.5, ranker
        assert trained.heldout[ranker]["top3"] >= trained.heldout[ranker]["top1"]
        assert trained.temperatures[ranker] > 0
    assert trained.labels == len(catalogue_vectors.ids)


# --- training from the database --------------------------------------------------------------------


def test_classifier_is_never_trained_on_predicted_labels(catalogue_engine: Engine, engine: Engine, embedder) -> None:
    copy_catalogue(catalogue_engine, engine, embedder.model_id, given=40)  # 40 given, 20 predicted per category
    stage1 = Stage1(engine, embedder.model_id, embedder.dim, "classifier")
    stage1.retrain()
    assert stage1.trained is not None and stage1.ranker == "classifier"
    with session_scope(engine) as session:
        given = vector_reader.load_vectors(session, embedder.model_id, given_only=True)
        flags = {i: g for i, g in session.execute(select(Image.id, Image.label_given))}
    assert len(given) == 400 and all(flags[i] for i in given.ids.tolist())
    assert stage1.trained.labels == 400
    reference = train_rankers(given.ids, given.category_ids, given.vectors)  # the given labels, nothing else
    np.testing.assert_array_equal(stage1.trained.classifier.weights, reference.classifier.weights)
    np.testing.assert_array_equal(stage1.trained.centroids.vectors, reference.centroids.vectors)


def test_too_few_labels_keep_the_prototypes(catalogue_engine: Engine, engine: Engine, embedder) -> None:
    copy_catalogue(catalogue_engine, engine, embedder.model_id, given=MIN_LABELS_PER_CATEGORY - 1)
    stage1 = Stage1(engine, embedder.model_id, embedder.dim, "auto")
    assert "too few given labels" in stage1.retrain()
    assert stage1.ranker == "prototype" and stage1.trained is None
    with session_scope(engine) as session:
        assert session.get(Stage1Model, embedder.model_id) is None


def test_retraining_follows_label_changes(catalogue_engine: Engine, engine: Engine, embedder) -> None:
    copy_catalogue(catalogue_engine, engine, embedder.model_id, given=40)
    stage1 = Stage1(engine, embedder.model_id, embedder.dim, "auto")
    stage1.retrain()
    first = stage1.trained_change
    assert first is not None
    # More than RETRAIN_FRACTION of the labels change: given labels are deleted (their images too).
    with session_scope(engine) as session:
        ids = session.scalars(select(Image.id).where(Image.label_given).order_by(Image.id)).all()
        for image_id in ids[: int(RETRAIN_FRACTION * 400) + 5]:
            catalogue.delete_image(session, image_id)
    other = Stage1(engine, embedder.model_id, embedder.dim, "auto")  # another process: loads and checks
    assert other.ranker == "prototype" and "labels changed" in other.reason
    with session_scope(engine) as session:
        seq = change_log.latest_seq(session, embedder.model_id)
    stage1.refresh(seq)  # the server's tick: stale, so it retrains in the background
    for thread in [t for t in threading.enumerate() if t.name == "stage1-retrain"]:
        thread.join(timeout=120)
    assert stage1.trained is not None and stage1.trained_change is not None and stage1.trained_change > first
    assert stage1.trained.labels == 400 - (int(RETRAIN_FRACTION * 400) + 5)
    other.load()
    assert other.trained is not None and other.trained_change == stage1.trained_change


def test_a_stale_ranker_is_retrained_once_the_running_catalogue_job_has_ended(
    catalogue_engine: Engine, engine: Engine, embedder
) -> None:
    """While a catalogue job runs, labels keep arriving: the tick waits for it to end (prototypes rank meanwhile),
    then retrains although nothing else changed."""
    copy_catalogue(catalogue_engine, engine, embedder.model_id, given=40)
    stage1 = Stage1(engine, embedder.model_id, embedder.dim, "auto")
    job = jobs.create_job(engine, "folder", embedder.model_id, {}, None, None)
    with session_scope(engine) as session:
        jobs.lookup(session, job, lock=True).state = "running"
        seq = change_log.latest_seq(session, embedder.model_id)
    stage1.refresh(seq)
    assert not [t for t in threading.enumerate() if t.name == "stage1-retrain"]
    assert stage1.trained is None and stage1.ranker == "prototype"
    with session_scope(engine) as session:
        jobs.lookup(session, job, lock=True).state = "succeeded"
    stage1.refresh(seq)  # the same seq: the job's end alone starts it
    for thread in [t for t in threading.enumerate() if t.name == "stage1-retrain"]:
        thread.join(timeout=120)
    assert stage1.trained is not None and stage1.trained.labels == 400


def test_a_stored_ranker_that_does_not_fit_is_not_used(catalogue_engine: Engine, engine: Engine, embedder) -> None:
    copy_catalogue(catalogue_engine, engine, embedder.model_id, given=40)
    Stage1(engine, embedder.model_id, embedder.dim, "classifier").retrain()
    assert Stage1(engine, "another/model", embedder.dim, "classifier").ranker == "prototype"  # nothing for that model
    wrong_dim = Stage1(engine, embedder.model_id, embedder.dim + 1, "classifier")
    assert wrong_dim.ranker == "prototype" and "dimensions" in wrong_dim.reason
    with session_scope(engine) as session:  # as if trained on a newer state than this (restored, older) catalogue
        session.execute(update(Stage1Model).values(trained_change=10**9))
    future = Stage1(engine, embedder.model_id, embedder.dim, "classifier")
    assert future.ranker == "prototype" and "past the catalogue's newest" in future.reason
    with session_scope(engine) as session:  # trained before a category got its labels
        session.execute(update(Stage1Model).values(trained_change=0, category_ids=[1, 2]))
    older = Stage1(engine, embedder.model_id, embedder.dim, "classifier")
    assert older.ranker == "prototype" and "not trained on" in older.reason


@pytest.mark.parametrize("chunk", [1, 7, 8192])
def test_training_rows_moved_in_place_equal_a_copy(chunk: int) -> None:
    """`train_rankers(consume=True)` moves the training rows to the front of the caller's array instead of
    copying them: the same rows, in the same order, across chunk boundaries."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    keep = np.flatnonzero(rng.random(1000) > 0.1)
    expected = x[keep].copy()
    moved = _keep_rows(x, keep, chunk)
    assert np.shares_memory(moved, x)
    np.testing.assert_array_equal(moved, expected)


def test_consuming_the_labels_trains_the_same_rankers(catalogue_vectors: StoredVectors) -> None:
    copy = train_rankers(catalogue_vectors.ids, catalogue_vectors.category_ids, catalogue_vectors.vectors)
    vectors = catalogue_vectors.vectors.astype(np.float32, copy=True)
    consumed = train_rankers(catalogue_vectors.ids, catalogue_vectors.category_ids, vectors, consume=True)
    assert consumed.heldout == copy.heldout
    np.testing.assert_array_equal(consumed.classifier.weights, copy.classifier.weights)
