"""Local copies kept fresh by notices: a breaker record and the shared cache's keys cost no round
trip while nothing changes, and a write on another replica reaches them.

Round trips are the sends of one store to Redis, counted by ``bench/redis_trips.py``'s proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from app.state.redis import RedisStateStore
from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from bench.redis_trips import TripCounter
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.asyncio]

#: the notices' connection may send one health check (PING) during a test step
HEALTH_CHECKS = 1


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll for what another connection's notice brings (not a wait for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def counter() -> Iterator[TripCounter]:
    counter = TripCounter(REDIS_URL)
    yield counter
    counter.close()


@pytest_asyncio.fixture
async def stores(prefix: str, counter: TripCounter) -> AsyncIterator[tuple[RedisStateStore, RedisStateStore]]:
    """Replica A's store (counted) and replica B's, on one Redis and prefix."""
    a, b = RedisStateStore(counter.url, prefix), RedisStateStore(REDIS_URL, prefix)
    yield a, b
    for store in (a, b):
        await store.aclose()


async def test_a_value_is_read_once_then_from_the_copy_until_another_replica_writes_it(
    stores: tuple[RedisStateStore, RedisStateStore], counter: TripCounter
) -> None:
    a, b = stores
    a.watch.start()
    await eventually(lambda: a.watch.live)
    assert await a.get_cached("cb:up/m1") is None
    sends = counter.sends
    for _ in range(5):
        assert await a.get_cached("cb:up/m1") is None
    assert counter.sends - sends <= HEALTH_CHECKS  # the copy answered

    await b.set("cb:up/m1", b"open|1|boom", ttl_s=60)
    await eventually(lambda: "cb:up/m1" not in a.watch._values)  # B's notice dropped A's copy
    assert await a.get_cached("cb:up/m1") == b"open|1|boom"
    sends = counter.sends
    assert await a.get_cached("cb:up/m1") == b"open|1|boom"
    assert counter.sends - sends <= HEALTH_CHECKS

    await a.delete("cb:up/m1")  # this replica's own write: its copy goes at once
    assert await a.get_cached("cb:up/m1") is None
    assert await b.get_cached("cb:up/m1") is None


def entry(key: str, body: bytes) -> CacheWrite:
    now = time.time()
    return CacheWrite(key, "ns", body, now, now + 60)


async def test_a_key_no_replica_stored_is_read_from_neither_redis_nor_the_table(
    stores: tuple[RedisStateStore, RedisStateStore], counter: TripCounter, tmp_path: Path
) -> None:
    a, b = stores
    url = f"sqlite+aiosqlite:///{tmp_path}/cache.db"
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    tier_a = a.cache_tier(SqlCacheTier(engine, max_total_bytes=1 << 20))
    tier_b = b.cache_tier(SqlCacheTier(engine, max_total_bytes=1 << 20))
    stored = "5" * 64
    try:
        missing = [f"{i:064x}" for i in range(5)]
        await eventually(lambda: not a.may_hold(missing[0]))  # subscribed, and the scan is done
        sends = counter.sends
        for key in missing:
            assert await tier_a.get(key, time.time()) is None
        assert counter.sends - sends <= HEALTH_CHECKS

        await tier_b.put([entry(stored, b"from B")])
        await eventually(lambda: a.may_hold(stored))  # B's notice
        assert await tier_a.get(stored, time.time()) == b"from B"
    finally:
        await tier_a.aclose()
        await tier_b.aclose()
        await engine.dispose()
