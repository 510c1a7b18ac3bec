"""The request log: batched background writes, overflow, outages, shutdown flush, retention."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select

from app.metrics import Metrics
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.models import RequestLog
from app.storage.request_log import RequestLogWriter, SqliteBinds
from tests.serve import NewDatabase, serve
from tests.support import gateway

ADMIN_KEY = "admin-key-for-tests-0001"
AGENT_KEY = "sk-agent-logger-0001"


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": datetime.now(UTC),
        "request_id": "r1",
        "agent": "a",
        "requested_model": "demo",
        "route": "demo",
        "backend": "demo",
        "deployment_model": "echo",
        "status": 200,
        "outcome": "ok",
        "cache": "miss",
        "dedupe": None,
        "stream": False,
        "latency_ms": 12.5,
        "upstream_ms": 10.0,
        "ttft_ms": None,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "attempts": 1,
        "error_type": None,
        "prompt": None,
        "completion": None,
        "endpoint": "chat",
        "trace_id": None,
        "route_by": None,
        "route_score": None,
        "price_usd": 0.0,
        "reference_usd": 0.0,
        "usage_estimated": False,
    }
    return base | overrides


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/log.db"
    upgrade_to_head(url)
    return url


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def count_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(RequestLog))).scalar_one())
    except Exception:
        return -1
    finally:
        await engine.dispose()


class CountingWriter(RequestLogWriter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        self.batches.append(len(rows))
        await super()._insert(rows)


@pytest.mark.asyncio
async def test_rows_are_inserted_in_batches(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    writer = CountingWriter(engine, Metrics(), batch_size=10, flush_interval_s=0.05)
    for i in range(25):
        writer.submit(row(request_id=f"r{i}"))
    writer.start()
    await eventually(lambda: _equals(count_rows(sqlite_url), 25))
    assert writer.batches == [10, 10, 5]
    await writer.close()
    await engine.dispose()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.asyncio
async def test_submit_never_waits_and_counts_overflow(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(sqlite_url)
    metrics = Metrics()
    writer = RequestLogWriter(engine, metrics, queue_size=5, batch_size=100)
    with caplog.at_level(logging.WARNING, logger="admiral.request_log"):
        for i in range(8):
            writer.submit(row(request_id=f"r{i}"))  # the writer is not even running
    assert metrics.registry.get_sample_value("admiral_request_log_dropped_total") == 3
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1
    writer.start()
    await writer.close()
    assert await count_rows(sqlite_url) == 5
    await engine.dispose()


@pytest.mark.asyncio
async def test_database_outage_keeps_rows_and_retries(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/late.db"  # no schema yet: every insert fails
    engine = create_engine(url)
    metrics = Metrics()
    writer = RequestLogWriter(engine, metrics, batch_size=3, flush_interval_s=0.02, backoff_s=0.02, max_backoff_s=0.1)
    writer.start()
    for i in range(7):
        writer.submit(row(request_id=f"r{i}"))
    await eventually(lambda: _true(writer.failures >= 2))
    assert writer.pending == 7
    await asyncio.to_thread(upgrade_to_head, url)  # the database comes back
    await eventually(lambda: _equals(count_rows(url), 7))
    assert metrics.registry.get_sample_value("admiral_request_log_dropped_total") == 0
    await writer.close()
    await engine.dispose()


async def _true(value: bool) -> bool:
    return value


def _other_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())


@pytest.mark.asyncio
async def test_a_waiting_writer_is_one_task(tmp_path: Path) -> None:
    """Waiting for rows or for the database to come back adds no task (tests count a loop's tasks)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/late.db"  # no schema yet: every insert fails
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), retention_days=None, flush_interval_s=0.02, backoff_s=3600)
    writer.start()
    await asyncio.sleep(0.1)  # several flush intervals with nothing to write
    assert _other_tasks() == ["request-log-writer"]
    writer.submit(row(request_id="r0"))
    await eventually(lambda: _true(writer.failures == 1))
    await asyncio.sleep(0.05)  # backing off
    assert _other_tasks() == ["request-log-writer"]
    await writer.close(timeout_s=0.1)
    await engine.dispose()


@pytest.mark.asyncio
async def test_close_flushes_everything_queued(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    writer = RequestLogWriter(engine, Metrics(), batch_size=4, flush_interval_s=3600)
    writer.start()
    for i in range(11):
        writer.submit(row(request_id=f"r{i}"))
    await writer.close()
    assert writer.pending == 0
    assert await count_rows(sqlite_url) == 11
    await engine.dispose()


@pytest.mark.asyncio
async def test_close_gives_up_when_the_database_stays_down(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/never.db"
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), flush_interval_s=3600, backoff_s=0.01)
    writer.start()
    writer.submit(row())
    await asyncio.wait_for(writer.close(timeout_s=0.2), 10)
    assert writer.pending == 1
    await engine.dispose()


@pytest.mark.asyncio
async def test_a_row_the_database_refuses_does_not_sink_its_batch(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    metrics = Metrics()
    writer = RequestLogWriter(engine, metrics, flush_interval_s=3600)
    writer.start()
    writer.submit(row(request_id="good-1"))
    writer.submit(row(request_id="bad", status=None))  # NOT NULL
    writer.submit(row(request_id="good-2", route="r" * 900))  # cut to the column's 200 characters
    await writer.close()
    async with engine.connect() as conn:
        found = (await conn.execute(select(RequestLog.request_id, RequestLog.route).order_by(RequestLog.id))).all()
    assert [r[0] for r in found] == ["good-1", "good-2"]
    assert found[1][1] == "r" * 200
    assert metrics.registry.get_sample_value("admiral_request_log_dropped_total") == 1
    await engine.dispose()


@pytest.mark.asyncio
async def test_sqlite_rows_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    # on SQLite the writer hands the driver plain tuples; the same rows inserted through SQLAlchemy must be stored alike
    ts = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    rows = [
        row(request_id="a", ts=ts, upstream_ms=None, ttft_ms=0.1, dedupe="leader"),
        row(request_id="b", ts=ts.replace(microsecond=0), stream=True, latency_ms=7, prompt="p\x00ü", completion="", route="r" * 300),
    ]
    await _assert_stored_as_sqlalchemy_stores(tmp_path, rows)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/writer.db")
    async with engine.connect() as conn:
        found = (await conn.execute(select(RequestLog.ts, RequestLog.stream, RequestLog.latency_ms, RequestLog.prompt).order_by(RequestLog.id))).all()
    await engine.dispose()
    # SQLite keeps no time zone: a UTC time comes back naive
    assert [tuple(r) for r in found] == [(ts.replace(tzinfo=None), False, 12.5, None), (ts.replace(tzinfo=None, microsecond=0), True, 7.0, "p\x00ü")]


@pytest.mark.asyncio
async def test_sqlite_times_and_nulls_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    # the writer writes a second's date and time once, and leaves out the columns NULL in every row of a batch
    ts = datetime(2024, 5, 6, 7, 59, 59, 999999, tzinfo=UTC)
    plus_two = timezone(timedelta(hours=2))
    times = [ts, ts.replace(microsecond=5), ts + timedelta(microseconds=1), ts.replace(tzinfo=None)]
    times += [ts.astimezone(plus_two), ts.replace(tzinfo=plus_two), ts, ts - timedelta(hours=1)]
    rows = [row(request_id=f"r{i}", ts=t, upstream_ms=None, trace_id="t" * 40 if i == 3 else None) for i, t in enumerate(times)]
    await _assert_stored_as_sqlalchemy_stores(tmp_path, rows)


@pytest.mark.asyncio
async def test_sqlite_keeps_a_bounded_number_of_inserts_for_its_null_patterns(tmp_path: Path) -> None:
    # each batch below leaves out another set of NULL columns: every row is stored whole, and the
    # INSERTs kept for those sets start afresh at their bound instead of growing
    url = f"sqlite+aiosqlite:///{tmp_path}/log.db"
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), batch_size=1, flush_interval_s=3600)
    binds = writer._bulk
    assert isinstance(binds, SqliteBinds)
    binds.MAX_INSERTS = 2
    filled: list[dict[str, Any]] = [{}, {"dedupe": "leader"}, {"error_type": "timeout"}, {"trace_id": "t" * 32}, {"route_by": "rule", "route_score": 0.5}]
    writer.start()
    for i, values in enumerate(filled):
        writer.submit(row(request_id=f"r{i}", **values))
    await writer.close()
    await engine.dispose()
    assert 0 < len(binds._inserts) <= 2
    stored = _db_rows(f"{tmp_path}/log.db")
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(len(filled))]
    for r, values in zip(stored, filled, strict=True):
        for name in ("dedupe", "error_type", "trace_id", "route_by", "route_score"):
            assert r[name] == values.get(name), (r["request_id"], name)


async def _assert_stored_as_sqlalchemy_stores(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    for name in ("writer", "sqlalchemy"):
        url = f"sqlite+aiosqlite:///{tmp_path}/{name}.db"
        await asyncio.to_thread(upgrade_to_head, url)
        engine = create_engine(url)
        if name == "writer":
            writer = RequestLogWriter(engine, Metrics())
            for r in rows:
                writer.submit(dict(r))
            await writer.close()
        else:
            async with engine.begin() as conn:
                await conn.execute(insert(RequestLog), [dict(r, route=r["route"][:200], trace_id=r["trace_id"] and r["trace_id"][:32]) for r in rows])
        await engine.dispose()
    stored, expected = ([[(type(v), v) for v in r] for r in _db_rows(f"{tmp_path}/{name}.db")] for name in ("writer", "sqlalchemy"))
    assert stored == expected


@pytest.mark.asyncio
async def test_retention_prunes_old_rows(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    writer = RequestLogWriter(engine, Metrics(), retention_days=30, flush_interval_s=3600, prune_interval_s=3600)
    now = datetime.now(UTC)
    for days in (45, 31, 29, 0):
        writer.submit(row(request_id=f"age-{days}", ts=now - timedelta(days=days)))
    await writer.close()
    assert await writer.prune(now=now, chunk=1) == 2
    async with engine.connect() as conn:
        left = sorted((await conn.execute(select(RequestLog.request_id))).scalars())
    assert left == ["age-0", "age-29"]
    await engine.dispose()


@pytest.mark.asyncio
async def test_retention_task_runs_at_start(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    seed = RequestLogWriter(engine, Metrics(), retention_days=None)
    seed.submit(row(request_id="ancient", ts=datetime.now(UTC) - timedelta(days=400)))
    await seed.close()
    writer = RequestLogWriter(engine, Metrics(), retention_days=30)
    writer.start()
    await eventually(lambda: _equals(count_rows(sqlite_url), 0))
    await writer.close()
    await engine.dispose()


def _db_rows(path: str) -> list[sqlite3.Row]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM request_log ORDER BY id").fetchall()


def _wait_rows(path: str, count: int, timeout: float = 15) -> list[sqlite3.Row]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _db_rows(path)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


CONFIG = f"""
keys: [{{key: {AGENT_KEY}, agent: logger}}]
admin_key: {ADMIN_KEY}
providers: {{demo: {{kind: demo}}}}
models: {{demo: [demo/echo]}}
"""


def test_gateway_logs_each_request_without_its_text(tmp_path: Path) -> None:
    path = f"{tmp_path}/gw.db"
    with gateway(CONFIG + f"database: {{url: 'sqlite+aiosqlite:///{path}'}}\n") as gw:
        headers = {"Authorization": f"Bearer {AGENT_KEY}", "x-request-id": "log-me-1"}
        r = httpx.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "demo", "messages": [{"role": "user", "content": "secret words"}]})
        assert r.status_code == 200
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={**headers, "x-request-id": "log-me-2"}, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        rows = _wait_rows(path, 2)
    assert [r["request_id"] for r in rows] == ["log-me-1", "log-me-2"]
    ok, missing = rows
    assert (ok["agent"], ok["route"], ok["backend"], ok["deployment_model"], ok["status"], ok["outcome"]) == ("logger", "demo", "demo", "echo", 200, "ok")
    assert ok["latency_ms"] > 0 and ok["upstream_ms"] is not None and ok["completion_tokens"] > 0 and ok["attempts"] == 1
    assert ok["prompt"] is None and ok["completion"] is None
    assert (missing["status"], missing["outcome"], missing["error_type"], missing["backend"]) == (404, "client_error", "not_found_error", None)
    dump = "\n".join(str(tuple(r)) for r in rows)
    assert "secret words" not in dump and AGENT_KEY not in dump


def test_log_content_stores_prompt_and_completion(tmp_path: Path) -> None:
    path = f"{tmp_path}/content.db"
    with gateway(CONFIG + f"database: {{url: 'sqlite+aiosqlite:///{path}', log_content: true}}\n") as gw:
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "demo", "stream": True, "messages": [{"role": "user", "content": "keep me"}]})
        assert r.status_code == 200
        rows = _wait_rows(path, 1)
    assert rows[0]["prompt"] == "keep me"
    assert rows[0]["completion"] and rows[0]["stream"] == 1 and rows[0]["ttft_ms"] is not None


def test_stats_survive_a_restart_on_the_same_database(tmp_path: Path) -> None:
    config = CONFIG + f"database: {{url: 'sqlite+aiosqlite:///{tmp_path}/restart.db'}}\n"
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    with gateway(config) as gw:
        for _ in range(3):
            assert httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body).status_code == 200
    with gateway(config) as gw:
        stats = httpx.get(f"{gw.url}/admin/stats?hours=1", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert stats["total_requests"] == 3
    assert stats["by_agent"]["logger"]["requests"] == 3


def test_sigterm_flushes_rows_written_just_before(tmp_path: Path) -> None:
    db = tmp_path / "sigterm.db"
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + f"database: {{url: 'sqlite+aiosqlite:///{db}'}}\n")
    with serve(config) as gw:
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {AGENT_KEY}"}) as client:
            for i in range(20):
                r = client.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": f"n{i}"}]})
                assert r.status_code == 200
        # right after the last answer: the writer flushes every 0.5 s, so these rows are still queued
        # uvicorn re-raises the signal once the lifespan has shut down: "killed by SIGTERM" after a clean exit
        assert gw.stop() in (0, -signal.SIGTERM), gw.output()
        assert "Application shutdown complete" in gw.output()
    assert len(_db_rows(str(db))) == 20


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_writer_and_pruning_on_postgres(new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), batch_size=2, flush_interval_s=0.05)
    now = datetime.now(UTC)
    writer.start()
    # 20 days old: kept by the writer's own retention loop (30 days), pruned by the explicit call below
    writer.submit(row(request_id="old", ts=now - timedelta(days=20)))
    writer.submit(row(request_id="long", route="x" * 500, agent="y" * 300))  # varchar limits are enforced here
    writer.submit(row(request_id="new"))
    await eventually(lambda: _equals(count_rows(url), 3))
    assert await writer.prune(now=now + timedelta(days=15)) == 1
    await writer.close()
    async with engine.connect() as conn:
        routes = dict((await conn.execute(select(RequestLog.request_id, RequestLog.route))).all())
    assert routes == {"long": "x" * 200, "new": "demo"}
    await engine.dispose()


def test_the_recorder_makes_each_column_of_its_row() -> None:
    # the recorder makes its Row positionally: each value must land in its own column
    from app.pipeline.base import Deployment, RequestContext
    from app.recorder import RequestRecorder
    from app.storage.request_log import Row

    rows: list[Row] = []

    class Sink:
        def submit(self, r: Row) -> None:
            rows.append(r)

    recorder = RequestRecorder(Metrics(), Sink())
    ctx = RequestContext(request_id="rid", agent="ag", route="rt", backend="be", cache_status="miss", dedupe_role="leader", attempts=2)
    ctx.deployment, ctx.upstream_seconds, ctx.ttft_seconds, ctx.error_type = Deployment("pr", "mo"), 0.25, 0.125, "et"
    ctx.endpoint, ctx.trace_id, ctx.route_by, ctx.route_score = "responses", "tr", "rule", 0.5
    recorder.start()
    recorder.finish(None, ctx, 502, None, {"prompt_tokens": 3, "completion_tokens": 4, "estimated": True})  # type: ignore[typeddict-unknown-key]
    got = rows[0]._asdict()
    assert isinstance(got.pop("ts"), datetime) and got.pop("latency_ms") > 0
    assert got == {
        "request_id": "rid", "agent": "ag", "requested_model": "", "route": "rt", "backend": "be", "deployment_model": "mo", "status": 502,
        "outcome": "error", "cache": "miss", "dedupe": "leader", "stream": False, "upstream_ms": 250.0, "ttft_ms": 125.0, "prompt_tokens": 3,
        "completion_tokens": 4, "attempts": 2, "error_type": "et", "prompt": None, "completion": None, "endpoint": "responses", "trace_id": "tr",
        "route_by": "rule", "route_score": 0.5, "price_usd": 0.0, "usage_estimated": True, "reference_usd": 0.0,
    }  # fmt: skip
    assert list(Row._fields) == [c.key for c in RequestLog.__table__.columns if c.key != "id"]
