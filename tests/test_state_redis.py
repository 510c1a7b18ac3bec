"""The state store's behaviour, run against memory and the real Redis; the Redis outage fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.config import StateConfig
from app.metrics import Metrics
from app.state import MemoryStateStore, StateStore, build_state_store
from app.state.redis import RedisStateStore
from tests.support import closed_port, gateway
from tests.tcp_proxy import TcpProxy, free_port

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"



@dataclass
class Harness:
    store: StateStore
    advance: Callable[[float], Awaitable[None]]


@pytest_asyncio.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Harness]:
    """Same tests, both stores: memory moves a fake clock, Redis really waits (fractions of a second)."""
    if request.param == "memory":
        now = [1000.0]

        async def tick(seconds: float) -> None:
            now[0] += seconds

        yield Harness(MemoryStateStore(clock=lambda: now[0]), tick)
        return
    store = RedisStateStore(REDIS_URL, prefix)
    try:
        yield Harness(store, asyncio.sleep)
        assert not store.degraded, "Redis at 127.0.0.1:6379 should have answered throughout"
    finally:
        await store.aclose()


# -- behaviour shared by both stores -----------------------------------------------------------


@pytest.mark.asyncio
async def test_gcra_admits_a_full_burst_then_tells_the_wait(harness: Harness) -> None:
    store = harness.store
    waits = [await store.acquire_rate("agent:a", 30, 60.0) for _ in range(30)]
    assert waits == [0.0] * 30
    wait = await store.acquire_rate("agent:a", 30, 60.0)
    assert 1.5 < wait <= 2.0 + 1e-6  # one unit every 60/30 s
    assert await store.acquire_rate("agent:b", 30, 60.0) == 0.0  # keys are independent


@pytest.mark.asyncio
async def test_gcra_refusal_takes_nothing_and_cost_counts(harness: Harness) -> None:
    store = harness.store
    assert await store.acquire_rate("k", 10, 60.0, cost=8) == 0.0
    assert await store.acquire_rate("k", 10, 60.0, cost=3) > 0  # 11 > 10: refused, nothing taken
    assert await store.acquire_rate("k", 10, 60.0, cost=2) == 0.0
    assert await store.acquire_rate("k", 10, 60.0) > 0


@pytest.mark.asyncio
async def test_adjust_rate_gives_back_and_takes_more(harness: Harness) -> None:
    store = harness.store
    for _ in range(5):
        assert await store.acquire_rate("k", 5, 60.0) == 0.0
    assert await store.acquire_rate("k", 5, 60.0) > 0
    store.adjust_rate("k", 5, 60.0, -2)
    assert await store.acquire_rate("k", 5, 60.0) == 0.0
    assert await store.acquire_rate("k", 5, 60.0) == 0.0
    assert await store.acquire_rate("k", 5, 60.0) > 0
    store.adjust_rate("other", 5, 60.0, 5)  # taking more than admitted: the next one waits
    assert 11.0 < await store.acquire_rate("other", 5, 60.0) <= 12.0 + 1e-6


@pytest.mark.asyncio
async def test_gcra_refills_over_time(harness: Harness) -> None:
    store = harness.store
    for _ in range(5):
        assert await store.acquire_rate("k", 5, 0.5) == 0.0
    wait = await store.acquire_rate("k", 5, 0.5)
    assert 0 < wait <= 0.1 + 1e-6
    await harness.advance(0.25)  # half the period: about half the burst is back
    admitted = 0
    while await store.acquire_rate("k", 5, 0.5) == 0.0:
        admitted += 1
    assert 2 <= admitted <= 3


@pytest.mark.asyncio
async def test_record_event_counts_a_sliding_window(harness: Harness) -> None:
    store = harness.store
    assert [await store.record_event("fail:x", 0.3) for _ in range(3)] == [1, 2, 3]
    assert await store.record_event("fail:y", 0.3) == 1
    await harness.advance(0.35)
    assert await store.record_event("fail:x", 0.3) == 1
    await store.delete("fail:x")
    assert await store.record_event("fail:x", 0.3) == 1


@pytest.mark.asyncio
async def test_values_with_ttl_and_set_if_absent(harness: Harness) -> None:
    store = harness.store
    assert await store.get("v") is None
    await store.set("v", b"forever")
    await store.set("t", b"short", ttl_s=0.2)
    assert await store.get("v") == b"forever"
    assert await store.get("t") == b"short"

    assert await store.set_if_absent("lock", b"a", ttl_s=0.2) is True
    assert await store.set_if_absent("lock", b"b", ttl_s=0.2) is False
    assert await store.get("lock") == b"a"

    await harness.advance(0.3)
    assert await store.get("t") is None
    assert await store.get("v") == b"forever"
    assert await store.set_if_absent("lock", b"b", ttl_s=1.0) is True
    assert await store.get("lock") == b"b"

    await store.delete("v")
    assert await store.get("v") is None
    await store.delete("never-set")
    assert await store.ping() is True


# -- Redis only ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_replicas_share_one_limit_exactly(prefix: str) -> None:
    a, b = RedisStateStore(REDIS_URL, prefix), RedisStateStore(REDIS_URL, prefix)
    try:
        calls = [(a if i % 2 else b).acquire_rate("agent:q", 10, 60.0) for i in range(40)]
        waits = await asyncio.gather(*calls)
        assert sum(w == 0.0 for w in waits) == 10
        assert await a.acquire_rate("agent:q", 10, 60.0) > 0
        assert await b.acquire_rate("agent:q", 10, 60.0) > 0
        await a.set("shared", b"1")
        assert await b.get("shared") == b"1"
        assert await a.record_event("e", 5.0) == 1
        assert await b.record_event("e", 5.0) == 2
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.asyncio
async def test_keys_live_under_the_prefix_and_idle_limits_expire(prefix: str) -> None:
    store = RedisStateStore(REDIS_URL, prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        # long enough that a loaded machine still finds them, short enough that they expire idle
        await store.acquire_rate("k", 5, 50.0)
        await store.record_event("e", 50.0)
        await store.set("v", b"x")
        keys = sorted([k.decode() async for k in client.scan_iter(match=prefix + "*")])
        assert keys == [prefix + "gcra:k", prefix + "v:v", prefix + "win:e"]
        assert 0 < await client.pttl(prefix + "gcra:k") <= 10_000  # one unit of 10 s
        assert 0 < await client.pttl(prefix + "win:e") <= 50_000
        assert await client.pttl(prefix + "v:v") == -1
    finally:
        await client.aclose()
        await store.aclose()


@pytest.mark.asyncio
async def test_closed_port_falls_back_to_memory_loudly(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    store = RedisStateStore(f"redis://:secret@127.0.0.1:{free_port()}/0", prefix, metrics=metrics)
    try:
        assert metrics.registry.get_sample_value("admiral_state_degraded") == 0
        with caplog.at_level(logging.WARNING, logger="admiral.state"):
            assert [await store.acquire_rate("k", 3, 60.0) for _ in range(3)] == [0.0] * 3
            assert await store.acquire_rate("k", 3, 60.0) > 0
            await store.set("v", b"x")
            assert await store.get("v") == b"x"
            assert await store.set_if_absent("v", b"y", 1.0) is False
            assert await store.record_event("e", 1.0) == 1
            assert await store.ping() is False
        assert store.degraded
        assert metrics.registry.get_sample_value("admiral_state_degraded") == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per outage, not per call
        assert "unreachable" in warnings[0].getMessage() and "secret" not in warnings[0].getMessage()
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_outage_and_recovery_through_a_proxy(prefix: str) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    metrics = Metrics()
    store = RedisStateStore(f"redis://127.0.0.1:{proxy.port}/0", prefix, metrics=metrics, probe_interval_s=0.05)
    try:
        await store.set("v", b"from-redis")
        for _ in range(4):
            assert await store.acquire_rate("k", 5, 60.0) == 0.0
        assert await store.ping() is True

        await proxy.stop()
        assert await store.get("v") is None  # a fresh in-process store answers
        assert store.degraded and await store.ping() is False
        for _ in range(5):  # the outage has its own, per-replica allowance
            assert await store.acquire_rate("k", 5, 60.0) == 0.0
        await store.set("during", b"x")
        assert metrics.registry.get_sample_value("admiral_state_degraded") == 1

        await proxy.start()
        for _ in range(100):
            if not store.degraded:
                break
            await asyncio.sleep(0.05)
        assert not store.degraded and await store.ping() is True
        assert metrics.registry.get_sample_value("admiral_state_degraded") == 0
        # resynchronised: Redis's view again (4 of 5 taken before the outage), outage writes dropped
        assert await store.get("v") == b"from-redis"
        assert await store.get("during") is None
        assert await store.acquire_rate("k", 5, 60.0) == 0.0
        assert await store.acquire_rate("k", 5, 60.0) > 0
    finally:
        await store.aclose()
        await proxy.stop()


@pytest.mark.asyncio
async def test_factory_builds_the_redis_store(prefix: str) -> None:
    store = build_state_store(StateConfig(url=REDIS_URL, key_prefix=prefix), Metrics())
    try:
        assert isinstance(store, RedisStateStore)
        await store.set("v", b"1")
        client = aioredis.Redis.from_url(REDIS_URL)
        assert await client.get(prefix + "v:v") == b"1"
        await client.aclose()
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_a_redis_that_hangs_times_out_into_the_fallback(prefix: str) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", prefix, timeout_s=0.1)
    try:
        started = asyncio.get_running_loop().time()
        assert await store.acquire_rate("k", 1, 60.0) == 0.0
        assert asyncio.get_running_loop().time() - started < 1.0
        assert store.degraded
        assert await store.acquire_rate("k", 1, 60.0) > 0  # now answered at once, in-process
    finally:
        await store.aclose()
        server.close()


def _gateway_config(state_url: str, prefix: str) -> str:
    return f"""
providers:
  demo: {{kind: demo}}
models:
  demo: [demo/echo]
routing: {{default: demo}}
state: {{url: "{state_url}", key_prefix: "{prefix}"}}
"""


def test_gateway_readiness_reports_redis_and_its_outage(prefix: str) -> None:
    with gateway(_gateway_config(REDIS_URL, prefix)) as gw:
        ready = httpx.get(f"{gw.url}/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["state"] == {"ok": True}

    with closed_port() as port, gateway(_gateway_config(f"redis://127.0.0.1:{port}/0", prefix)) as gw:
        ready = httpx.get(f"{gw.url}/health/ready")
        assert ready.status_code == 200  # requests are served from this replica's memory: stays in rotation
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["state"] == {"ok": False, "degraded": True}
        assert gw.services.metrics.registry.get_sample_value("admiral_state_degraded") == 1
        chat = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200
