"""One computation at a time of a value that follows a changing key (the catalogue's change number).

Concurrent callers never compute side by side: they wait for the computation under way, or take the last
value; so an expensive view costs one computation's memory whatever the number of readers.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kept(Generic[T]):
    key: object  # what the value was computed for
    value: T
    made_at: float  # time.time() when it was ready

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.made_at)


class SingleFlight(Generic[T]):
    """The last value computed, and at most one computation under way (in a caller or in the background)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._kept: Kept[T] | None = None
        self._busy = False
        self._finished = 0  # computations finished so far: a waiter wakes when it moves
        self._error: Exception | None = None  # the last computation's failure, shown to its waiters

    @property
    def kept(self) -> Kept[T] | None:
        return self._kept

    def get(self, key: object, make: Callable[[], T]) -> T:
        """The value for `key`: the kept one, or the one being computed (whichever key it is for, which
        is at most as old as the catalogue when this caller asked), or computed here."""
        with self._cond:
            kept = self._kept
            if kept is not None and kept.key == key:
                return kept.value
            if self._busy:
                return self._wait().value
            self._busy = True
        return self._compute(key, make).value

    def latest(self, key: object, make: Callable[[], T], min_age_s: float = 0.0) -> Kept[T]:
        """The kept value whatever its key, never waiting for a computation when there is one; when it is
        for another key and older than `min_age_s`, a computation for `key` starts in the background.
        Only when nothing is kept yet does the caller wait for (or run) the first computation."""
        with self._cond:
            kept = self._kept
            if kept is None:
                if self._busy:
                    return self._wait()
                self._busy = True
            else:
                if kept.key != key and not self._busy and kept.age_seconds >= min_age_s:
                    self._busy = True
                    threading.Thread(target=self._background, args=(key, make), name=self._name, daemon=True).start()
                return kept
        return self._compute(key, make)

    def _wait(self) -> Kept[T]:
        """Wait (holding the condition) for the computation under way; its value, or its failure raised."""
        finished = self._finished
        self._cond.wait_for(lambda: self._finished != finished)
        if self._error is not None:
            raise self._error
        if self._kept is None:
            raise RuntimeError(f"{self._name}: the computation waited for was interrupted")
        return self._kept

    def _compute(self, key: object, make: Callable[[], T]) -> Kept[T]:
        kept: Kept[T] | None = None
        error: Exception | None = None
        try:
            kept = Kept(key, make(), time.time())
            return kept
        except Exception as exc:
            error = exc
            raise
        finally:
            with self._cond:
                if kept is not None:
                    self._kept = kept
                self._error = error
                self._busy = False
                self._finished += 1
                self._cond.notify_all()

    def _background(self, key: object, make: Callable[[], T]) -> None:
        try:
            self._compute(key, make)
        except Exception:  # the kept value stays; the next caller past min_age_s tries again
            log.exception("%s: computing in the background failed; the last value is kept", self._name)
