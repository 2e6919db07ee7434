"""Response bodies of the HTTP API."""

from datetime import datetime
from pathlib import PurePath

from pydantic import BaseModel

from backend.core.search_params import SearchParams
from backend.service import Hit, SearchResult, Status
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
    category: str | None
    images: list[DuplicateImage]  # ascending ids
    min_score: float  # the weakest cosine that joined the group
    max_score: float


class DuplicatesPage(BaseModel):
    threshold: float
    total: int  # groups in the catalogue
    offset: int
    limit: int
    groups: list[DuplicateGroup]
