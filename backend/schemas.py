"""Every response body of the HTTP API, and the CLI's `--json` (the same shape for the same thing)."""

from datetime import datetime
from pathlib import PurePath
from typing import Literal

from pydantic import BaseModel

from backend.core.search_params import SearchParams
from backend.search.results import Hit, SearchResult, UploadResult
from backend.search.stage1 import Stage1Status
from backend.storage.schema import Image


def image_urls(image_id: int) -> dict[str, str]:
    return {"url": f"/images/{image_id}", "thumbnail_url": f"/images/{image_id}/thumbnail"}


def _shown_source(source: str | None) -> str | None:
    # Folder ingestion stores paths relative to the ingested folder; rows written before it did hold
    # absolute server paths, of which only the file name is shown.
    return PurePath(source).name if source and PurePath(source).is_absolute() else source


class ImageInfo(BaseModel):
    id: int
    category: str | None
    label_given: bool
    width: int
    height: int
    format: str
    size_bytes: int
    sha256: str
    source: str | None
    description: str | None
    created_at: datetime
    url: str
    thumbnail_url: str

    @classmethod
    def of(cls, image: Image) -> "ImageInfo":
        return cls(
            id=image.id,
            category=image.category.name if image.category else None,
            label_given=image.label_given,
            width=image.width,
            height=image.height,
            format=image.format,
            size_bytes=image.size_bytes,
            sha256=image.sha256,
            source=_shown_source(image.source),
            description=image.description,
            created_at=image.created_at,
            **image_urls(image.id),
        )


class SearchHit(BaseModel):
    image_id: int
    rank: int
    category: str | None
    label_given: bool
    score: float  # cosine similarity
    url: str
    thumbnail_url: str

    @classmethod
    def of(cls, hit: Hit) -> "SearchHit":
        return cls(
            image_id=hit.image_id,
            rank=hit.rank,
            category=hit.category,
            label_given=hit.label_given,
            score=hit.score,
            **image_urls(hit.image_id),
        )


class CategoryScoreOut(BaseModel):
    category_id: int
    category: str
    score: float  # stage 1's score: cosine similarity (prototype, centroids) or logit (classifier)
    searched: bool
    probability: float | None  # calibrated on held-out labels (null while stage 1 has nothing trained)


class SearchResponse(BaseModel):
    results: list[SearchHit]
    categories: list[CategoryScoreOut]
    searched_categories: list[str]
    use_prototypes: bool
    top_categories: int | None
    limit: int
    offset: int  # results skipped before this page; ranks count from the first page
    min_score: float | None  # the relevance cut-off, when one was asked for
    category_filter: list[str] | None  # the categories the search was restricted to, when it was
    vectors_scanned: int
    vectors_total: int
    timings_ms: dict[str, float]
    # True when a cluster group missed the deadline: the result is the best of the other categories only.
    partial: bool = False
    categories_left_out: list[str] = []

    @classmethod
    def of(cls, result: SearchResult, params: SearchParams) -> "SearchResponse":
        return cls(
            results=[SearchHit.of(h) for h in result.results],
            categories=[CategoryScoreOut(**vars(c)) for c in result.categories],
            searched_categories=result.searched_categories,
            use_prototypes=result.use_prototypes,
            top_categories=result.top_categories,
            limit=params.limit,
            offset=params.offset,
            min_score=params.min_score,
            category_filter=list(params.categories) if params.categories else None,
            vectors_scanned=result.vectors_scanned,
            vectors_total=result.vectors_total,
            timings_ms=result.timings_ms,
            partial=bool(result.partial),
            categories_left_out=result.partial,
        )


class SearchBatchResponse(BaseModel):
    queries: list[SearchResponse]  # one per query file, in the order sent


class PrototypeResponse(BaseModel):
    categories: list[CategoryScoreOut]
    timings_ms: dict[str, float]


class UploadResponse(BaseModel):
    image_id: int
    duplicate: bool  # true: these exact bytes were stored before, as image_id
    category: str | None
    label_given: bool
    category_score: float | None  # stage 1's score when the category was predicted
    category_probability: float | None  # and its calibrated probability (null while nothing is trained)
    near_duplicates: list[SearchHit]  # stored images at or above NEAR_DUPLICATE_THRESHOLD, best first
    url: str
    thumbnail_url: str

    @classmethod
    def of(cls, result: UploadResult) -> "UploadResponse":
        return cls(
            image_id=result.image_id,
            duplicate=result.duplicate,
            category=result.category,
            label_given=result.label_given,
            category_score=result.category_score,
            category_probability=result.category_probability,
            near_duplicates=[SearchHit.of(h) for h in result.near_duplicates],
            **image_urls(result.image_id),
        )


class CategoryOut(BaseModel):
    id: int
    name: str
    images: int
    labelled: int


class ImagePage(BaseModel):
    category: CategoryOut
    total: int
    offset: int
    limit: int
    items: list[ImageInfo]


class ModelStatus(BaseModel):
    id: str
    name: str
    dim: int
    device: str
    runtime: str
    loaded: bool


class CategoryCount(BaseModel):
    id: int
    name: str
    images: int
    labelled: int  # images whose label was given, not predicted


class DatabaseStatus(BaseModel):
    server: str  # which database is in use: the embedded one, or the URL without its password
    images: int
    vectors_for_model: int
    vectors_by_model: dict[str, int]
    categories: list[CategoryCount]


class RefreshStatus(BaseModel):
    kind: Literal["none", "incremental", "full"]
    added: int
    removed: int
    seconds: float
    reason: str
    at: datetime


class IndexStatus(BaseModel):
    type: str  # the live index's type (FAISS_INDEX_TYPE=auto: flat or fastscan, by catalogue size)
    why: str  # why it has that type
    codec: str
    rerank: str  # none, or the copy a shortlist is re-scored from
    lists: int  # inverted lists: one per category (flat) or k-means sub-lists (ivf)
    default_nprobe: int
    loaded: bool
    origin: str  # how the live index came to be: loaded from cache, rebuilt (and why)
    vectors: int
    categories: int
    current: bool  # reflects every change committed to the database
    seq: int  # the newest database change it reflects
    memory_bytes: int  # vector codes, ids, centroids and prototypes held by the index
    retrain: list[str]  # why the next rebuild (build-index) would train it differently; empty when it would not
    refreshes: dict[str, int]  # incremental and full refreshes since start
    last_refresh: RefreshStatus | None


class SearchSettings(BaseModel):
    use_prototype_filtering: bool
    default_top_categories: int
    default_search_limit: int
    bounds: dict[str, dict[str, int | float]]


class ReplicaStatus(BaseModel):
    name: str
    state: str  # ready, building, unreachable, failed: ...
    node: str | None = None
    pid: int | None = None
    vectors: int | None = None
    seq: int | None = None
    origin: str | None = None


class ShardGroupStatus(BaseModel):
    group: int
    categories: list[int]
    vectors_packed: int  # the categories' vectors when they were packed into groups
    replicas: list[ReplicaStatus]


class Stage2Status(BaseModel):
    engine: str  # in-process, or ray (RAY_ADDRESS)
    address: str | None = None
    epoch: int | None = None  # the active epoch: the one this server's searches use
    pending_epoch: int | None = None  # a newer epoch a rebalance is building
    groups: list[ShardGroupStatus] = []


class Status(BaseModel):
    model: ModelStatus
    database: DatabaseStatus
    index: IndexStatus
    stage1: Stage1Status
    settings: SearchSettings
    stage2: Stage2Status = Stage2Status(engine="in-process")


class StatusOut(Status):
    uptime_s: float


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    ready: bool
    checks: dict[str, str]  # model, database, index: what is not as it should be


class RebuildOut(BaseModel):
    vectors: int
    categories: int
    origin: str


class PrototypesRebuilt(BaseModel):
    prototypes: int


class DeletedOut(BaseModel):
    deleted: int


class DuplicateImage(BaseModel):
    image_id: int
    url: str
    thumbnail_url: str


class DuplicateGroup(BaseModel):
    category: str | None  # None: the images lie in more than one category
    images: list[DuplicateImage]  # ascending ids
    min_score: float  # the weakest cosine that joined the group
    max_score: float


class DuplicatesPage(BaseModel):
    threshold: float  # the cosine the stored links hold (NEAR_DUPLICATE_THRESHOLD)
    total: int  # groups in the catalogue
    offset: int
    limit: int
    groups: list[DuplicateGroup]
    as_of_seq: int  # every image numbered (change log) up to here has its links
    links_behind: int  # images stored after that, links not searched yet (counted up to 10,000)


class JobOut(BaseModel):
    id: int
    kind: str
    state: str  # queued, running, succeeded, failed, cancelled
    message: str | None
    total: int
    done: int
    added: int
    duplicates: int
    failed: int
    skipped: int  # archive entries or files left out (links, paths leaving the folder, not images)
    progress: float  # done / total, 0 to 1
    images_per_s: float | None
    failures: list[dict[str, str]]  # the first 100: source and reason
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class GalleryImage(BaseModel):
    image_id: int
    score: float  # cosine to the category's prototype
    url: str
    thumbnail_url: str


class GalleryCategory(BaseModel):
    category_id: int
    category: str
    images: list[GalleryImage]


class Gallery(BaseModel):
    categories: list[GalleryCategory]


class MapPoint(BaseModel):
    image_id: int
    category: str | None
    x: float
    y: float


class MapOut(BaseModel):
    points: list[MapPoint]  # a uniform sample of at most MAP_POINTS stored images
    explained: list[float]  # share of the variance along x and y
    as_of_seq: int  # the catalogue's change number this map reflects
    age_seconds: float  # since it was made (a stale map is refreshed in the background)


class Position(BaseModel):
    x: float
    y: float
