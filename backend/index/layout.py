"""The index layout, one model: type, codec, re-ranking, list size, fast-scan M, the auto threshold.

Validated once (the settings build it, `layout_from_settings`; the settings' own validators use
`parse_kind` / `parse_codec` from `backend.core.index_options`), stored as is in the cache header (`IndexDescription`) and read
back from it. The vocabulary it is made of is `backend.core.index_options`.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, Field

from backend.core.errors import ConfigurationError
from backend.core.index_options import AUTO_FASTSCAN_FROM, INDEX_KINDS, RERANK_CODECS, IndexKind, RerankCodec, parse_codec, pq_m

if TYPE_CHECKING:
    import numpy as np

TRAIN_POINTS_PER_LIST = 64  # k-means sample per sub-list; FAISS asks for at least 39
# sq8 ranges and PQ codebooks are trained on at most this many vectors (PQ's k-means is the slow part).
SQ_TRAIN_POINTS, PQ_TRAIN_POINTS = 65_536, 16_384
STALE_GROWTH = 4.0  # a trained category this many times its training size (and several lists over) is retrained


@dataclass(frozen=True)
class IndexLayout:
    """How the index is laid out and stores its vectors. A built index holds a concrete one (`resolved`)."""

    kind: IndexKind = "flat"
    codec: str = "float32"
    list_size: int = 256  # ivf, fastscan: vectors per sub-list when a category is trained
    rerank: RerankCodec = "none"  # a second copy of the vectors (float32/float16) to re-rank a shortlist exactly
    fastscan_m: int = 0  # auto: the PQ sub-quantizers of fastscan above the threshold (fastscan: codec pq<M>)
    auto_threshold: int = AUTO_FASTSCAN_FROM  # auto: fastscan from this many vectors, flat below

    def __post_init__(self) -> None:
        if self.rerank not in RERANK_CODECS:
            raise ValueError(f"unknown re-ranking codec {self.rerank!r}; choose one of: {', '.join(RERANK_CODECS)}")
        if self.rerank != "none" and self.codec == "float32":
            raise ValueError("re-ranking needs a compressed VECTOR_CODEC (float16, sq8, pq<M>): float32 is exact already")
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index type {self.kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        parse_codec(self.codec)
        if self.list_size < 1 or self.fastscan_m < 0 or self.auto_threshold < 0:
            raise ValueError("list size must be at least 1, FASTSCAN_M and the auto threshold at least 0")
        if self.kind == "fastscan" and (self.pq_m is None or self.rerank != "none"):
            raise ValueError("fastscan stores 4-bit PQ codes (codec pq<M>) and re-ranks from its own float16 file")

    def resolved(self, vectors: int) -> "IndexLayout":
        """The concrete layout to build for a catalogue of `vectors`: auto is flat below its threshold and
        fastscan from it; the auto-only fields go back to their defaults, so that two builds of the same
        lists compare equal whatever FASTSCAN_M and the threshold say."""
        kind, codec, rerank = self.kind, self.codec, self.rerank
        if kind == "auto":
            kind, codec, rerank = (
                ("fastscan", f"pq{self.fastscan_m}", "none") if vectors >= self.auto_threshold else ("flat", codec, rerank)
            )
        concrete = IndexLayout(kind, codec, self.list_size, rerank)
        return self if concrete == self else concrete

    @property
    def pq_m(self) -> int | None:
        return pq_m(self.codec)

    @property
    def codec_train_points(self) -> int:
        return PQ_TRAIN_POINTS if self.pq_m else SQ_TRAIN_POINTS

    @property
    def trains_codec(self) -> bool:
        return self.codec not in ("float32", "float16")

    def check_dim(self, dim: int) -> None:
        for m, name in ((self.pq_m, f"codec {self.codec}"), (self.fastscan_m or None, f"FASTSCAN_M={self.fastscan_m}")):
            if m is not None and dim % m:
                raise ValueError(f"{name}: {m} does not divide the vector dimension {dim}")

    def lists_for(self, vectors: int) -> int:
        return 1 if self.kind == "flat" else max(1, round(vectors / self.list_size))

    def train_fraction(self, sizes: dict[int, int]) -> float:
        """Which share of a catalogue of `sizes[category]` vectors to train on: enough for k-means
        (TRAIN_POINTS_PER_LIST per sub-list) and for the codec, and no more."""
        total = sum(sizes.values())
        need = TRAIN_POINTS_PER_LIST * sum(self.lists_for(n) for n in sizes.values()) if self.kind != "flat" else 0
        if self.trains_codec:
            need = max(need, self.codec_train_points)
        return 1.0 if total == 0 else min(1.0, need / total)

    def stale_categories(
        self, category_ids: list[int], sizes: "np.ndarray", trained_sizes: "np.ndarray", lists: "np.ndarray"
    ) -> list[int]:
        """Of categories now holding `sizes` vectors in `lists` sub-lists, trained at `trained_sizes` (0:
        untrained), those a rebuild would lay out differently: untrained ones holding vectors, and trained
        ones grown to STALE_GROWTH times their training size and more lists than they have."""
        if self.kind == "flat":
            return []
        stale = []
        for j, cid in enumerate(category_ids):
            untrained = trained_sizes[j] == 0 and sizes[j] > 0
            if untrained or (sizes[j] >= STALE_GROWTH * trained_sizes[j] and self.lists_for(int(sizes[j])) > lists[j]):
                stale.append(cid)
        return stale

    def code_bytes(self, dim: int, codec: str | None = None) -> int:
        codec = codec or self.codec
        m = pq_m(codec)
        return m if m is not None else {"float32": 4, "float16": 2, "sq8": 1}[codec] * dim


class IndexDescription(BaseModel):
    """A built index as the cache header stores it: its layout, categories and what training gave them."""

    model: str
    dim: int = Field(gt=0)
    category_ids: list[int]
    layout: IndexLayout
    lists_per_category: list[int]
    trained_sizes: list[int]
    codec_trained_on: int = Field(ge=0)

    def check_lists(self) -> None:
        """ValueError unless there is one list count and one training size per category."""
        lists = self.lists_per_category
        if len(lists) != max(1, len(self.category_ids)) or len(self.trained_sizes) != len(lists):
            raise ValueError("the list layout does not match the categories")


class LayoutSettings(Protocol):
    """The settings a layout is built from (backend.core.config.Settings has them)."""

    faiss_index_type: IndexKind
    vector_codec: str
    faiss_list_size: int
    rerank: RerankCodec
    fastscan_m: int
    faiss_auto_threshold: int


def layout_from_settings(settings: LayoutSettings, dim: int) -> IndexLayout:
    """The layout the settings ask for, checked against the model's dimension: one clear error at start-up."""
    try:
        kind, codec, rerank = settings.faiss_index_type, settings.vector_codec, settings.rerank
        m = settings.fastscan_m or dim // 4
        if kind == "fastscan":
            if (codec, rerank) != ("float32", "none"):
                raise ValueError("fastscan has its own codes (FASTSCAN_M) and re-rank file: unset VECTOR_CODEC and RERANK")
            codec = f"pq{m}"
        layout = IndexLayout(kind, codec, settings.faiss_list_size, rerank, m, settings.faiss_auto_threshold)
        layout.check_dim(dim)
    except ValueError as exc:
        raise ConfigurationError(f"FAISS_INDEX_TYPE / VECTOR_CODEC / RERANK / FASTSCAN_M: {exc}") from None
    return layout


def status_fields(configured: IndexLayout, live: IndexLayout | None, vectors: int) -> dict[str, str]:
    """The live index's type, codec and re-ranking for status and the page, and why it has that type."""
    if live is None:
        return {"type": configured.kind, "why": "no index loaded yet", "codec": configured.codec, "rerank": configured.rerank}
    fields = {"type": live.kind, "codec": live.codec, "rerank": live.rerank, "why": f"FAISS_INDEX_TYPE={configured.kind}"}
    if live.kind == "fastscan":
        fields.update(codec=f"{live.codec}x4", rerank="float16 file")
    if configured.kind == "auto":
        limit, next_kind = configured.auto_threshold, configured.resolved(vectors).kind
        fields["why"] = f"auto: {vectors} vectors {'>=' if vectors >= limit else '<'} FAISS_AUTO_THRESHOLD={limit}"
        if next_kind != live.kind:
            fields["why"] += f"; {live.kind} when last built, the next build-index makes it {next_kind}"
    return fields
