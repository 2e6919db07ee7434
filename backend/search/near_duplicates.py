"""Near-duplicates: stored images whose embedding's cosine to another is at least NEAR_DUPLICATE_THRESHOLD
(the threshold and its precision and recall come from `backend.evaluation.duplicates`). Exact duplicates (same
bytes) are caught earlier, by sha256, and never stored twice.

Links are kept in the database (`backend.storage.near_duplicates`), with their groups, as images arrive:
- an upload searches the live index before it writes (and may refuse), then stores its links in the image's
  own transaction (`UploadLinks`, the writer's near-duplicate hook);
- workers and `populate` hold no index, so the process that does (the server, in its tick; or the CLI's
  `duplicates backfill`) links every embedding numbered after the watermark, a bounded chunk at a time
  (`link_chunk`). This is also the backfill of a catalogue stored before the links existed, and it catches the
  links two concurrent uploads could not see of each other.

The search covers every category, each with the index's own sub-list probing (NPROBE; all of it for flat):
an edited copy can be labelled (or predicted) into another category than its original, and stage 1's top
categories would miss it there. It costs the categories' count in probed lists, not a scan of the catalogue.
"""

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backend.core.config import Settings
from backend.core.errors import Conflict
from backend.core.failpoints import failpoint
from backend.index.category_index import CategoryIndex
from backend.search.live_index import LiveIndex
from backend.search.results import Hit
from backend.storage import catalogue
from backend.storage import near_duplicates as links_table
from backend.storage.engine import session_scope

NEIGHBOURS = 16  # near-duplicates looked at per image (an upload answers with at most this many)
QUERY_BATCH = 128  # vectors searched per hold of the index's read lock
BEHIND_CAP = 10_000  # `links_behind` is counted up to this (a bounded index scan)


@dataclass(frozen=True)
class LinkSearch:
    """How links are searched: the threshold, and the index's probing and re-ranking depth."""

    threshold: float
    nprobe: int
    shortlist: int

    @classmethod
    def of(cls, settings: Settings) -> "LinkSearch":
        return cls(settings.near_duplicate_threshold, settings.faiss_nprobe, settings.rerank_candidates)


@dataclass(frozen=True)
class LinkProgress:
    linked: int  # embeddings whose links this step searched
    links: int  # new links stored
    as_of_seq: int  # every embedding numbered up to here has its links
    behind: int  # embeddings numbered after it (counted up to BEHIND_CAP)


def neighbours(
    index: CategoryIndex, vectors: np.ndarray, how: LinkSearch, own: np.ndarray | None = None
) -> list[list[tuple[int, float]]]:
    """Per vector, the indexed images at or above the threshold, best first, in every category (`own`: each
    vector's own image id, left out)."""
    if not len(vectors) or not index.list_of:
        return [[] for _ in vectors]
    every = np.asarray(sorted(index.list_of.values()), dtype=np.int64)
    hits = index.search(vectors, NEIGHBOURS + 1, np.tile(every, (len(vectors), 1)), how.nprobe, how.shortlist)
    out = []
    for q, (scores, ids) in enumerate(zip(hits.scores, hits.ids, strict=True)):
        keep = (ids >= 0) & (scores >= how.threshold)
        if own is not None:
            keep &= ids != own[q]
        out.append([(int(i), float(s)) for i, s in zip(ids[keep], scores[keep], strict=True)][:NEIGHBOURS])
    return out


def of_vector(cache: LiveIndex, engine: Engine, how: LinkSearch, vector: np.ndarray) -> list[Hit]:
    """Stored images at or above the threshold, best first (those the database still holds)."""
    with cache.reading() as index:
        found = neighbours(index, vector.reshape(1, -1), how)[0]
    with session_scope(engine, single_read=True) as session:
        meta = catalogue.result_metadata(session, [i for i, _ in found])
        names = {cid: name for name, cid in catalogue.category_ids(session).items()} if meta else {}
    kept = [(i, s, *meta[i]) for i, s in found if i in meta]
    return [
        Hit(i, None if cid is None else names.get(cid), given, s, rank) for rank, (i, s, cid, given) in enumerate(kept, start=1)
    ]


class UploadLinks:
    """The upload's near-duplicate hook for `BatchWriter.upload`: searched before the write (refused on
    request: nothing is written), stored in the image's own transaction."""

    def __init__(self, cache: LiveIndex, engine: Engine, how: LinkSearch, refuse: bool) -> None:
        self.cache, self.engine, self.how, self.refuse = cache, engine, how, refuse
        self.hits: list[Hit] = []

    def check(self, vector: np.ndarray) -> None:
        self.hits = of_vector(self.cache, self.engine, self.how, vector)
        if self.hits and self.refuse:
            found = ", ".join(f"{h.image_id} (cosine {h.score:.3f})" for h in self.hits[:5])
            raise Conflict(f"near-duplicate of stored images {found}; not stored (on_near_duplicate=refuse)")

    def store(self, session: Session, image_id: int) -> None:
        links_table.add_links(session, self.cache.model, self.how.threshold, [(image_id, h.image_id, h.score) for h in self.hits])


def link_chunk(cache: LiveIndex, how: LinkSearch, limit: int) -> LinkProgress:
    """Link the next `limit` embeddings after the watermark that the live index holds, then move the watermark,
    in one transaction: a crash loses the chunk's work, never the watermark's truth."""
    engine, model = cache.engine, cache.model
    with session_scope(engine) as session:
        seen = links_table.ensure_state(session, model, how.threshold).links_seq
    through = cache.seq  # every embedding numbered up to here is in the index (or deleted)
    with session_scope(engine, single_read=True) as session:
        stored, seqs = links_table.pending(session, model, seen, through, limit)
    to = seqs[-1] if len(seqs) == limit else max(seen, through)
    if to == seen:
        return LinkProgress(0, 0, seen, behind(engine, model, seen))
    found: list[list[tuple[int, float]]] = []
    for start in range(0, len(stored), QUERY_BATCH):  # the index's read lock released between parts: writers go on
        with cache.reading() as index:
            part = slice(start, start + QUERY_BATCH)
            found += neighbours(index, stored.vectors[part], how, own=stored.ids[part])
    pairs = [(int(me), other, score) for me, near in zip(stored.ids, found, strict=True) for other, score in near]
    with session_scope(engine) as session:
        links_table.lock_links(session)
        if not links_table.advance(session, model, seen, to):  # another process linked this chunk first
            return LinkProgress(0, 0, seen, behind(engine, model, seen))
        added = links_table.add_links(session, model, how.threshold, pairs)
        failpoint("near_duplicates.chunk")  # fault tests: killed before this chunk commits
    return LinkProgress(len(seqs), added, to, behind(engine, model, to))


def behind(engine: Engine, model: str, as_of: int) -> int:
    """How many embeddings are numbered after `as_of` (not linked yet), up to BEHIND_CAP."""
    with session_scope(engine, single_read=True) as session:
        return links_table.behind(session, model, as_of, BEHIND_CAP)


def progress(engine: Engine, model: str) -> LinkProgress:
    """How far the links are, without searching anything."""
    with session_scope(engine, single_read=True) as session:
        now, behind_it = links_table.summary(session, model, BEHIND_CAP)
    return LinkProgress(0, 0, now.links_seq if now else 0, behind_it)
