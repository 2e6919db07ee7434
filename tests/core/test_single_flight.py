"""SingleFlight with real threads: one computation however many callers, stale reads that never wait."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.core.single_flight import SingleFlight


class Slow:
    """A computation that counts its runs and can be held open until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.running = 0
        self.most_at_once = 0
        self.release = threading.Event()
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> object:
        with self._lock:
            self.runs += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        assert self.release.wait(10)
        with self._lock:
            self.running -= 1
        return value


def test_concurrent_callers_share_one_computation() -> None:
    flight: SingleFlight[object] = SingleFlight("test")
    slow = Slow()
    with ThreadPoolExecutor(16) as pool:
        answers = [pool.submit(flight.get, 1, lambda: slow("one")) for _ in range(16)]
        assert slow.started.wait(5)
        time.sleep(0.2)  # every caller has arrived and waits
        slow.release.set()
        assert [a.result(5) for a in answers] == ["one"] * 16
    assert slow.runs == 1
    assert flight.get(1, lambda: slow("again")) == "one"  # kept for its key
    assert flight.get(2, lambda: slow("two")) == "two" and slow.runs == 2


def test_latest_never_waits_and_refreshes_once_in_the_background() -> None:
    flight: SingleFlight[object] = SingleFlight("test")
    assert flight.latest(1, lambda: "first").value == "first"  # nothing kept yet: computed here
    slow = Slow()
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        seen = list(pool.map(lambda _: flight.latest(2, lambda: slow("second")), range(64)))
    assert time.perf_counter() - started < 2  # nobody waited for the held computation
    assert {k.value for k in seen} == {"first"} and {k.key for k in seen} == {1}
    assert slow.started.wait(5) and slow.runs == 1  # one refresh for 64 stale reads
    slow.release.set()
    deadline = time.monotonic() + 5
    while flight.latest(2, lambda: slow("never")).key != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flight.latest(2, lambda: slow("never")).value == "second" and slow.runs == 1 and slow.most_at_once == 1


def test_a_young_value_is_not_refreshed() -> None:
    flight: SingleFlight[object] = SingleFlight("test")
    flight.latest(1, lambda: "first")
    assert flight.latest(2, lambda: pytest.fail("refreshed too soon"), min_age_s=60).value == "first"
    assert flight.kept is not None and flight.kept.age_seconds < 60


def test_a_failure_reaches_its_waiters_and_the_next_caller_tries_again() -> None:
    flight: SingleFlight[object] = SingleFlight("test")
    release = threading.Event()

    def failing() -> object:
        release.wait(5)
        raise ValueError("database away")

    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(flight.get, 1, failing) for _ in range(8)]
        time.sleep(0.2)
        release.set()
        for a in answers:
            with pytest.raises(ValueError, match="database away"):
                a.result(5)
    assert flight.get(1, lambda: "back") == "back"


def test_a_failed_background_refresh_keeps_the_last_value() -> None:
    flight: SingleFlight[object] = SingleFlight("test")
    flight.latest(1, lambda: "first")
    failed = threading.Event()

    def failing() -> object:
        failed.set()
        raise ValueError("timeout")

    assert flight.latest(2, failing).value == "first"
    assert failed.wait(5)
    time.sleep(0.1)
    assert flight.latest(2, lambda: "second").value == "first"  # the retry runs in the background
    deadline = time.monotonic() + 5
    while flight.latest(2, lambda: "second").value != "second" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flight.latest(2, lambda: "never").value == "second"
