"""The one policy for an image stored without a category: stage 1's best category, stored as predicted
(label not given, so it never moves a prototype). Two ways to ask stage 1, one answer shape."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from sqlalchemy.orm import Session

from backend.storage import catalogue

if TYPE_CHECKING:
    from backend.search.live_index import LiveIndex
    from backend.search.stage1 import Stage1

NO_PROTOTYPES = "no category prototypes yet: give a category"


@dataclass(frozen=True)
class Prediction:
    category_id: int
    score: float  # stage 1's score of that category
    probability: float | None  # calibrated; None while no ranker is trained


class Predictor(Protocol):
    def predict(self, session: Session, vectors: np.ndarray) -> list[Prediction] | None:
        """Each vector's best category; None while there are no prototypes to rank (nothing labelled yet)."""
        ...


class LiveStage1:
    """The server's: the active stage-1 ranker (STAGE1) over the live index's categories."""

    def __init__(self, cache: "LiveIndex", stage1: "Stage1") -> None:
        self.cache, self.stage1 = cache, stage1

    def predict(self, session: Session, vectors: np.ndarray) -> list[Prediction] | None:
        with self.cache.reading() as index:
            if not index.prototype_counts.any():
                return None
            ranking = self.stage1.rank(index, vectors, top=1)
            ids = [index.category_ids[int(p)] for p in ranking.positions[:, 0]]
        probabilities = ranking.probabilities[:, 0] if ranking.probabilities is not None else [None] * len(ids)
        return [
            Prediction(cid, float(score), None if p is None else float(p))
            for cid, score, p in zip(ids, ranking.scores[:, 0], probabilities, strict=True)
        ]


class StoredPrototypes:
    """A worker's (no index at hand): the prototype ranker, on the prototypes read in the writer's own
    transaction: the same scores the index's prototype stage gives, one query per batch that needs it."""

    def __init__(self, model: str) -> None:
        self.model = model

    def predict(self, session: Session, vectors: np.ndarray) -> list[Prediction] | None:
        prototypes = catalogue.load_prototypes(session, self.model)
        if not len(prototypes.counts):
            return None
        scores = np.asarray(vectors, dtype=np.float32) @ prototypes.vectors.T
        best = scores.argmax(axis=1)
        return [Prediction(int(prototypes.category_ids[b]), float(scores[i, b]), None) for i, b in enumerate(best)]
