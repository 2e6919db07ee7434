"""Reading the catalogue for the API: image bytes and thumbnails, image facts, categories and their pages,
near-duplicate groups, the prototype gallery and the 2-D map. The last three are computed one at a time
(`core.single_flight`: concurrent readers wait for that computation or get the last result, so memory does not
grow with their number) and kept until the catalogue changes; the map is never waited for once one exists."""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from pydantic import TypeAdapter
from sqlalchemy import Engine

from backend.core.errors import NotFound, Unprocessable
from backend.core.single_flight import Kept, SingleFlight
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
from backend.services.catalogue_views import CatalogueMap, GalleryRow
from backend.services.index_lifecycle import IndexLifecycle
from backend.storage import catalogue
from backend.storage import near_duplicates as link_rows
from backend.storage.engine import session_scope

log = logging.getLogger(__name__)
_MAP_POINTS = TypeAdapter(list[MapPoint])


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


def _shared_category(categories: list[str | None]) -> str | None:
    """The members' category when they share one; None when they lie in several (or none)."""
    found = set(categories)
    return found.pop() if len(found) == 1 else None


class Catalogue:
    """Every catalogue read a route makes, over the database and the live index."""

    def __init__(self, engine: Engine, live: IndexLifecycle, embed: Callable[[list[PILImage.Image]], np.ndarray]) -> None:
        self._engine = engine
        self._live = live  # the index kept current: its state keys what is computed once per state
        self._embed = embed
        self._thumbnails = _ThumbnailCache()
        self._gallery: SingleFlight[list[GalleryRow]] = SingleFlight("gallery")
        self._map: SingleFlight[CatalogueMap] = SingleFlight("catalogue map")
        self._map_json: tuple[CatalogueMap, tuple[tuple[int, str], ...], bytes] | None = None  # its points' JSON

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
        model = self._live.model
        with session_scope(self._engine, single_read=True) as session:  # each statement consistent on its own
            state, behind = link_rows.summary(session, model, near_duplicates.BEHIND_CAP)
            kept_at = self._live.settings.near_duplicate_threshold if state is None else state.threshold
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
        live = self._live
        key = (live.sync_index(), live.model, per_category)
        rows = self._gallery.get(key, lambda: catalogue_views.gallery(self._engine, live.cache, live.model, per_category))
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

    # --- the map: a kept sample, refreshed in the background; no request waits once one exists ---

    def prepare_map(self) -> None:
        """Make the first map in the background (MAP_POINTS vectors), so that no reader waits for it."""

        def first() -> None:
            try:
                self._current_map()
            except Exception:  # the first reader tries again
                log.exception("the first catalogue map failed")

        threading.Thread(target=first, name="first catalogue map", daemon=True).start()

    def _current_map(self) -> Kept[CatalogueMap]:
        live, settings = self._live, self._live.settings

        def make() -> CatalogueMap:
            last = self._map.kept  # the axes to keep while they are young enough
            previous = last.value if last is not None else None
            return catalogue_views.catalogue_map(
                self._engine, live.model, settings.map_points, previous, settings.map_refit_changes
            )

        return self._map.latest((live.sync_index(), live.model), make, settings.map_refresh_seconds)

    def catalogue_map_json(self) -> bytes:
        """The catalogue's sample projected to 2-D, as `MapOut`'s JSON: the last map made, with its age. Its
        points are serialized once per map and category names (MAP_POINTS of them took ~10 ms a request, and
        more, up to 50 ms, beside a map computed in the background); a request adds the few other fields."""
        names = self.category_names()
        kept = self._current_map()
        made, named = kept.value, tuple(sorted(names.items()))
        cached = self._map_json
        if cached is None or cached[0] is not made or cached[1] != named:
            points = [
                MapPoint(image_id=int(i), category=names.get(int(c)), x=float(x), y=float(y))
                for i, c, (x, y) in zip(made.ids, made.category_ids, made.xy, strict=True)
            ]
            cached = self._map_json = (made, named, _MAP_POINTS.dump_json(points))
        rest = MapOut(points=[], explained=made.explained, as_of_seq=made.as_of_seq, age_seconds=kept.age_seconds)
        return b'{"points":' + cached[2] + b"," + rest.model_dump_json(exclude={"points"}).encode()[1:]

    def place(self, image: PILImage.Image) -> Position:
        """Where a query image falls on the map."""
        x, y = self._current_map().value.place(self._embed([image]))[0]
        return Position(x=float(x), y=float(y))
