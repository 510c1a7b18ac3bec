"""Alembic upgrade to head on a database URL (the CLI's ``migrate`` and the SQLite self-upgrade)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from importlib import resources

# Alembic announces each of its autogenerate plugins at INFO when it is imported: seven lines of
# noise at the top of every start. Its migration lines ("Running upgrade ...") stay.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("app.migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Blocking: call it from a thread when an event loop is running.

    Processes that upgrade one SQLite file do it one at a time (``serve --workers N`` starts N
    self-upgrading workers at once): two would both find the tables missing and one would fail to
    create them, and with it the worker's start.
    """
    with _sqlite_upgrade_lock(url):
        command.upgrade(alembic_config(url), "head")


@contextlib.contextmanager
def _sqlite_upgrade_lock(url: str) -> Iterator[None]:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        yield
        return
    # a file of its own: SQLite's own locks on the database file are POSIX locks, which closing any
    # other descriptor of that file in this process would drop
    with open(f"{parsed.database}-upgrade.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def known_revisions(url: str) -> tuple[str | None, frozenset[str]]:
    """The head revision and every revision this gateway's migrations know."""
    script = ScriptDirectory.from_config(alembic_config(url))
    return script.get_current_head(), frozenset(r.revision for r in script.walk_revisions())


async def schema_problem(engine: AsyncEngine, head: str | None, known: frozenset[str]) -> str | None:
    """None when the database is at ``head``, else what is wrong and what to do about it."""

    def current(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        revision = await conn.run_sync(current)
    if revision == head:
        return None
    if revision is not None and revision not in known:
        return f"database schema at revision {revision} is newer than this gateway knows (head {head}): upgrade the gateway"
    found = f"at revision {revision}" if revision else "not initialised"
    return f"database schema {found}, expected {head}: run admiral-optimizer migrate"
