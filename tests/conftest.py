from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_upstream import FakeUpstream
from tests.serve import NewDatabase, PgDatabases, pg_available


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def upstream2() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="session")
def _pg_databases() -> Iterator[PgDatabases]:
    why = pg_available()
    if why:
        pytest.skip(why)
    PgDatabases.drop_stale()
    databases = PgDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture
def new_pg_database(_pg_databases: PgDatabases) -> NewDatabase:
    """Call it for the URL of a fresh, empty PostgreSQL database (dropped at the end of the session)."""
    return _pg_databases.create
