"""Search parameters: their bounds and defaults in one place, for the settings, the API, the CLI and the page."""

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError

from backend.core.errors import Unprocessable

if TYPE_CHECKING:
    from backend.core.config import Settings

IndexKind = Literal["flat", "ivf", "fastscan", "auto"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "ivf", "fastscan", "auto")
# auto: an exact flat scan of the top categories below this many vectors, fastscan from it (README, "auto").
AUTO_FASTSCAN_FROM = 10_000
# The names users of the original design know (FAISS_INDEX_TYPE=flatl2|ivfflat|hnsw).
INDEX_KIND_ALIASES = {"flatl2": "flat", "ivfflat": "ivf"}
CODEC_PATTERN = re.compile(r"^(float32|float16|sq8|pq([1-9][0-9]*))$")

LIMIT_MIN, LIMIT_MAX = 1, 50
TOP_CATEGORIES_MIN, TOP_CATEGORIES_MAX = 1, 10
NPROBE_MIN, NPROBE_MAX, NPROBE_DEFAULT = 1, 100_000, 32

LIMIT_HELP = "number of results (default DEFAULT_SEARCH_LIMIT)"
TOP_CATEGORIES_HELP = "categories searched in stage 2 (default DEFAULT_TOP_CATEGORIES)"
NPROBE_HELP = "ivf index: sub-lists scanned among the top categories' (default FAISS_NPROBE); more is slower and closer to exact"
USE_PROTOTYPES_HELP = "two-stage search over the top categories (default USE_PROTOTYPE_FILTERING); false: exact"


class SearchParams(BaseModel):
    limit: int = Field(ge=LIMIT_MIN, le=LIMIT_MAX)
    top_categories: int = Field(ge=TOP_CATEGORIES_MIN, le=TOP_CATEGORIES_MAX)
    use_prototypes: bool
    nprobe: int = Field(NPROBE_DEFAULT, ge=NPROBE_MIN, le=NPROBE_MAX)

    @classmethod
    def resolve(
        cls,
        settings: "Settings",
        limit: int | None = None,
        top_categories: int | None = None,
        use_prototypes: bool | None = None,
        nprobe: int | None = None,
    ) -> "SearchParams":
        """Given values checked against the bounds; missing ones from the settings. Unprocessable otherwise."""
        try:
            return cls(
                limit=settings.default_search_limit if limit is None else limit,
                top_categories=settings.default_top_categories if top_categories is None else top_categories,
                use_prototypes=settings.use_prototype_filtering if use_prototypes is None else use_prototypes,
                nprobe=settings.faiss_nprobe if nprobe is None else nprobe,
            )
        except ValidationError as exc:
            raise Unprocessable("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from exc


def bounds() -> dict[str, dict[str, int]]:
    """For the page: the same bounds the API enforces."""
    return {
        "limit": {"min": LIMIT_MIN, "max": LIMIT_MAX},
        "top_categories": {"min": TOP_CATEGORIES_MIN, "max": TOP_CATEGORIES_MAX},
        "nprobe": {"min": NPROBE_MIN, "max": NPROBE_MAX},
    }
