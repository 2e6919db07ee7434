"""Stage 1 of every search: the catalogue's categories ranked for a query (STAGE1=prototype|centroids|classifier|auto).

- prototype: each category's averaged given-label vector (the index's prototypes: exact, incremental).
- centroids, classifier: learned from the given labels (never predicted ones) by `backend.index.stage1_models`,
  stored in PostgreSQL (`stage1_models`, one row per model) with the change number they were trained at.
- auto: the ranker that was best on the held-out labels at training; prototype while there is none.

A stored row is believed only after checks (`_why_not`): same model and dimension, not newer than the
catalogue, every category that has given labels now is one it knows, and fewer than RETRAIN_FRACTION of
the labels changed since. A row that fails them is not used (prototype ranks meanwhile) and is retrained by
`build-index`, by a full index rebuild and by the server's refresh tick.
"""

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.core.config import PROJECT_ROOT
from backend.core.memory import release_freed_memory
from backend.index.category_index import CategoryIndex
from backend.index.sampling import SAMPLE_MODULUS, SAMPLE_MULTIPLIER
from backend.index.stage1_models import Centroids, LinearSoftmax, Trained, softmax, train_rankers
from backend.storage import catalogue, change_log, jobs, vector_reader
from backend.storage import stage1 as stage1_rows
from backend.storage.engine import session_scope
from backend.storage.schema import Stage1Model

log = logging.getLogger(__name__)

Stage1Kind = Literal["prototype", "centroids", "classifier", "auto"]
STAGE1_KINDS: tuple[str, ...] = get_args(Stage1Kind)
MIN_LABELS_PER_CATEGORY = 10  # fewer given labels in any labelled category: nothing is trained (prototype)
RETRAIN_FRACTION = 0.1  # labels added or removed since training, as a share of those trained on
MAX_TRAIN_LABELS = 100_000  # a larger catalogue trains on a fixed sample of its given labels (512 MB of vectors)
TRAIN_DATABASE_ENV = "IMSRC_STAGE1_DATABASE_URL"  # where `retrain_apart`'s child reads and stores (not in its argv)
TRAIN_TIMEOUT_S = 3600
TRAINED = "trained"  # the child's last line when it stored a ranker (else: why not)
UNKNOWN_LOGIT = -1e4  # a category a learned ranker has not seen (new since training) ranks last
F32 = np.dtype("<f4")


@dataclass(frozen=True)
class Ranking:
    ranker: str  # which ranker ran
    scores: np.ndarray  # (n, k) best first: cosine similarity (prototype, centroids) or logit (classifier)
    positions: np.ndarray  # (n, k) category numbers of the index (positions in index.category_ids)
    probabilities: np.ndarray | None  # (n, k) calibrated on held-out labels; None while nothing was trained


class Stage1Status(BaseModel):
    setting: str
    ranker: str  # the one in use now
    reason: str  # why this one, or why a stored one is not used
    trained_change: int | None
    labels: int | None
    heldout: dict[str, dict[str, float]]
    train_seconds: dict[str, float]
    training: bool = False  # a retrain is running now (prototypes or the old ranker rank meanwhile)


class Stage1:
    def __init__(self, engine: Engine | None, model: str, dim: int, setting: str = "auto") -> None:
        if setting not in STAGE1_KINDS:
            raise ValueError(f"unknown stage 1 {setting!r}; choose one of: {', '.join(STAGE1_KINDS)}")
        self.engine, self.model, self.dim, self.setting = engine, model, dim, setting
        self.trained: Trained | None = None
        self.trained_change: int | None = None
        self.reason = "not loaded"
        self._loaded = False
        self._checked_at = -1  # the seq `refresh` last checked at
        # (trained ranker's id, index categories) -> each trained category's number in the index
        self._columns: tuple[tuple[int, tuple[int, ...]], np.ndarray] | None = None
        self._training = threading.Lock()

    # --- which ranker ---------------------------------------------------------------------------

    @property
    def ranker(self) -> str:
        if not self._loaded:
            self.load()
        if self.setting == "prototype" or self.trained is None:
            return "prototype"
        return self.trained.best() if self.setting == "auto" else self.setting

    def load(self) -> None:
        """Check the stored row and believe it only if it passes; its arrays are read only when it is new."""
        with session_scope(self.engine, snapshot=True) as session:
            meta = stage1_rows.stored_summary(session, self.model)
            why = "nothing trained yet" if meta is None else _why_not(session, self.model, self.dim, *meta)
            trained = self.trained if why is None and meta is not None and self.trained_change == meta[1] else None
            if why is None and trained is None:
                trained = _decode(stage1_rows.stored_row(session, self.model))
                why = None if trained is not None else "its stored arrays do not fit together"
        self.use(trained, None if trained is None or meta is None else int(meta[1]), why)

    def use(self, trained: Trained | None, change: int | None, why: str | None) -> None:
        """Rank with `trained` from now on (None: prototype), trained at `change`; `why` it is not used."""
        self.trained, self.trained_change, self._columns, self._loaded = trained, change, None, True
        self.reason = why or f"trained at change {change}"
        if why and self.setting in ("centroids", "classifier"):
            log.warning("STAGE1=%s: stored ranker not used (%s); prototype ranks until it is retrained", self.setting, why)

    # --- training -------------------------------------------------------------------------------

    def retrain(self) -> str:
        """Train on the given labels of one snapshot and store the result (replacing the old row), here."""
        with self._training:
            lacking = train_and_store(self.engine, self.model, self.dim)
            return self._after_training(lacking)

    def retrain_apart(self) -> str:
        """The same in a child process: the server's background retrain. Its peak memory, the labels'
        vectors (about 1 GB at MAX_TRAIN_LABELS), ends with the child instead of staying in the server's heap,
        and its training loop, thousands of small GIL-holding steps, no longer competes with the server's
        request threads for the GIL."""
        with self._training:
            assert self.engine is not None
            env = {**os.environ, TRAIN_DATABASE_ENV: self.engine.url.render_as_string(hide_password=False)}
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "backend.search.stage1_train", self.model, str(self.dim)],
                    cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False, timeout=TRAIN_TIMEOUT_S,
                )  # fmt: skip
            except subprocess.TimeoutExpired:  # the idle class may starve it on a server busy for an hour
                log.error("stage 1 training (child process) stopped after %d s, unfinished", TRAIN_TIMEOUT_S)
                return self.reason
            if done.returncode != 0:
                log.error("stage 1 training (child process) failed: %s", done.stderr[-2000:])
                return self.reason
            lines = done.stdout.strip().splitlines()
            return self._after_training(lines[-1] if lines and lines[-1] != TRAINED else None)

    def _after_training(self, lacking: str | None) -> str:
        if lacking is not None:
            self.use(None, None, lacking)
        else:
            self.load()
            log.info("stage 1 for %s: %s (%s labels)", self.model, self.reason, self.trained.labels if self.trained else 0)
        return self.reason

    def refresh(self, seq: int) -> None:
        """Re-check the stored row when the catalogue moved (labels changed, another process retrained);
        retrain in the background when it is missing or stale, every labelled category has labels enough
        and no catalogue job is running (prototypes rank meanwhile). Called by the server's refresh tick with
        the index's seq."""
        if self.setting == "prototype" or self._training.locked() or seq == self._checked_at:
            return
        self._checked_at = seq
        self.load()
        if self.trained is None:
            with session_scope(self.engine) as session:
                lacking = _too_few_labels(session, self.model)
                ingesting = lacking is None and jobs.a_job_is_running(session)
            if ingesting:  # labels keep arriving: train once the job has ended, not on a moving target meanwhile
                self._checked_at = -1  # so the next tick checks again even when nothing else changes
            elif lacking is None:
                threading.Thread(target=self.retrain_apart, name="stage1-retrain", daemon=True).start()

    # --- ranking --------------------------------------------------------------------------------

    def rank(self, index: CategoryIndex, queries: np.ndarray, top: int | None = None) -> Ranking:
        """Every category (or the best `top`) of the index, best first, for each query."""
        ranker, trained = self.ranker, self.trained
        n_cat = len(index.category_ids)
        k = n_cat if top is None else min(top, n_cat)
        if ranker == "prototype" or trained is None:
            scores, positions = index.rank_categories(queries)  # all of them: probabilities need every score
            probabilities = None if trained is None else softmax(scores, trained.temperatures["prototype"])
        else:
            logits = np.full((len(queries), n_cat), UNKNOWN_LOGIT, np.float32)
            learned = trained.classifier.logits(queries) if ranker == "classifier" else trained.centroids.logits(queries)
            columns = self._index_columns(trained, index)
            known = columns >= 0
            logits[:, columns[known]] = learned[:, known]
            positions = np.argsort(-logits, axis=1, kind="stable")
            scores = np.take_along_axis(logits, positions, axis=1)
            probabilities = softmax(scores, trained.temperatures[ranker])
        return Ranking(ranker, scores[:, :k], positions[:, :k], None if probabilities is None else probabilities[:, :k])

    def nearest_categories(self, index: CategoryIndex, queries: np.ndarray, top: int) -> np.ndarray | None:
        """(n, top) index categories of each query's globally nearest sub-centroids (-1 for one not in the
        index); None while none were trained."""
        trained = self.trained  # one read: a retrain may swap it meanwhile
        if trained is None:
            return None
        return self._index_columns(trained, index)[trained.centroids.nearest_categories(queries, top)]

    def _index_columns(self, trained: Trained, index: CategoryIndex) -> np.ndarray:
        """For each of `trained`'s categories: its number in the index (-1 if the index has no such category)."""
        key = (id(trained), tuple(index.category_ids))
        cached = self._columns
        if cached is None or cached[0] != key:
            cols = np.asarray([index.list_of.get(int(c), -1) for c in trained.category_ids], dtype=np.int64)
            cached = self._columns = (key, cols)
        return cached[1]

    def status(self) -> Stage1Status:
        ranker, trained = self.ranker, self.trained
        return Stage1Status(
            setting=self.setting,
            ranker=ranker,
            reason=self.reason,
            trained_change=self.trained_change,
            labels=trained.labels if trained else None,
            heldout=trained.heldout if trained else {},
            train_seconds=trained.train_seconds if trained else {},
            training=self._training.locked(),
        )


def train_and_store(engine: Engine | None, model: str, dim: int) -> str | None:
    """Train every ranker on the given labels of one snapshot (a fixed sample of at most MAX_TRAIN_LABELS)
    and store them; why nothing could be trained instead, or None."""
    with session_scope(engine, snapshot=True, bulk=True) as session:
        change = change_log.latest_seq(session, model)
        lacking = _too_few_labels(session, model)
        if lacking is not None:
            return lacking
        total = int(catalogue.load_prototypes(session, model).counts.sum())
        cut = min(SAMPLE_MODULUS, -(-MAX_TRAIN_LABELS * SAMPLE_MODULUS // total))
        sample = (SAMPLE_MULTIPLIER, cut) if cut < SAMPLE_MODULUS else None
        labelled = vector_reader.load_vectors(session, model, sample, given_only=True)
    trained = train_rankers(labelled.ids, labelled.category_ids, labelled.vectors, consume=True)
    del labelled
    release_freed_memory()  # the labels' vectors and training copies: back to the system, not kept
    with session_scope(engine) as session:
        _store(session, model, dim, change, trained)
    log.info("stage 1 for %s trained on %d labels at change %d: %s", model, trained.labels, change, trained.heldout)
    return None


# --- the stored row -------------------------------------------------------------------------------


def _too_few_labels(session: Session, model: str) -> str | None:
    """Why nothing can be trained now (no given labels, or a labelled category with too few); None if it can.
    The prototype counts are exactly the given labels per category."""
    prototypes = catalogue.load_prototypes(session, model)
    few = prototypes.category_ids[prototypes.counts < MIN_LABELS_PER_CATEGORY]
    if not len(prototypes.counts):
        return "no given labels yet"
    if len(few):
        return f"too few given labels (under {MIN_LABELS_PER_CATEGORY}) in {len(few)} categories, ids {few[:10].tolist()}"
    return None


def _why_not(session: Session, model: str, dim: int, row_dim: int, change: int, labels: int, categories: list[int]) -> str | None:
    """Why the stored row (trained for `row_dim` at `change` on `labels` labels of `categories`) must not be
    used now; None when it may."""
    if row_dim != dim:
        return f"trained for {row_dim} dimensions, the model has {dim}"
    identity = change_log.identity(session)
    if change > identity.issued_seq:
        return f"trained at change {change}, past the catalogue's newest ({identity.issued_seq})"
    if change < identity.deletions_pruned_through:
        return f"trained at change {change}, before deletions pruned from the log"
    unknown = sorted(set(catalogue.load_prototypes(session, model).category_ids.tolist()) - set(categories))
    if unknown:
        return f"categories with given labels it was not trained on: ids {unknown[:10]}"
    changed = stage1_rows.labels_changed_since(session, model, change)
    if changed > RETRAIN_FRACTION * max(labels, 1):
        return f"{changed} labels changed since it was trained on {labels} (change {change})"
    return None


def _store(session: Session, model: str, dim: int, change: int, trained: Trained) -> None:
    values = {
        "dim": dim,
        "trained_change": change,
        "labels": trained.labels,
        "category_ids": [int(c) for c in trained.category_ids],
        "classifier_weights": trained.classifier.weights.astype(F32).tobytes(),
        "classifier_bias": trained.classifier.bias.astype(F32).tobytes(),
        "centroid_vectors": trained.centroids.vectors.astype(F32).tobytes(),
        "centroid_offsets": [int(o) for o in trained.centroids.offsets],
        "temperatures": trained.temperatures,
        "heldout": trained.heldout,
        "train_seconds": trained.train_seconds,
    }
    stage1_rows.store(session, model, values)


def _decode(row: Stage1Model) -> Trained | None:
    """The row's rankers; None (with a warning) when its arrays do not fit together."""
    n_cat, dim = len(row.category_ids), row.dim
    try:
        weights = np.frombuffer(row.classifier_weights, F32).reshape(dim, n_cat)
        bias = np.frombuffer(row.classifier_bias, F32).reshape(n_cat)
        offsets = np.asarray(row.centroid_offsets, np.int64)
        centroids = np.frombuffer(row.centroid_vectors, F32).reshape(-1, dim)
        if len(offsets) != n_cat + 1 or offsets[-1] != len(centroids) or (np.diff(offsets) < 1).any():
            raise ValueError("centroid offsets do not fit")
    except ValueError as exc:
        log.warning("stored stage 1 for %s not used: %s", row.model, exc)
        return None
    return Trained(
        np.asarray(row.category_ids, np.int64),
        LinearSoftmax(weights, bias),
        Centroids(centroids, offsets),
        {k: float(v) for k, v in row.temperatures.items()},
        row.heldout,
        row.train_seconds,
        row.labels,
    )
