"""What a search or an upload finds, as plain values (the HTTP and CLI JSON shapes are `backend.schemas`)."""

from dataclasses import dataclass, field


@dataclass
class Hit:
    image_id: int
    category: str | None
    label_given: bool
    score: float
    rank: int


@dataclass
class CategoryScore:
    category_id: int
    category: str
    score: float  # stage 1's score: cosine similarity (prototype, centroids) or logit (classifier)
    searched: bool
    probability: float | None = None  # calibrated on held-out labels; None while no ranker is trained


@dataclass
class SearchResult:
    results: list[Hit]
    categories: list[CategoryScore]
    use_prototypes: bool
    top_categories: int | None
    vectors_scanned: int
    vectors_total: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Categories left out because their cluster group missed the deadline (backend/cluster/router.py).
    partial: list[str] = field(default_factory=list)

    @property
    def searched_categories(self) -> list[str]:
        return [c.category for c in self.categories if c.searched]


@dataclass
class UploadResult:
    image_id: int
    category: str | None
    label_given: bool
    duplicate: bool
    category_score: float | None = None
    category_probability: float | None = None
    near_duplicates: list[Hit] = field(default_factory=list)  # stored images at or above NEAR_DUPLICATE_THRESHOLD
