"""No duplicate upstream call between replicas once a leader's answer is complete.

Replica A answers a request; the same request then goes to replica B the moment A's answer has
ended (plain or streamed, many times in a row). B must answer it without calling upstream: A stored
the answer where every replica reads it before it let the flight go. The upstream's counter is the
proof. A coordinator test covers the narrower race: a request that missed the cache just before
the flight ended, and reaches single flight just after.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from app.clock import Clock
from app.config import CacheConfig
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import RequestContext
from app.pipeline.inflight_redis import RedisInflight
from app.pipeline.shared_answers import CacheAnswers
from app.state.redis import RedisStateStore
from app.storage.cache_tiers import SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.response_cache import ResponseCache
from tests.conftest import REDIS_URL
from tests.fake_upstream import FakeUpstream
from tests.replicas import replicas
from tests.serve import NewDatabase
from tests.test_dedupe import KEY_A, config

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ROUNDS = 25


def test_a_plain_request_right_after_the_leader_ends_is_answered_on_the_other_replica(
    upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase
) -> None:
    with (
        replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as (a, b),
        httpx.Client(timeout=20, headers={"Authorization": f"Bearer {KEY_A}"}) as client,
    ):
        for i in range(ROUNDS):
            body = {"model": "fast", "messages": [{"role": "user", "content": f"window {i}"}]}
            first = client.post(f"{a.base_url}/chat/completions", json=body)
            assert first.status_code == 200 and first.headers["x-admiral-cache"] == "miss"
            second = client.post(f"{b.base_url}/chat/completions", json=body)
            assert second.status_code == 200 and second.headers["x-admiral-cache"] == "hit", i
            assert second.json()["choices"] == first.json()["choices"]
            assert upstream.calls == i + 1, f"round {i}: replica B called upstream again"


def test_a_stream_right_after_the_leaders_stream_ends_is_answered_on_the_other_replica(
    upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase
) -> None:
    with replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as (a, b):

        async def text(base_url: str, content: str) -> str:
            async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY_A, max_retries=0) as client:
                stream = await client.chat.completions.create(model="fast", messages=[{"role": "user", "content": content}], stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def run() -> None:
            for i in range(ROUNDS):
                assert await text(a.base_url, f"stream window {i}") == f"echo: stream window {i}"
                assert await text(b.base_url, f"stream window {i}") == f"echo: stream window {i}"
                assert upstream.calls == i + 1, f"round {i}: replica B called upstream again"

        asyncio.run(run())


@pytest.mark.asyncio
async def test_a_request_that_missed_the_cache_as_the_flight_ended_does_not_call_again(prefix: str, new_pg_database: NewDatabase) -> None:
    """B's cache read came before A stored the answer, B's single flight after A let go: B still gets A's answer."""
    url = new_pg_database()
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    stores = [RedisStateStore(REDIS_URL, prefix, metrics=Metrics()) for _ in range(2)]
    caches = [ResponseCache.from_config(CacheConfig(), store.cache_tier(SqlCacheTier(engine, max_total_bytes=1 << 20)), Clock()) for store in stores]
    coordinators = [RedisInflight(store) for store in stores]
    for coordinator, cache in zip(coordinators, caches, strict=True):
        coordinator.share_answers(CacheAnswers(cache))
    calls = 0
    body = {
        "id": "chatcmpl-w",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "once"}, "finish_reason": "stop"}],
    }

    async def upstream(ctx: RequestContext) -> Answer:
        nonlocal calls
        calls += 1
        ctx.backend = "up"
        return Answer(body=body)

    try:
        for i in range(10):
            key = f"{i:064x}"
            missed = await caches[1].get(key)  # B looks in the cache while A's flight still runs
            assert missed is None
            led = await coordinators[0].join(key, RequestContext(request_id="r"), upstream)
            assert (await led.result()).body == body
            ctx = RequestContext(request_id="r")
            ctx.cache_status = "miss"
            late = await coordinators[1].join(key, ctx, upstream)  # ... and reaches single flight after it ended
            assert (await late.result()).body["choices"] == body["choices"]
            assert ctx.cache_status == "hit" and ctx.backend == "up"
            assert calls == i + 1
    finally:
        for coordinator in coordinators:
            await coordinator.aclose()
        for cache in caches:
            await cache.aclose()
        for store in stores:
            await store.aclose()
        await engine.dispose()
