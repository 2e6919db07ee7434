"""What a page polling `/status` and the server's idle refresh tick cost the database, counted in statements
against a real PostgreSQL: `/status` reads one statement and never waits on index work (a refresh holding
every lock of the live index, the change log's and the links' advisory locks held by another connection);
an idle tick reads one statement and links nothing."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, event, text

from backend.services.assembly import Services
from backend.services.index_lifecycle import IndexLifecycle
from backend.services.search import SearchService
from backend.storage import change_log
from backend.storage import near_duplicates as links_table
from backend.storage.engine import session_scope

pytestmark = pytest.mark.usefixtures("engine")


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements `engine` sends while the block runs (BEGIN/COMMIT are not statements here)."""
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.fixture
def lifecycle(writable_service: SearchService) -> IndexLifecycle:
    services = Services.around(writable_service)
    services.lifecycle.load()
    for _ in range(3):  # links for the stored images, then the ticks have nothing left to do
        services.lifecycle.refresh()
    return services.lifecycle


def test_status_reads_the_database_in_one_statement(lifecycle: IndexLifecycle) -> None:
    with statements(lifecycle.engine) as seen:
        status = lifecycle.status()
    assert len(seen) == 1, seen
    assert status.index.current and status.database.images == lifecycle.cache.loaded.ntotal  # type: ignore[union-attr]
    assert sum(c.images for c in status.database.categories) == status.database.images


def test_status_answers_while_a_refresh_holds_the_index_and_the_locks(lifecycle: IndexLifecycle, engine: Engine) -> None:
    """Every lock a refresh, a rebuild or a link step holds is held here; /status still answers at once,
    and says the index is not current once another writer's change is committed behind it."""
    cache = lifecycle.cache
    with engine.connect() as other:
        with other.begin():
            other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": change_log.CHANGE_LOCK})
            other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": links_table.LINKS_LOCK})
            with cache._build, cache._apply, cache.lock.write(), ThreadPoolExecutor(1) as pool:
                status = pool.submit(lifecycle.status).result(timeout=5)
    assert status.index.loaded and status.index.current
    with session_scope(engine) as session:  # a change the live index has not applied (another process's)
        session.execute(text("SELECT nextval('catalogue_change_seq')"))
        session.execute(text("UPDATE catalogue_meta SET deletions_pruned_through = currval('catalogue_change_seq')"))
    with cache.lock.write(), ThreadPoolExecutor(1) as pool:
        status = pool.submit(lifecycle.status).result(timeout=5)
    assert not status.index.current


def test_an_idle_tick_reads_one_statement(lifecycle: IndexLifecycle) -> None:
    with statements(lifecycle.engine) as seen:
        lifecycle.refresh()
    assert len(seen) == 1, seen
    assert lifecycle.cache.is_current()


def test_a_tick_after_a_write_links_it_then_goes_idle_again(lifecycle: IndexLifecycle, engine: Engine) -> None:
    with session_scope(engine) as session:  # another process's write: a prototype change moves the seq
        session.execute(text("UPDATE prototypes SET count = count WHERE category_id = (SELECT min(category_id) FROM prototypes)"))
    before = lifecycle.cache.seq
    with statements(engine) as seen:
        lifecycle.refresh()
    assert lifecycle.cache.seq > before and len(seen) > 1  # the change was applied and the link step ran
    with statements(engine) as seen:
        lifecycle.refresh()
    assert len(seen) == 1, seen
