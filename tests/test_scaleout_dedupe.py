"""Single flight across replicas: one upstream call for identical requests on any replica.

Gateway tests run two replicas on the real Redis and PostgreSQL (the upstream's counter proves
the claim); coordinator tests put two :class:`RedisInflight` on two state stores (two replicas'
worth) to script leaders that fail, vanish or leave.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from sqlalchemy import select

from app.errors import GatewayError, UpstreamClientError, UpstreamError, UpstreamRateLimitError
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, RequestContext
from app.pipeline.inflight import Ticket
from app.pipeline.inflight_redis import RedisInflight
from app.state.redis import RedisStateStore
from app.storage.db import create_engine
from app.storage.models import RequestLog
from tests.conftest import REDIS_URL
from tests.fake_upstream import FakeUpstream
from tests.replicas import replicas
from tests.serve import NewDatabase
from tests.support import GatewayServer, closed_port, free_port
from tests.tcp_proxy import TcpProxy
from tests.test_dedupe import HELLO, KEY_A, assert_one_shared_answer, chat, coalesced, config, no_flights_left, post

pytestmark = pytest.mark.redis


def spread(gws: list[GatewayServer], count: int) -> list[GatewayServer]:
    """``count`` requests' gateways, alternating between the replicas."""
    return [gws[i % len(gws)] for i in range(count)]


async def log_rows(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(select(RequestLog))).all())
    finally:
        await engine.dispose()


# -- two gateways ----------------------------------------------------------------------------


def test_ten_identical_requests_over_two_replicas_make_one_call(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    upstream.behaviour = "slow:3"
    database = new_pg_database()
    with replicas(config(upstream), prefix=prefix, database_url=database) as gws:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for gw in spread(gws, 10)))

        responses = asyncio.run(run())
        assert_one_shared_answer(responses, upstream, 10)
        assert sum(coalesced(gw) for gw in gws) == 9
        for gw in gws:
            no_flights_left(gw)
    # the log rows (flushed as the replicas stopped) carry the leader's backend and usage on both
    rows = asyncio.run(log_rows(database))
    assert Counter(r.dedupe for r in rows) == {"leader": 1, "follower": 9}
    assert {(r.backend, r.deployment_model, r.prompt_tokens, r.completion_tokens) for r in rows} == {("up", "fake-model", 2, 3)}


def test_ten_identical_streams_over_two_replicas_make_one_call_and_arrive_live(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    upstream.latency = 2.0  # every request joins before the first chunk
    upstream.behaviour = "dribble:0.3"
    with replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as gws:

        async def one(client: openai.AsyncOpenAI) -> tuple[str | None, str, str | None, int]:
            events = await client.chat.completions.create(model="fast", messages=HELLO, stream=True)
            upstream_open_at_first = -1
            chunks = []
            async for chunk in events:
                if not chunks:
                    upstream_open_at_first = upstream.inflight
                chunks.append(chunk)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return events.response.headers.get("x-admiral-dedupe"), text, chunks[-1].choices[0].finish_reason, upstream_open_at_first

        async def run() -> list[tuple[str | None, str, str | None, int]]:
            clients = [openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY_A, max_retries=0) for gw in gws]
            try:
                return await asyncio.gather(*(one(clients[i % 2]) for i in range(10)))
            finally:
                for client in clients:
                    await client.close()

        results = asyncio.run(run())
        assert upstream.calls == 1
        assert [(text, finish) for _, text, finish, _ in results] == [("echo: hello dedupe", "stop")] * 10
        assert Counter(role for role, _, _, _ in results)["follower"] == 9
        # every client had its first chunk while the one upstream stream was still going
        assert [open_ for _, _, _, open_ in results] == [1] * 10
        for gw in gws:
            no_flights_left(gw)


@pytest.mark.parametrize(("behaviour", "status"), [("status:400", 400), ("500", 502)])
def test_the_leaders_error_is_every_replicas_answer(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase, behaviour: str, status: int) -> None:
    upstream.behaviour = behaviour
    upstream.latency = 2.0
    with replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as gws:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for gw in spread(gws, 6)))

        responses = asyncio.run(run())
        assert upstream.calls == 1
        assert [r.status_code for r in responses] == [status] * 6
        assert len({r.content for r in responses}) == 1
        assert "error" in responses[0].json()


def test_with_redis_down_each_replica_still_dedupes_on_its_own(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    upstream.behaviour = "slow:2"
    with closed_port() as port, replicas(config(upstream), prefix=prefix, database_url=new_pg_database(), redis_url=f"redis://127.0.0.1:{port}/0") as gws:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for gw in spread(gws, 10)))

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 10
        assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
        assert upstream.calls == 2  # one per replica
        assert sum(coalesced(gw) for gw in gws) == 8
        assert all(gw.services.metrics.registry.get_sample_value("admiral_state_degraded") == 1 for gw in gws)


# -- two coordinators ------------------------------------------------------------------------


class HeldCall:
    """A shared call held open until the test says: counts its runs; a stream yields what is fed."""

    def __init__(self, name: str, *, stream: bool = False) -> None:
        self.name = name
        self.stream = stream
        self.runs = 0
        self.started = asyncio.Event()
        self.answer = asyncio.Event()
        self.error: BaseException | None = None
        self.fed: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

    def body(self) -> dict[str, Any]:
        return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": self.name}, "finish_reason": "stop"}], "usage": {"total_tokens": len(self.name)}}

    async def __call__(self, ctx: RequestContext) -> Answer:
        self.runs += 1
        self.started.set()
        ctx.deployment = Deployment(self.name, "model-" + self.name)
        ctx.backend = self.name
        await self.answer.wait()
        if self.error is not None:
            raise self.error
        if not self.stream:
            return Answer(body=self.body())  # type: ignore[arg-type]
        return Answer(chunks=self._chunks())  # type: ignore[arg-type]

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        while (item := await self.fed.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


@pytest_asyncio.fixture
async def stores(prefix: str) -> AsyncIterator[list[RedisStateStore]]:
    """Two replicas' state stores on the same Redis and prefix."""
    pair = [RedisStateStore(REDIS_URL, prefix) for _ in range(2)]
    yield pair
    for store in pair:
        await store.aclose()


@pytest_asyncio.fixture
async def coordinators(stores: list[RedisStateStore]) -> AsyncIterator[list[RedisInflight]]:
    pair = [RedisInflight(store) for store in stores]
    yield pair
    for coordinator in pair:
        await coordinator.aclose()


async def lead_and_follow(coordinators: list[RedisInflight], a: HeldCall, b: HeldCall) -> tuple[Ticket, Ticket, RequestContext]:
    """A leads on replica A (its call has started); the same key on replica B follows it."""
    ticket_a = await coordinators[0].join("k", RequestContext("ra"), a)
    await a.started.wait()
    ctx_b = RequestContext("rb")
    ticket_b = await coordinators[1].join("k", ctx_b, b)
    assert (ticket_a.leader, ticket_b.leader) == (True, False)
    return ticket_a, ticket_b, ctx_b


async def follow_a_stream(coordinators: list[RedisInflight], a: HeldCall, b: HeldCall) -> tuple[Ticket, RequestContext, AsyncIterator[dict[str, Any]] | None]:
    """A streams on replica A and B follows it (see ``lead_and_follow``); A sends ``{"n": 1}``; B's stream is unread."""
    ticket_a, ticket_b, ctx_b = await lead_and_follow(coordinators, a, b)
    a.answer.set()
    await a.fed.put({"n": 1})
    return ticket_a, ctx_b, (await ticket_b.result())


async def lock_holder(prefix: str) -> bytes | None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        value: bytes | None = await client.get(prefix + "lock:k")
        return value
    finally:
        await client.aclose()


async def until_none(value: Callable[[], Awaitable[Any]]) -> None:
    while await value() is not None:
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_follower_replica_gets_the_leaders_body_and_context(coordinators: list[RedisInflight]) -> None:
    a, b = HeldCall("a"), HeldCall("b")
    ticket_a, ticket_b, ctx_b = await lead_and_follow(coordinators, a, b)
    a.answer.set()
    answer_b = await ticket_b.result()
    assert answer_b.body == (await ticket_a.result()).body == a.body()
    assert (ctx_b.backend, ctx_b.deployment, answer_b.usage) == ("a", Deployment("a", "model-a"), {"total_tokens": 1})
    assert (a.runs, b.runs) == (1, 0)


@pytest.mark.asyncio
async def test_a_follower_replica_gets_the_chunks_live(coordinators: list[RedisInflight], prefix: str) -> None:
    a, b = HeldCall("a", stream=True), HeldCall("b", stream=True)
    ticket_a, ctx_b, stream_b = await follow_a_stream(coordinators, a, b)
    assert stream_b is not None and ctx_b.backend == "a"
    assert await anext(stream_b) == {"n": 1}
    await a.fed.put({"n": 2, "usage": {"total_tokens": 7}})  # sent only now: B can only have it live
    assert await anext(stream_b) == {"n": 2, "usage": {"total_tokens": 7}}
    await a.fed.put(None)
    assert [c async for c in stream_b] == []
    assert stream_b.usage == {"total_tokens": 7}
    stream_a = await ticket_a.result()
    assert stream_a is not None and [c async for c in stream_a] == [{"n": 1}, {"n": 2, "usage": {"total_tokens": 7}}]
    assert b.runs == 0
    await until_none(lambda: lock_holder(prefix))


@pytest.mark.asyncio
async def test_a_follower_replica_calls_upstream_itself_when_the_lease_vanishes(coordinators: list[RedisInflight], prefix: str) -> None:
    a, b = HeldCall("a"), HeldCall("b")
    ticket_a, ticket_b, _ = await lead_and_follow(coordinators, a, b)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(prefix + "lock:k")  # the leading replica died: its lease is gone, no end marker
    finally:
        await client.aclose()
    await b.started.wait()  # B took the lease and calls upstream itself
    b.answer.set()
    assert (await ticket_b.result()).body == b.body()
    a.answer.set()
    assert (await ticket_a.result()).body == a.body()
    assert (a.runs, b.runs) == (1, 1)


@pytest.mark.parametrize("how", ["left", "crashed"])
@pytest.mark.asyncio
async def test_a_follower_replica_calls_upstream_itself_when_the_leader_ends_without_an_answer(coordinators: list[RedisInflight], prefix: str, how: str) -> None:
    a, b = HeldCall("a"), HeldCall("b")
    ticket_a, ticket_b, _ = await lead_and_follow(coordinators, a, b)
    if how == "left":
        ticket_a.leave()  # every waiter on A left: A's call is cancelled, its stream marked failed
    else:
        a.error = RuntimeError("a bug on replica A")
        a.answer.set()
        with pytest.raises(RuntimeError):
            await ticket_a.result()
    await b.started.wait()
    assert await lock_holder(prefix) is not None  # B leads now
    b.answer.set()
    assert (await ticket_b.result()).body == b.body()
    assert (a.runs, b.runs) == (1, 1)
    await until_none(lambda: lock_holder(prefix))


@pytest.mark.parametrize(
    "error",
    [UpstreamClientError("no such parameter: foo", status=400, param="foo"), UpstreamRateLimitError("slow down", retry_after=3), UpstreamError("all backends failed")],
    ids=["400", "429", "502"],
)
@pytest.mark.asyncio
async def test_the_leaders_gateway_error_is_the_follower_replicas_answer(coordinators: list[RedisInflight], error: GatewayError) -> None:
    a, b = HeldCall("a"), HeldCall("b")
    ticket_a, ticket_b, _ = await lead_and_follow(coordinators, a, b)
    a.error = error
    a.answer.set()
    with pytest.raises(GatewayError) as raised:
        await ticket_b.result()
    relayed = raised.value
    assert (relayed.status, relayed.body(), relayed.headers()) == (error.status, error.body(), error.headers())
    with pytest.raises(type(error)):
        await ticket_a.result()
    assert b.runs == 0


@pytest.mark.parametrize("how", ["failed", "left"])
@pytest.mark.asyncio
async def test_a_stream_breaking_after_its_first_chunk_is_the_follower_replicas_error(coordinators: list[RedisInflight], how: str) -> None:
    a, b = HeldCall("a", stream=True), HeldCall("b", stream=True)
    ticket_a, _, stream_b = await follow_a_stream(coordinators, a, b)
    assert stream_b is not None and await anext(stream_b) == {"n": 1}
    if how == "failed":
        await a.fed.put(UpstreamError("cut midway"))
    else:
        ticket_a.leave()
    with pytest.raises(UpstreamError if how == "left" else GatewayError) as raised:
        await anext(stream_b)
    assert raised.value.status == 502
    assert b.runs == 0  # chunks were handed on: no second call could continue them


@pytest.mark.asyncio
async def test_with_redis_down_a_replica_dedupes_on_its_own(prefix: str) -> None:
    store = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", prefix)
    coordinator = RedisInflight(store)
    try:
        a = HeldCall("a")
        first = await coordinator.join("k", RequestContext("r1"), a)
        second = await coordinator.join("k", RequestContext("r2"), a)
        assert (first.leader, second.leader) == (True, False)
        a.answer.set()
        assert (await first.result()).body == (await second.result()).body == a.body()
        assert a.runs == 1
        assert store.degraded
    finally:
        await coordinator.aclose()
        await store.aclose()


@pytest.mark.asyncio
async def test_redis_failing_mid_flight_leaves_the_leader_serving_and_its_followers_calling_themselves(prefix: str) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    stores = [RedisStateStore(f"redis://127.0.0.1:{proxy.port}/0", prefix), RedisStateStore(REDIS_URL, prefix)]
    coordinators = [RedisInflight(store, lease_ttl_s=1.0) for store in stores]
    try:
        a, b = HeldCall("a"), HeldCall("b")
        ticket_a, ticket_b, _ = await lead_and_follow(coordinators, a, b)
        await proxy.stop()  # replica A loses Redis while its call runs
        a.answer.set()
        assert (await ticket_a.result()).body == a.body()  # served from A's own call, no error
        assert stores[0].degraded
        await b.started.wait()  # A's lease lapsed unrenewed: B calls upstream itself
        b.answer.set()
        assert (await ticket_b.result()).body == b.body()
        assert (a.runs, b.runs) == (1, 1)
    finally:
        for coordinator in coordinators:
            await coordinator.aclose()
        for store in stores:
            await store.aclose()
        await proxy.stop()
