"""Reading the catalogue for the API: image bytes and thumbnails, image facts, categories and their pages,
near-duplicate groups, the prototype gallery and the 2-D map (the last three kept until the catalogue changes)."""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image as PILImage

from backend.core.errors import NotFound, Unprocessable
from backend.imaging import make_thumbnail
from backend.schemas import (
    CategoryOut,
    DuplicateGroup,
    DuplicateImage,
    DuplicatesPage,
    Gallery,
    GalleryCategory,
    GalleryImage,
    ImageInfo,
    ImagePage,
    MapOut,
    MapPoint,
    Position,
    image_urls,
)
from backend.search import near_duplicates
from backend.services import catalogue_views
from backend.services.catalogue_views import CatalogueMap
from backend.services.search import SearchService
from backend.storage import catalogue
from backend.storage import near_duplicates as link_rows
from backend.storage.engine import session_scope

T = TypeVar("T")


@dataclass(frozen=True)
class StoredBytes:
    sha256: str
    format: str
    data: bytes | None  # None: the caller already holds these bytes (its ETag matched)


class _ThumbnailCache:
    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def discard(self, key: int) -> None:
        with self._lock:
            self._items.pop(key, None)

    def put(self, key: int, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)


class _PerState:
    """One value per catalogue state (and whatever else the key holds), computed again when it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: object = None
        self._value: object = None

    def get(self, key: object, make: Callable[[], T]) -> T:
        with self._lock:
            if self._key == key:
                return self._value  # type: ignore[return-value]
        value = make()  # outside the lock: concurrent callers may both compute, neither waits on the other
        with self._lock:
            self._key, self._value = key, value
        return value


def _shared_category(categories: list[str | None]) -> str | None:
    """The members' category when they share one; None when they lie in several (or none)."""
    found = set(categories)
    return found.pop() if len(found) == 1 else None


class Catalogue:
    """Every catalogue read a route makes, over the search service's database and index."""

    def __init__(self, search: SearchService) -> None:
        self._search = search
        self._engine = search.engine
        self._thumbnails = _ThumbnailCache()
        self._map = _PerState()

    # --- images ------------------------------------------------------------------------------

    def image_bytes(self, image_id: int, unless_sha256: str | None = None) -> StoredBytes:
        """The original bytes; not read when the caller already holds them (`unless_sha256` matches)."""
        with session_scope(self._engine) as session:
            image = catalogue.get_image(session, image_id)
            if image.sha256 == unless_sha256:
                return StoredBytes(image.sha256, image.format, None)
            return StoredBytes(image.sha256, image.format, image.data)

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of at most 160 px a side (image ids are never reused, so a cached one never goes stale)."""
        data = self._thumbnails.get(image_id)
        if data is None:
            with session_scope(self._engine) as session:
                data = make_thumbnail(catalogue.get_image(session, image_id).data)
            self._thumbnails.put(image_id, data)
        return data

    def forget_thumbnail(self, image_id: int) -> None:
        self._thumbnails.discard(image_id)

    def image_info(self, image_id: int) -> ImageInfo:
        with session_scope(self._engine) as session:
            return ImageInfo.of(catalogue.get_image(session, image_id))

    # --- categories --------------------------------------------------------------------------

    def categories(self) -> list[CategoryOut]:
        """Every category with its image count and how many carry a given (not predicted) label."""
        with session_scope(self._engine) as session:
            return [CategoryOut(id=c, name=n, images=i, labelled=g) for c, n, i, g in catalogue.category_counts(session)]

    def create_category(self, name: str) -> CategoryOut:
        """An (empty) category; an existing name is returned as it is."""
        with session_scope(self._engine) as session:
            cid = catalogue.ensure_categories(session, [name])[name]
        return next(c for c in self.categories() if c.id == cid)

    def category_page(self, category_id: int, offset: int, limit: int) -> ImagePage:
        """One page of a category's images, newest id last."""
        with session_scope(self._engine) as session:
            counts = {c: (n, i, g) for c, n, i, g in catalogue.category_counts(session)}
            if category_id not in counts:
                raise NotFound(f"category {category_id} not found")
            name, images, given = counts[category_id]
            items = [ImageInfo.of(img) for img in catalogue.category_page(session, category_id, offset, limit)]
        return ImagePage(
            category=CategoryOut(id=category_id, name=name, images=images, labelled=given),
            total=images,
            offset=offset,
            limit=limit,
            items=items,
        )

    def category_names(self) -> dict[int, str]:
        with session_scope(self._engine) as session:
            return {cid: name for name, cid in catalogue.category_ids(session).items()}

    # --- pictures of the catalogue -----------------------------------------------------------

    def duplicates_page(self, threshold: float | None, offset: int, limit: int) -> DuplicatesPage:
        """A page of the near-duplicate groups kept in the database (largest first), and how far behind the
        change log their links are: two statements, the page's rows only, whatever the catalogue's size."""
        model = self._search.model
        with session_scope(self._engine, single_read=True) as session:  # each statement consistent on its own
            state, behind = link_rows.summary(session, model, near_duplicates.BEHIND_CAP)
            kept_at = self._search.settings.near_duplicate_threshold if state is None else state.threshold
            if threshold is not None and abs(threshold - kept_at) > link_rows.THRESHOLD_EPS:
                raise Unprocessable(f"threshold: groups are kept at NEAR_DUPLICATE_THRESHOLD={kept_at:g} only, not {threshold:g}")
            rows = link_rows.group_page(session, model, offset, limit) if state else []
        page = [
            DuplicateGroup(
                category=_shared_category([c for _, c in g.members]),
                images=[DuplicateImage(image_id=i, **image_urls(i)) for i, _ in g.members],
                min_score=g.min_score,
                max_score=g.max_score,
            )
            for g in rows
        ]
        return DuplicatesPage(
            threshold=kept_at,
            total=state.groups if state else 0,
            offset=offset,
            limit=limit,
            groups=page,
            as_of_seq=state.links_seq if state else 0,
            links_behind=behind,
        )

    def gallery(self, per_category: int) -> Gallery:
        """Per category, the stored images nearest its prototype."""
        names = self.category_names()
        rows = catalogue_views.gallery(self._engine, self._search.cache, self._search.model, per_category)
        return Gallery(
            categories=[
                GalleryCategory(
                    category_id=r.category_id,
                    category=names.get(r.category_id, ""),
                    images=[
                        GalleryImage(image_id=i, score=s, **image_urls(i)) for i, s in zip(r.image_ids, r.scores, strict=True)
                    ],
                )
                for r in rows
            ]
        )

    def _current_map(self) -> CatalogueMap:
        search = self._search
        key = (search.sync_index(), search.model)
        return self._map.get(key, lambda: catalogue_views.catalogue_map(self._engine, search.model))

    def catalogue_map(self) -> MapOut:
        """The catalogue projected to 2-D, computed once per catalogue state."""
        names = self.category_names()
        made = self._current_map()
        points = [
            MapPoint(image_id=int(i), category=names.get(int(c)), x=float(x), y=float(y))
            for i, c, (x, y) in zip(made.ids, made.category_ids, made.xy, strict=True)
        ]
        return MapOut(points=points, explained=made.explained)

    def place(self, image: PILImage.Image) -> Position:
        """Where a query image falls on the map."""
        x, y = self._current_map().place(self._search.embed([image]))[0]
        return Position(x=float(x), y=float(y))
