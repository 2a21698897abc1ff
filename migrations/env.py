"""Alembic environment: the URL and engine come from Beaver's settings (``api.db.upgrade``)."""

from alembic import context
from sqlmodel import SQLModel

import api.tables  # noqa: F401 — registers the tables on SQLModel.metadata

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from api.db import get_engine
        engine = get_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        # batch mode so ALTERs work on SQLite too
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
