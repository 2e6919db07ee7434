"""Search parameters: their bounds and defaults in one place, for the settings, the API, the CLI and the page."""

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, ValidationError

from backend.core.errors import Unprocessable

if TYPE_CHECKING:
    from backend.core.config import Settings

LIMIT_MIN, LIMIT_MAX = 1, 50
TOP_CATEGORIES_MIN, TOP_CATEGORIES_MAX = 1, 10

LIMIT_HELP = "number of results (default DEFAULT_SEARCH_LIMIT)"
TOP_CATEGORIES_HELP = "categories searched in stage 2 (default DEFAULT_TOP_CATEGORIES)"
USE_PROTOTYPES_HELP = "two-stage search over the top categories (default USE_PROTOTYPE_FILTERING); false: exact"


class SearchParams(BaseModel):
    limit: int = Field(ge=LIMIT_MIN, le=LIMIT_MAX)
    top_categories: int = Field(ge=TOP_CATEGORIES_MIN, le=TOP_CATEGORIES_MAX)
    use_prototypes: bool

    @classmethod
    def resolve(
        cls,
        settings: "Settings",
        limit: int | None = None,
        top_categories: int | None = None,
        use_prototypes: bool | None = None,
    ) -> "SearchParams":
        """Given values checked against the bounds; missing ones from the settings. Unprocessable otherwise."""
        try:
            return cls(
                limit=settings.default_search_limit if limit is None else limit,
                top_categories=settings.default_top_categories if top_categories is None else top_categories,
                use_prototypes=settings.use_prototype_filtering if use_prototypes is None else use_prototypes,
            )
        except ValidationError as exc:
            raise Unprocessable("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from exc


def bounds() -> dict[str, dict[str, int]]:
    """For the page: the same bounds the API enforces."""
    return {
        "limit": {"min": LIMIT_MIN, "max": LIMIT_MAX},
        "top_categories": {"min": TOP_CATEGORIES_MIN, "max": TOP_CATEGORIES_MAX},
    }
