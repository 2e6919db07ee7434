"""Near-duplicate helpers for tests: edited copies of stored CIFAR-10 images, the groups NumPy finds by brute
force, and a check that the stored groups are exactly the connected components of the stored links."""

import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from sqlalchemy import Engine, select

from backend.core.vectors import StoredVectors
from backend.evaluation import duplicates as duplicate_eval
from backend.storage import near_duplicates as links_table
from backend.storage.engine import session_scope
from backend.storage.schema import NearDuplicateGroup, NearDuplicateLink, NearDuplicateMember
from tests.utils.catalogue import read_stored


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def edited(data: bytes, edit: str) -> bytes:
    """A stored image's bytes edited as the threshold's measurement edits them (flip, resize, brighten...)."""
    return png(duplicate_eval.EDITS[edit](Image.open(io.BytesIO(data)).convert("RGB")))


def stored(engine: Engine, model: str) -> StoredVectors:
    return read_stored(engine, model).vectors


def components(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more) of undirected pairs, each sorted, sorted."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def numpy_groups(vectors: StoredVectors, threshold: float) -> list[list[int]]:
    """Groups of images linked by a cosine at or above the threshold, across categories, by brute force."""
    sims = vectors.vectors @ vectors.vectors.T
    a, b = np.nonzero(np.triu(sims >= threshold, k=1))
    return components([(int(vectors.ids[i]), int(vectors.ids[j])) for i, j in zip(a, b, strict=True)])


def check_groups(engine: Engine, model: str) -> list[list[int]]:
    """Assert that the members, group rows and group count are exactly the links' components; return them."""
    with session_scope(engine, snapshot=True) as s:
        pairs = [
            (int(a), int(b))
            for a, b in s.execute(
                select(NearDuplicateLink.image_a, NearDuplicateLink.image_b).where(NearDuplicateLink.model == model)
            )
        ]
        scores = {
            (int(a), int(b)): float(c)
            for a, b, c in s.execute(
                select(NearDuplicateLink.image_a, NearDuplicateLink.image_b, NearDuplicateLink.score).where(
                    NearDuplicateLink.model == model
                )
            )
        }
        members = s.execute(
            select(NearDuplicateMember.group_id, NearDuplicateMember.image_id).where(NearDuplicateMember.model == model)
        ).all()
        rows = {g.group_id: g for g in s.scalars(select(NearDuplicateGroup).where(NearDuplicateGroup.model == model))}
        state = links_table.state(s, model)
    want = components(pairs)
    by_group: dict[int, list[int]] = {}
    for g, i in members:
        by_group.setdefault(int(g), []).append(int(i))
    assert sorted(sorted(m) for m in by_group.values()) == want
    assert set(rows) == set(by_group)
    for g, ids in by_group.items():
        inside = [sc for (a, b), sc in scores.items() if a in ids]
        assert rows[g].size == len(ids)
        assert abs(rows[g].min_score - min(inside)) < 1e-6 and abs(rows[g].max_score - max(inside)) < 1e-6
    assert (state.groups if state else 0) == len(want)
    return want


def wait_until(done: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)
