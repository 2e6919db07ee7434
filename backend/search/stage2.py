"""Stage 2 as one call on an object: in this process over the live index (the default), or over a Ray
cluster's shard actors (RAY_ADDRESS, backend/cluster/). The service ranks categories (stage 1) itself and
hands stage 2 the category numbers to search; whichever runs it answers the same hits."""

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from backend.index.category_index import CategoryIndex, SearchHits


@dataclass(frozen=True)
class Stage2Hits:
    hits: SearchHits
    # Per query, the category ids of groups that missed the deadline: the result is partial without them.
    left_out: list[list[int]] = field(default_factory=list)


class Stage2(Protocol):
    engine: str  # "in-process" or "ray"

    def search(
        self, index: CategoryIndex, queries: np.ndarray, k: int, searched: np.ndarray | None, nprobe: int | None, shortlist: int
    ) -> Stage2Hits:
        """The k best of `searched` (per query, the index's category numbers, -1 padded; None: all)."""
        ...

    def catch_up(self, seq: int) -> None:
        """When this returns, whatever answers searches reflects the change log up to `seq`."""
        ...

    def status(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class InProcessStage2:
    engine = "in-process"

    def search(
        self, index: CategoryIndex, queries: np.ndarray, k: int, searched: np.ndarray | None, nprobe: int | None, shortlist: int
    ) -> Stage2Hits:
        return Stage2Hits(index.search(queries, k, searched, nprobe, shortlist), [[] for _ in queries])

    def catch_up(self, seq: int) -> None:
        """The live index itself followed the write (IndexCache.after_write)."""

    def status(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass
