"""The exact response cache: the fake upstream's call counter proves what is answered from it."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import func, select

from app.pipeline.base import ModelRequest, RequestContext
from app.pipeline.cache_key import compute_cache_key
from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.models import CacheEntry
from app.storage.response_cache import ENTRY_OVERHEAD_BYTES, CachedAnswer, MemoryLRU, ResponseCache
from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.serve import NewDatabase
from tests.support import GatewayServer, gateway, make_settings

KEY_A = "sk-agent-alpha-0001"
KEY_B = "sk-agent-bravo-0002"
KEY_C = "sk-agent-charlie-0003"
HELLO: Any = [{"role": "user", "content": "hello cache"}]


def config(up: FakeUpstream, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY_A}, agent: alpha, cache_namespace: team-a}}
  - {{key: {KEY_B}, agent: bravo, cache_namespace: team-b}}
  - {{key: {KEY_C}, agent: charlie, cache_namespace: team-a}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider, timeout_s: 5}}
models:
  fast: [up/fake-model]
routing: {{default: fast}}
retry: {{attempts: 1}}
{extra}
"""


def post(gw: GatewayServer, body: dict[str, Any], key: str = KEY_A, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}", **headers}, json=body, timeout=10)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": HELLO, **extra}


def metric(gw: GatewayServer, name: str) -> float:
    return gw.services.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def gw(upstream: FakeUpstream) -> Any:
    with gateway(config(upstream)) as server:
        yield server


def test_miss_then_hit_is_one_upstream_call(gw: GatewayServer, upstream: FakeUpstream) -> None:
    first = post(gw, chat())
    second = post(gw, chat())
    assert first.status_code == second.status_code == 200
    assert first.headers["x-admiral-cache"] == "miss"
    assert second.headers["x-admiral-cache"] == "hit"
    assert second.json() == first.json()
    assert second.headers["x-admiral-backend"] == "up"  # the backend that produced the stored answer
    assert second.headers["x-admiral-route"] == "fast"
    assert upstream.calls == 1
    assert metric(gw, "admiral_cache_hits_total") == 1
    assert metric(gw, "admiral_cache_misses_total") == 1


def test_auto_shares_entries_with_the_model_it_chooses(gw: GatewayServer, upstream: FakeUpstream) -> None:
    post(gw, chat())
    assert post(gw, {"model": "auto", "messages": HELLO}).headers["x-admiral-cache"] == "hit"
    assert upstream.calls == 1


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_hit_replays_as_sse(gw: GatewayServer, upstream: FakeUpstream, include_usage: bool) -> None:
    plain = post(gw, chat()).json()
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY_A, max_retries=0)
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    events = client.chat.completions.create(model="fast", messages=HELLO, stream=True, **options)
    assert events.response.headers["x-admiral-cache"] == "hit"
    chunks = list(events)
    assert upstream.calls == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == plain["choices"][0]["message"]["content"]
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.id == plain["id"] for c in chunks)
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == plain["usage"]["total_tokens"]
    else:
        assert all(c.usage is None for c in chunks)


def test_finished_stream_is_stored_and_served_plain(gw: GatewayServer, upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY_A, max_retries=0)
    events = client.chat.completions.create(model="fast", messages=HELLO, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in events if c.choices)
    hit = post(gw, chat())
    assert hit.headers["x-admiral-cache"] == "hit"
    body = hit.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == streamed == "echo: hello cache"
    assert body["usage"]["total_tokens"] > 0  # the gateway asks every stream for usage
    assert upstream.calls == 1


def test_cut_stream_is_not_cached(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.script(["cut"])
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=chat(stream=True), timeout=10) as r:
        text = r.read().decode()
    assert '"error"' in text and text.endswith("data: [DONE]\n\n")
    again = post(gw, chat())
    assert again.headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 2


def test_errors_are_not_cached(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.script(["status:400"])
    assert post(gw, chat()).status_code == 400
    ok = post(gw, chat())
    assert ok.status_code == 200 and ok.headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 2


def test_no_cache_skips_the_read_but_refreshes_the_entry(gw: GatewayServer, upstream: FakeUpstream) -> None:
    first = post(gw, chat()).json()
    fresh = post(gw, chat(), **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-admiral-cache"] == "bypass"
    assert upstream.calls == 2
    assert fresh.json()["id"] != first["id"]
    hit = post(gw, chat())
    assert hit.headers["x-admiral-cache"] == "hit"
    assert hit.json()["id"] == fresh.json()["id"]


def test_no_store_skips_the_write(gw: GatewayServer, upstream: FakeUpstream) -> None:
    assert post(gw, chat(), **{"Cache-Control": "no-store"}).headers["x-admiral-cache"] == "miss"
    assert post(gw, chat()).headers["x-admiral-cache"] == "miss"
    assert post(gw, chat()).headers["x-admiral-cache"] == "hit"
    assert upstream.calls == 2


def test_namespaces_never_share(gw: GatewayServer, upstream: FakeUpstream) -> None:
    assert post(gw, chat(), key=KEY_A).headers["x-admiral-cache"] == "miss"
    assert post(gw, chat(), key=KEY_B).headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 2
    # another agent in team-a's namespace shares team-a's entries
    assert post(gw, chat(), key=KEY_C).headers["x-admiral-cache"] == "hit"
    assert upstream.calls == 2


def test_answer_deciding_fields_change_the_key(gw: GatewayServer, upstream: FakeUpstream) -> None:
    post(gw, chat(temperature=0.2))
    assert post(gw, chat(temperature=0.3)).headers["x-admiral-cache"] == "miss"
    assert post(gw, chat(temperature=0.2, user="someone-else")).headers["x-admiral-cache"] == "hit"
    assert post(gw, chat(temperature=0.2, max_tokens=5)).headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 3


def test_restart_keeps_entries(upstream: FakeUpstream) -> None:
    db = Path(tempfile.mkdtemp(prefix="admiral-cache-")) / "admiral.db"
    settings = make_settings(config(upstream, f'database: {{url: "sqlite+aiosqlite:///{db}"}}'))
    with GatewayServer(settings) as gw:
        first = post(gw, chat()).json()
    with GatewayServer(settings) as gw:
        hit = post(gw, chat())
        assert hit.headers["x-admiral-cache"] == "hit"
        assert hit.json() == first
    assert upstream.calls == 1


def test_expired_entries_are_not_served(gw: GatewayServer, upstream: FakeUpstream) -> None:
    cache = gw.services.cache
    assert cache is not None
    clock = ManualClock()
    cache.clock = clock
    post(gw, chat())
    gw.call(cache.flush())  # the persistent tier holds it too, so neither tier may answer
    clock.advance(cache.ttl_s - 1)
    assert post(gw, chat()).headers["x-admiral-cache"] == "hit"
    clock.advance(2)
    assert post(gw, chat()).headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 2


def test_oversized_answers_are_not_stored(upstream: FakeUpstream) -> None:
    with gateway(config(upstream, "cache: {max_entry_bytes: 64}")) as gw:
        post(gw, chat())
        assert post(gw, chat()).headers["x-admiral-cache"] == "miss"
    assert upstream.calls == 2


def test_disabled_cache_bypasses(upstream: FakeUpstream) -> None:
    with gateway(config(upstream, "cache: {enabled: false}")) as gw:
        assert gw.services.cache is None
        assert post(gw, chat()).headers["x-admiral-cache"] == "bypass"
        assert post(gw, chat()).headers["x-admiral-cache"] == "bypass"
    assert upstream.calls == 2


# -- the key -----------------------------------------------------------------------------------


def key_of(body: dict[str, Any], route: str = "fast", namespace: str = "default") -> str:
    return compute_cache_key(ModelRequest(body), RequestContext(request_id="r", route=route, cache_namespace=namespace))


def test_key_is_canonical() -> None:
    base = key_of(chat(temperature=1, top_p=0.5))
    assert key_of({"top_p": 0.5, "temperature": 1.0, "messages": HELLO, "model": "fast"}) == base
    assert key_of(chat(temperature=1, top_p=0.5, stream=True, stream_options={"include_usage": True}, user="u")) == base
    assert key_of(chat(temperature=1, top_p=0.5, seed=None)) == base
    assert key_of({**chat(temperature=1, top_p=0.5), "model": "auto"}) == base  # the route decides, not the alias


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"messages": [{"role": "user", "content": "hello cache!"}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"max_tokens": 9},
        {"max_completion_tokens": 9},
        {"stop": ["x"]},
        {"seed": 7},
        {"n": 2},
        {"presence_penalty": 0.1},
        {"frequency_penalty": 0.1},
        {"logit_bias": {"42": 1}},
        {"top_k": 5},
        {"min_p": 0.1},
        {"repetition_penalty": 1.1},
        {"min_tokens": 3},
        {"logprobs": True},
    ],
)
def test_key_changes_with_each_deciding_field(change: dict[str, Any]) -> None:
    assert key_of({**chat(temperature=1), **change}) != key_of(chat(temperature=1))


def test_key_changes_with_route_and_namespace() -> None:
    assert key_of(chat(), route="other") != key_of(chat())
    assert key_of(chat(), namespace="team-b") != key_of(chat())


# -- the tiers ---------------------------------------------------------------------------------


def _answer(size: int, expires_at: float) -> CachedAnswer:
    return CachedAnswer(b"x" * size, None, "up", None, expires_at)


def test_memory_lru_is_bounded_by_bytes() -> None:
    entry = 40 + ENTRY_OVERHEAD_BYTES  # what a 40-byte answer counts for
    lru = MemoryLRU(max_bytes=2 * entry + 20)
    lru.put("a", _answer(40, 10.0))
    lru.put("b", _answer(40, 10.0))
    assert lru.get("a", 0.0) is not None  # a is now the most recently used
    lru.put("c", _answer(40, 10.0))
    assert lru.get("b", 0.0) is None and lru.get("a", 0.0) is not None and lru.get("c", 0.0) is not None
    assert lru.bytes == 2 * entry
    lru.put("huge", _answer(2 * entry + 21 - ENTRY_OVERHEAD_BYTES, 10.0))
    assert lru.get("huge", 0.0) is None and lru.bytes == 2 * entry
    assert lru.get("a", 10.0) is None  # expired
    assert lru.sweep(10.0) == 1 and len(lru) == 0 and lru.bytes == 0


def test_memory_lru_counts_what_its_entries_really_take() -> None:
    """An answer's JSON is kept in an allocation of its own size (orjson's output is not)."""
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 40}, "finish_reason": "stop"}]}
    body["usage"] = {"prompt_tokens": 64, "completion_tokens": 18, "total_tokens": 82}
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    lru = MemoryLRU(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        for key in keys:
            lru.put(key, CachedAnswer.of(orjson.loads(orjson.dumps(body)), "up", "up/model", 1e12))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held += sum(sys.getsizeof(key) for key in keys)  # made before tracing began
    assert held / len(keys) <= lru.bytes / len(keys) * 1.1, (held / len(keys), lru.bytes / len(keys))


def _sqlite_url() -> str:
    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='admiral-tier-')}/admiral.db"
    upgrade_to_head(url)
    return url


async def _tier_checks(url: str) -> None:
    engine = create_engine(url)
    try:
        tier = SqlCacheTier(engine, max_total_bytes=250)
        await tier.put([CacheWrite(f"k{i}", "ns", bytes([i]) * 100, 1000.0 + i, 1060.0 + i) for i in range(4)])
        await tier.put([CacheWrite("k0", "ns", b"new" * 10, 1000.0, 1060.0)])  # an upsert replaces
        assert await tier.get("k0", 1001.0) == b"new" * 10
        assert await tier.get("k1", 1060.9) == bytes([1]) * 100
        assert await tier.get("k1", 1061.0) is None  # expired, even before any sweep
        assert await tier.get("missing", 1000.0) is None
        # at 1060.5: k0 (expired at 1060) goes; 300 bytes remain, so the oldest (k1) goes too
        assert await tier.sweep(1060.5) == 2
        async with engine.connect() as conn:
            keys = sorted((await conn.execute(select(CacheEntry.key))).scalars())
            total = (await conn.execute(select(func.sum(CacheEntry.size)))).scalar_one()
        assert keys == ["k2", "k3"] and total == 200
    finally:
        await engine.dispose()


def test_sql_tier_expiry_sweep_and_size_limit() -> None:
    asyncio.run(_tier_checks(_sqlite_url()))


@pytest.mark.postgres
def test_sql_tier_on_postgres(new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    upgrade_to_head(url)
    asyncio.run(_tier_checks(url))


def test_sql_tier_rows_on_sqlite_read_back_through_sqlalchemy() -> None:
    # on SQLite the upsert goes to the driver as plain tuples: what SQLAlchemy reads back must be what was put
    url = _sqlite_url()

    async def run() -> list[tuple[Any, ...]]:
        engine = create_engine(url)
        try:
            tier = SqlCacheTier(engine, max_total_bytes=1 << 20)
            await tier.put([CacheWrite("a", "n" * 200, b"\x00\xff" * 50, 1000.25, 1060.125), CacheWrite("b", "ns", b"old", 1000.0, 1060.0)])
            await tier.put([CacheWrite("b", "other", b"", 1001.5, 1e12)])  # replaces b
            columns = (CacheEntry.key, CacheEntry.namespace, CacheEntry.body, CacheEntry.size, CacheEntry.created_at, CacheEntry.expires_at)
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(select(*columns).order_by(CacheEntry.key))).all()]
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == [("a", "n" * 128, b"\x00\xff" * 50, 100, 1000.25, 1060.125), ("b", "other", b"", 0, 1001.5, 1e12)]
    with sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///")) as conn:
        stored = conn.execute("SELECT DISTINCT typeof(body), typeof(size), typeof(created_at), typeof(expires_at) FROM cache_entries").fetchall()
    assert stored == [("blob", "integer", "real", "real")]


def test_response_cache_writes_in_the_background_and_reads_through() -> None:
    url = _sqlite_url()

    async def run() -> None:
        engine = create_engine(url)
        clock = ManualClock()
        try:
            tier = SqlCacheTier(engine, max_total_bytes=1 << 20)
            cache = ResponseCache(tier, ttl_s=60, memory_max_bytes=1 << 20, max_entry_bytes=1000, sweep_interval_s=3600, clock=clock)
            cache.start()
            body = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
            assert cache.put("k", "ns", body, "up", "up/m")
            assert not cache.put("big", "ns", {**body, "pad": "x" * 2000}, "up", None)
            await cache.aclose()  # flushes
            # a second cache on the same table (another process, or after a restart) reads it
            other = ResponseCache(tier, ttl_s=60, memory_max_bytes=1 << 20, max_entry_bytes=1000, sweep_interval_s=3600, clock=clock)
            answer = await other.get("k")
            assert answer is not None and answer.body == body and answer.backend == "up" and answer.deployment == "up/m"
            assert len(other.memory) == 1  # loaded into memory
            assert await other.get("big") is None
            clock.advance(61)
            assert await other.sweep() == 2  # one from memory, one row
            assert await other.get("k") is None and len(other.memory) == 0
        finally:
            await engine.dispose()

    asyncio.run(run())


class BlockingTier:
    """A persistent tier whose reads wait until the test lets them finish."""

    write_delay_s = 0.05

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reading = asyncio.Event()

    async def get(self, key: str, now: float) -> bytes | None:
        self.reading.set()
        await self.release.wait()
        return None

    async def put(self, entries: Any) -> None:
        return None

    async def sweep(self, now: float) -> int:
        return 0

    async def aclose(self) -> None:
        return None


def test_answer_stored_during_a_slow_read_is_found() -> None:
    # a request that missed memory while an identical one was in flight must not call upstream again
    async def run() -> None:
        tier = BlockingTier()
        cache = ResponseCache(tier, ttl_s=60, memory_max_bytes=1 << 20, max_entry_bytes=1 << 20, sweep_interval_s=3600)
        reader = asyncio.create_task(cache.get("k"))
        await tier.reading.wait()
        body = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
        cache.put("k", "ns", body, "up", None)
        await cache.flush()
        tier.release.set()
        answer = await reader
        assert answer is not None and answer.body == body

    asyncio.run(run())
