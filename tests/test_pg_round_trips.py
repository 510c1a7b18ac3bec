"""What the gateway's PostgreSQL work costs in queries: none on a miss's path, a read from the pool, the writes behind requests.

Counted with SQLAlchemy's cursor events for statements and asyncpg's own query logger for what the
driver sends by itself (BEGIN, ROLLBACK, a pool's ping), which the cursor events never see.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.metrics import Metrics
from app.state.redis import RedisStateStore
from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.request_log import RequestLogWriter
from tests.fake_upstream import FakeUpstream
from tests.replicas import replicas
from tests.serve import NewDatabase
from tests.test_request_log import row
from tests.test_scaleout import ask, cache_config

pytestmark = pytest.mark.postgres
#: the tasks that write behind the requests (and sweep or prune); every other task is a request's
BACKGROUND = {"cache-writer", "cache-sweep", "request-log-writer", "request-log-retention", "stored-responses-writer", "stored-responses-retention"}


def counting(engine: AsyncEngine) -> tuple[list[str], list[Any]]:
    """Every query the engine's connections send from now on (statements and the driver's own), and each connection checked out."""
    queries: list[str] = []
    checked_out: list[Any] = []
    statements: set[str] = set()

    def driver_sent(record: Any) -> None:
        if record.query not in statements:  # an executemany is logged by both
            queries.append(record.query)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(driver_sent)

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        checked_out.append(dbapi_connection.driver_connection)

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.add(statement)
        queries.append(statement)  # prepared statements pass by asyncpg's logger

    event.listen(engine.sync_engine, "connect", on_connect)
    event.listen(engine.sync_engine, "before_cursor_execute", on_statement)
    event.listen(engine.sync_engine, "checkout", on_checkout)
    return queries, checked_out


async def _pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


@pytest.mark.asyncio
async def test_a_read_from_the_pool_sends_no_ping(new_pg_database: NewDatabase) -> None:
    """A pooled connection is handed out without a ping: a read is BEGIN, its SELECT and ROLLBACK."""
    engine = create_engine(new_pg_database())
    queries, _ = counting(engine)
    try:
        first = await _pid(engine)  # opens the connection the pool keeps
        queries.clear()
        assert await _pid(engine) == first  # the same connection, from the pool
        assert sorted(queries) == ["BEGIN;", "ROLLBACK;", "SELECT pg_backend_pid()"]
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_a_connection_the_server_closed_is_replaced_before_use(new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    engine = create_engine(url)
    _, checked_out = counting(engine)
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        first = await _pid(engine)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        deadline = time.monotonic() + 15
        while not checked_out[-1].is_closed():  # the pooled connection's socket sees the server's close
            assert time.monotonic() < deadline, "the driver never saw the connection closed"
            await asyncio.sleep(0.01)
        second = await _pid(engine)  # no error: the closed connection was not handed out
        assert second != first
    finally:
        await admin.close()
        await engine.dispose()


@pytest.mark.asyncio
async def test_writes_behind_requests_go_in_batches(new_pg_database: NewDatabase) -> None:
    """200 request-log rows and 200 cache entries: one transaction each (BEGIN, the batch, COMMIT), not one per row."""
    url = new_pg_database()
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    queries, _ = counting(engine)
    writer = RequestLogWriter(engine, Metrics(), retention_days=None, batch_size=500, flush_interval_s=3600)
    tier = SqlCacheTier(engine, max_total_bytes=1 << 30)
    try:
        writer.start()
        for i in range(200):
            writer.submit(row(request_id=f"r{i}"))
        await writer.close()
        assert writer.written == 200
        logged = len(queries)
        assert logged <= 3, [q[:40] for q in queries]
        now = time.time()
        await tier.put([CacheWrite(f"{i:064x}", "default", b'{"body": 1}', now, now + 60) for i in range(200)])
        assert len(queries) - logged <= 3, queries[logged:]
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM cache_entries"))).scalar_one() == 200
    finally:
        await tier.aclose()
        await engine.dispose()


def test_a_miss_on_redis_and_postgres_sends_no_statement_before_its_answer(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    """Redis's key filter keeps a miss off the cache table; its answer and its log row are written behind it."""
    with replicas(cache_config(upstream), prefix=prefix, database_url=new_pg_database(), count=1) as (gw,):
        on_path: list[str] = []
        behind: list[str] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            task = asyncio.current_task()
            (behind if task is not None and task.get_name() in BACKGROUND else on_path).append(statement)

        state = cast(RedisStateStore, gw.services.state)
        deadline = time.monotonic() + 15
        while gw.call(_may_hold(state, "0" * 64)):  # until the key filter has read what Redis holds, every key may be there
            assert time.monotonic() < deadline, "the key filter never became ready"
            time.sleep(0.05)
        event.listen(gw.services.db.sync_engine, "before_cursor_execute", on_statement)
        for i in range(20):
            answer = ask(gw, f"a question never asked before, number {i}")
            assert answer.status_code == 200 and answer.headers["x-admiral-cache"] == "miss"
        assert upstream.calls == 20
        deadline = time.monotonic() + 15
        while not (any("INSERT INTO cache_entries" in s for s in behind) and any("INSERT INTO request_log" in s for s in behind)):
            assert time.monotonic() < deadline, f"the writes behind the requests never came: {behind}"
            time.sleep(0.05)
        assert on_path == []


async def _may_hold(state: RedisStateStore, key: str) -> bool:
    return state.may_hold(key)  # on the gateway's loop: the key filter starts there
