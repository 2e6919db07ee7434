"""Alembic environment: uses the connection the app passes in, or the app's configured database."""

from alembic import context

from backend.storage.schema import Base

connection = context.config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    from backend.storage.engine import get_engine

    with get_engine().begin() as conn:
        run(conn)
