"""What kept requests from stalling under sustained cache misses (issue 19): the causes, each pinned down.

- SQLite has one write lock per file: the request log and the cache's persistent tier write in
  turns (``app.storage.db.writing``) instead of one waiting in SQLite's busy handler and failing
  with "database is locked" when the other's transaction outlasts ``busy_timeout``.
- The cache's sweep scans the table for its size outside any write transaction.
- Entries of the memory tier are not objects the garbage collector walks: a full collection with
  tens of thousands of them stopped the event loop for hundreds of milliseconds.
- A finished stream leaves no reference cycle: each used to, and the collections of the garbage
  piled up at c=50 stopped every stream in flight for 300 ms and more.

The latency figures themselves are measured by ``python bench/run.py --only stalls`` (bench/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, insert, select

from app.metrics import Metrics
from app.storage import db as db_module
from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine, writing
from app.storage.migrate import upgrade_to_head
from app.storage.models import CacheEntry, RequestLog
from app.storage.request_log import RequestLogWriter, Row
from app.storage.response_cache import CachedAnswer, MemoryLRU
from tests.fake_upstream import FakeUpstream
from tests.hostile import AUTH, HELLO, config, inflight, wait_for
from tests.support import gateway
from tests.test_request_log import row


async def _sqlite_without_waiting() -> Any:
    """An engine on a fresh SQLite file whose connections give up at once on a held lock."""
    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='admiral-stalls-')}/admiral.db"
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)

    def no_busy_wait(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")  # after the engine's own pragmas: a contended lock fails at once
        cursor.close()

    event.listen(engine.sync_engine, "connect", no_busy_wait)
    return engine


@pytest.mark.asyncio
async def test_the_request_log_waits_its_turn_behind_a_cache_write_instead_of_failing() -> None:
    engine = await _sqlite_without_waiting()
    writer = RequestLogWriter(engine, Metrics(), retention_days=None, flush_interval_s=3600)
    tier = SqlCacheTier(engine, max_total_bytes=1 << 30)
    inside, release = asyncio.Event(), asyncio.Event()
    try:

        async def long_cache_transaction() -> None:
            async with writing(engine) as conn:
                await conn.execute(insert(CacheEntry), [{"key": "k", "namespace": "n", "body": b"x", "size": 1, "created_at": 0.0, "expires_at": 1e12}])
                inside.set()
                await release.wait()  # the write lock is held meanwhile

        holder = asyncio.create_task(long_cache_transaction())
        await inside.wait()
        logging_rows = asyncio.create_task(writer._write([Row(**row(request_id=f"r{i}")) for i in range(3)]))
        lock = db_module._WRITERS[engine]
        for _ in range(500):  # until the insert is either refused by SQLite or waiting for its turn
            if logging_rows.done() or lock._waiters:
                break
            await asyncio.sleep(0.01)
        assert not logging_rows.done()  # queued behind the cache's transaction, not failed
        release.set()
        await holder
        assert await logging_rows is True
        assert writer.failures == 0 and writer.written == 3
        await tier.put([CacheWrite("k2", "n", b"y", 0.0, 1e12)])
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(RequestLog))).scalar_one() == 3
            assert (await conn.execute(select(func.count()).select_from(CacheEntry))).scalar_one() == 2
    finally:
        await tier.aclose()
        await engine.dispose()


@pytest.mark.asyncio
async def test_without_taking_turns_the_same_writes_fail_with_database_is_locked() -> None:
    """The guard on the test above: with SQLite's lock contended and no turn taken, the insert fails."""
    engine = await _sqlite_without_waiting()
    inside, release = asyncio.Event(), asyncio.Event()
    try:

        async def long_transaction() -> None:
            async with writing(engine) as conn:
                await conn.execute(insert(CacheEntry), [{"key": "k", "namespace": "n", "body": b"x", "size": 1, "created_at": 0.0, "expires_at": 1e12}])
                inside.set()
                await release.wait()

        holder = asyncio.create_task(long_transaction())
        await inside.wait()
        with pytest.raises(Exception, match="database is locked"):
            async with engine.begin() as conn:  # a second pooled connection, no turn taken
                await conn.execute(insert(RequestLog), [row()])
        release.set()
        await holder
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_the_sweep_reads_the_total_size_outside_the_write_lock() -> None:
    engine = await _sqlite_without_waiting()
    tier = SqlCacheTier(engine, max_total_bytes=250)
    try:
        await tier.put([CacheWrite(f"k{i}", "ns", bytes([i]) * 100, 1000.0 + i, 2000.0 + i) for i in range(4)])
        real = tier._total_bytes
        seen_locked: list[bool] = []

        async def total() -> int:
            lock = db_module._WRITERS.get(engine)
            seen_locked.append(lock is not None and lock.locked())
            return await real()

        tier._total_bytes = total  # type: ignore[method-assign]
        assert await tier.sweep(1500.0) == 2  # the two soonest to expire go, 200 bytes stay
        assert seen_locked == [False]
    finally:
        await tier.aclose()
        await engine.dispose()


def test_memory_tier_entries_are_not_tracked_by_the_garbage_collector() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}},
    }
    lru = MemoryLRU(max_bytes=1 << 30)
    for i in range(1000):
        lru.put(f"k{i}", CachedAnswer.of(body, "up", "up/m", 1e12))
    gc.collect()
    entries = list(lru._items.values())
    assert not any(gc.is_tracked(e) for e in entries)
    answer = lru.get("k7", 0.0)
    assert answer is not None and answer.usage == body["usage"] and answer.deployment == "up/m"


def test_a_finished_stream_leaves_nothing_for_the_garbage_collector(upstream: FakeUpstream) -> None:
    """A stream's objects are freed by their reference counts when it ends, not by a collection.

    Each stream used to leave its answer in a cycle (its end hooks close over it) holding its
    chunks, flight, context and tasks: about 185 objects a stream that only a generation-1
    collection freed, so at c=50 that generation grew to ~140 000 objects and each of its
    collections stopped the loop for 200-700 ms, every stream in flight with it.
    """
    with gateway(config(upstream, extra="cache: {enabled: true}\ndedupe: {enabled: true}")) as gw, httpx.Client(headers=AUTH, timeout=10) as client:

        def stream(i: int) -> None:
            body = {**HELLO, "stream": True, "messages": [{"role": "user", "content": f"tell me {i}"}]}
            r = client.post(f"{gw.base_url}/chat/completions", json=body)
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text[-200:]

        stream(0)  # warm: what the first request builds lives as long as the app
        wait_for(lambda: inflight(gw) == 0, what="nothing in flight")
        gc.collect()
        gc.disable()
        try:
            for i in range(1, 6):
                stream(i)
            wait_for(lambda: inflight(gw) == 0, what="nothing in flight")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left["Answer"] == 0 and left["RawChunk"] == 0, left.most_common(20)
