"""Several replicas act as one gateway: one set of limits, one cache, one view of each backend's
health — and requests keep being served when Redis goes away.

Replicas share the real Redis (a fresh key prefix per test) and a fresh PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from sqlalchemy import delete

from app.metrics import Metrics
from app.state.redis import RedisStateStore, open_client
from app.state.redis_cache import LayeredTier, RedisCacheTier
from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.models import CacheEntry
from tests.conftest import REDIS_URL
from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.replicas import replicas
from tests.resilience_support import AGENT_KEY, PROVIDER_KEY, post, sample, two_upstreams, wait_until
from tests.serve import NewDatabase
from tests.support import GatewayServer, closed_port
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis


def cache_config(up: FakeUpstream) -> str:
    return f"""
keys:
  - {{key: {AGENT_KEY}, agent: tester, rpm: 1000}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 5}}
models:
  fast: [up/m1]
retry: {{attempts: 1}}
"""


def ask(gw: GatewayServer, text: str) -> httpx.Response:
    return post(gw, messages=[{"role": "user", "content": text}])


def flush(gw: GatewayServer) -> None:
    """Write the replica's pending cache entries to the shared tiers now (they go in the background)."""
    assert gw.services.cache is not None
    gw.call(gw.services.cache.flush())


def cache_keys(prefix: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}cache:*"))
    finally:
        client.close()


def ready(gw: GatewayServer) -> httpx.Response:
    return httpx.get(f"{gw.url}/health/ready", timeout=10)


# -- two gateways, one Redis, one PostgreSQL ---------------------------------------------------


@pytest.mark.postgres
def test_rpm_10_across_two_replicas_admits_exactly_10(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path, prefix: str, new_pg_database: NewDatabase) -> None:
    config = two_upstreams(upstream, upstream2, tmp_path, key_extra=", rpm: 10")
    with replicas(config, prefix=prefix, database_url=new_pg_database()) as (a, b):
        answers = [post(gw) for gw in [a, b] * 8]
        assert [r.status_code for r in answers] == [200] * 10 + [429] * 6
        assert all(1 <= int(r.headers["retry-after"]) <= 6 for r in answers[10:])  # one request every 60/10 s
        assert upstream.calls + upstream2.calls == 10
        assert sample(a, "admiral_ratelimit_rejections_total", scope="agent") == sample(b, "admiral_ratelimit_rejections_total", scope="agent") == 3


@pytest.mark.postgres
def test_an_answer_cached_via_one_replica_is_a_hit_on_the_others(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    with replicas(cache_config(upstream), prefix=prefix, database_url=new_pg_database(), count=3) as (a, b, c):
        first = ask(a, "shared answer")
        assert first.headers["x-admiral-cache"] == "miss"
        flush(a)
        (key,) = cache_keys(prefix)
        client = redis.Redis.from_url(REDIS_URL)
        try:
            assert 3_590_000 < client.pttl(key) <= 3_600_000  # cache.ttl_s, as a native TTL

            client.delete(key)  # gone from Redis: the database tier answers, and Redis has it again
            hit = ask(b, "shared answer")
            assert hit.headers["x-admiral-cache"] == "hit" and hit.json() == first.json()
            assert cache_keys(prefix) == [key] and client.pttl(key) > 3_500_000

            a.call(_delete_cache_rows(a))  # gone from the database: Redis answers a replica that never saw it
            hit = ask(c, "shared answer")
            assert hit.headers["x-admiral-cache"] == "hit" and hit.json() == first.json()
            assert hit.headers["x-admiral-backend"] == "up"
        finally:
            client.close()
        assert upstream.calls == 1


async def _delete_cache_rows(gw: GatewayServer) -> None:
    async with gw.services.db.begin() as conn:
        assert (await conn.execute(delete(CacheEntry))).rowcount == 1


@pytest.mark.postgres
def test_a_circuit_opened_on_one_replica_keeps_the_other_away(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path, prefix: str, new_pg_database: NewDatabase) -> None:
    upstream.behaviour = "500"
    clock = ManualClock()  # both replicas' clock: breaker deadlines are compared across them
    config = two_upstreams(upstream, upstream2, tmp_path, models_extra="  solo: [up/m1]")
    with replicas(config, prefix=prefix, database_url=new_pg_database(), clock=clock) as (a, b):
        for _ in range(5):
            assert post(a).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 5  # failure_threshold reached on A

        assert post(b).headers["x-admiral-backend"] == "up2"
        alone = post(b, model="solo")
        assert alone.status_code == 503 and "up/m1: circuit open" in alone.json()["error"]["message"]
        assert upstream.calls == 5  # B never called it
        assert sample(b, "admiral_circuit_state", backend="up") == 2

        clock.advance(300)  # cooldown over: one half-open probe for the whole deployment
        upstream.behaviour = "ok"
        assert post(b).headers["x-admiral-backend"] == "up"
        assert post(a).headers["x-admiral-backend"] == "up"  # closed for A too
        assert upstream.calls == 7


# -- Redis away --------------------------------------------------------------------------------


class RedisProxy:
    """A :class:`TcpProxy` to the real Redis, run on a loop of its own so sync tests can cut it."""

    def __init__(self) -> None:
        self._proxy = TcpProxy(6379)
        self.url = f"redis://127.0.0.1:{self._proxy.port}/0"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="redis-proxy", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> None:
        self._run(self._proxy.start())

    def stop(self) -> None:
        self._run(self._proxy.stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@contextmanager
def redis_proxy() -> Iterator[RedisProxy]:
    proxy = RedisProxy()
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.postgres
def test_redis_cut_mid_test_both_replicas_keep_serving_and_resync(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase, caplog: pytest.LogCaptureFixture) -> None:
    with redis_proxy() as proxy, replicas(cache_config(upstream), prefix=prefix, database_url=new_pg_database(), redis_url=proxy.url) as (a, b):
        assert ask(a, "before").headers["x-admiral-cache"] == "miss"
        flush(a)
        assert ask(b, "before").headers["x-admiral-cache"] == "hit"

        with caplog.at_level(logging.WARNING):
            proxy.stop()
            assert ask(a, "during").headers["x-admiral-cache"] == "miss"
            flush(a)  # into the database only
            during = ask(b, "during")
            assert during.status_code == 200 and during.headers["x-admiral-cache"] == "hit"  # nothing lost
            for gw in (a, b):
                assert [ask(gw, f"more {gw.port} {i}").status_code for i in range(3)] == [200] * 3
                assert sample(gw, "admiral_state_degraded") == 1
                # still served, so still ready: the body says degraded (a Redis outage must not take every replica out of rotation)
                degraded = ready(gw)
                assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
                assert degraded.json()["checks"]["state"] == {"ok": False, "degraded": True}
        warnings = [r.name for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings.count("admiral.state") == 2 and "admiral.cache" not in warnings  # once per replica, not per request
        assert upstream.calls == 8

        flush(a)
        flush(b)
        proxy.start()
        wait_until(lambda: not a.services.state.degraded and not b.services.state.degraded)  # each probes every second
        for gw in (a, b):
            assert sample(gw, "admiral_state_degraded") == 0 and ready(gw).status_code == 200
        assert ask(a, "after").headers["x-admiral-cache"] == "miss"
        flush(a)
        assert len(cache_keys(prefix)) == 2  # "before" and "after": Redis is written again
        assert ask(b, "after").headers["x-admiral-cache"] == "hit"
        assert upstream.calls == 9


@pytest.mark.postgres
def test_replicas_started_without_redis_serve_and_share_the_database_tier(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    with closed_port() as port, replicas(cache_config(upstream), prefix=prefix, database_url=new_pg_database(), redis_url=f"redis://127.0.0.1:{port}/0") as (a, b):
        assert ask(a, "no redis").headers["x-admiral-cache"] == "miss"
        flush(a)
        assert ask(b, "no redis").headers["x-admiral-cache"] == "hit"
        assert a.services.state.degraded and b.services.state.degraded
        assert upstream.calls == 1


# -- the tiers against the real Redis ----------------------------------------------------------


def entry(key: str, body: bytes = b"answer", created_at: float = 1000.0, ttl_s: float = 60.0) -> CacheWrite:
    return CacheWrite(key, "ns", body, created_at, created_at + ttl_s)


@pytest.mark.asyncio
async def test_redis_tier_keys_ttl_and_prefix(prefix: str) -> None:
    tier = RedisCacheTier(aioredis.Redis.from_url(REDIS_URL), prefix)
    other = RedisCacheTier(aioredis.Redis.from_url(REDIS_URL), prefix + "other:")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await tier.put([entry("k"), entry("expired", ttl_s=0.0), entry("short", ttl_s=0.05)])
        assert await tier.get("k", 1059.9) == b"answer"
        assert await tier.get("k", 1060.0) is None  # expired by the caller's clock, whatever Redis's says
        assert await tier.get("expired", 1000.0) is None and await tier.get("missing", 1000.0) is None
        assert await other.get("k", 1000.0) is None  # another prefix, another cache
        assert 59_000 < await client.pttl(prefix + "cache:k") <= 60_000
        await asyncio.sleep(0.1)
        assert await client.exists(prefix + "cache:short") == 0  # Redis dropped it by itself
        assert sorted([k.decode() async for k in client.scan_iter(match=prefix + "*")]) == [prefix + "cache:k"]
        assert await tier.sweep(5000.0) == 0
        await tier.put([])
    finally:
        await client.aclose()
        await tier.aclose()
        await other.aclose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/admiral.db"
    upgrade_to_head(url)
    return url


@pytest.mark.asyncio
async def test_layered_tier_reads_through_and_copies_back_to_redis(prefix: str, sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    state = RedisStateStore(REDIS_URL, prefix)
    sql = SqlCacheTier(engine, max_total_bytes=1 << 20)
    tier = LayeredTier(RedisCacheTier(open_client(REDIS_URL, timeout_s=0.5), prefix), sql, state)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await tier.put([entry("k")])
        assert await sql.get("k", 1000.0) == b"answer" and await client.exists(prefix + "cache:k") == 1

        await client.delete(prefix + "cache:k")
        assert await tier.get("k", 1030.0) == b"answer"  # from the table ...
        assert 29_000 < await client.pttl(prefix + "cache:k") <= 30_000  # ... back in Redis for the rest of its life
        assert await tier.get("k", 1060.0) is None

        await client.hset(prefix + "cache:wrong", "field", "value")
        with pytest.raises(ResponseError):  # Redis answers: a fault, raised rather than taken for an outage
            await tier.get("wrong", 1000.0)
        assert not state.degraded
    finally:
        await client.aclose()
        await tier.aclose()
        await state.aclose()
        await engine.dispose()


@pytest.mark.asyncio
async def test_layered_tier_loses_nothing_while_redis_is_away(prefix: str, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    metrics = Metrics()
    engine = create_engine(sqlite_url)
    state = RedisStateStore(url, prefix, metrics=metrics, probe_interval_s=0.05)
    tier = LayeredTier(RedisCacheTier(open_client(url, timeout_s=0.5), prefix), SqlCacheTier(engine, max_total_bytes=1 << 20), state)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await tier.put([entry("before")])
        await proxy.stop()
        with caplog.at_level(logging.WARNING):
            assert await tier.get("before", 1000.0) == b"answer"  # the table answers
            await tier.put([entry("during", b"written while Redis was away")])
            assert await tier.get("during", 1000.0) == b"written while Redis was away"
            assert await tier.sweep(1000.0) == 0
        assert state.degraded and metrics.registry.get_sample_value("admiral_state_degraded") == 1
        assert [r.name for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("admiral")] == ["admiral.state"]

        await proxy.start()
        for _ in range(200):
            if not state.degraded:
                break
            await asyncio.sleep(0.05)
        assert not state.degraded
        assert await client.exists(prefix + "cache:during") == 0
        assert await tier.get("during", 1000.0) == b"written while Redis was away"
        assert await client.exists(prefix + "cache:during") == 1  # resynchronised as it is read
    finally:
        await client.aclose()
        await tier.aclose()
        await state.aclose()
        await engine.dispose()
        await proxy.stop()
