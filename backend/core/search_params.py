"""Search parameters: their bounds and defaults in one place, for the settings, the API, the CLI and the page."""

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError, field_validator

from backend.core.errors import Unprocessable
from backend.core.text import clean_name

LIMIT_MIN, LIMIT_MAX = 1, 50
TOP_CATEGORIES_MIN, TOP_CATEGORIES_MAX = 1, 10
NPROBE_MIN, NPROBE_MAX, NPROBE_DEFAULT = 1, 100_000, 32
OFFSET_MIN, OFFSET_MAX = 0, 1000  # paging reaches the best OFFSET_MAX + LIMIT_MAX results, no further
MIN_SCORE_MIN, MIN_SCORE_MAX = -1.0, 1.0  # cosine similarity
CATEGORIES_MIN, CATEGORIES_MAX = 1, 100  # names in one category filter
QUERIES_MIN, QUERIES_MAX = 1, 16  # query images in one request

LIMIT_HELP = "number of results (default DEFAULT_SEARCH_LIMIT)"
TOP_CATEGORIES_HELP = "categories searched in stage 2 (default DEFAULT_TOP_CATEGORIES)"
NPROBE_HELP = "ivf index: sub-lists scanned among the top categories' (default FAISS_NPROBE); more is slower and closer to exact"
USE_PROTOTYPES_HELP = "two-stage search over the top categories (default USE_PROTOTYPE_FILTERING); false: exact"
OFFSET_HELP = f"skip this many of the best results (paging; at most {OFFSET_MAX})"
MIN_SCORE_HELP = "only results with a cosine similarity at least this (-1 to 1)"
CATEGORIES_HELP = f"search only these categories (up to {CATEGORIES_MAX}); two-stage search takes the top ones among them"


class SearchDefaults(Protocol):
    """The settings missing parameters come from (backend.core.config.Settings has them; not imported here,
    as the settings import these bounds)."""

    default_search_limit: int
    default_top_categories: int
    use_prototype_filtering: bool
    faiss_nprobe: int


class SearchParams(BaseModel):
    limit: int = Field(ge=LIMIT_MIN, le=LIMIT_MAX)
    top_categories: int = Field(ge=TOP_CATEGORIES_MIN, le=TOP_CATEGORIES_MAX)
    use_prototypes: bool
    nprobe: int = Field(NPROBE_DEFAULT, ge=NPROBE_MIN, le=NPROBE_MAX)
    offset: int = Field(0, ge=OFFSET_MIN, le=OFFSET_MAX)
    min_score: float | None = Field(None, ge=MIN_SCORE_MIN, le=MIN_SCORE_MAX, allow_inf_nan=False)
    categories: tuple[str, ...] | None = Field(None, min_length=CATEGORIES_MIN, max_length=CATEGORIES_MAX)

    @field_validator("categories", mode="before")
    @classmethod
    def _clean_categories(cls, names: Sequence[str] | None) -> tuple[str, ...] | None:
        """Trimmed names, each once, in the order given; none at all is no filter."""
        if names is None:
            return None
        cleaned = tuple(dict.fromkeys(clean_name(n) for n in names))
        return cleaned or None

    @classmethod
    def resolve(
        cls,
        settings: SearchDefaults,
        limit: int | None = None,
        top_categories: int | None = None,
        use_prototypes: bool | None = None,
        nprobe: int | None = None,
        offset: int | None = None,
        min_score: float | None = None,
        categories: Sequence[str] | None = None,
    ) -> "SearchParams":
        """Given values checked against the bounds; missing ones from the settings. Unprocessable otherwise."""
        try:
            return cls(
                limit=settings.default_search_limit if limit is None else limit,
                top_categories=settings.default_top_categories if top_categories is None else top_categories,
                use_prototypes=settings.use_prototype_filtering if use_prototypes is None else use_prototypes,
                nprobe=settings.faiss_nprobe if nprobe is None else nprobe,
                offset=offset or 0,
                min_score=min_score,
                categories=tuple(categories) if categories is not None else None,
            )
        except ValidationError as exc:
            raise Unprocessable("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from exc


def bounds() -> dict[str, dict[str, int | float]]:
    """For the page: the same bounds the API enforces."""
    return {
        "limit": {"min": LIMIT_MIN, "max": LIMIT_MAX},
        "top_categories": {"min": TOP_CATEGORIES_MIN, "max": TOP_CATEGORIES_MAX},
        "nprobe": {"min": NPROBE_MIN, "max": NPROBE_MAX},
        "offset": {"min": OFFSET_MIN, "max": OFFSET_MAX},
        "min_score": {"min": MIN_SCORE_MIN, "max": MIN_SCORE_MAX},
        "categories": {"min": CATEGORIES_MIN, "max": CATEGORIES_MAX},
        "queries": {"min": QUERIES_MIN, "max": QUERIES_MAX},
    }
