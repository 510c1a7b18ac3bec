"""What the cheaper request-log binding for SQLite must keep: every row stored as SQLAlchemy stores it."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from app.metrics import Metrics
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.models import RequestLog
from app.storage.request_log import RequestLogWriter
from tests.test_request_log import row


def _stored(path: Path) -> list[list[tuple[type, Any]]]:
    with sqlite3.connect(path) as conn:
        return [[(type(v), v) for v in r] for r in conn.execute("SELECT * FROM request_log ORDER BY id")]


async def _by_sqlalchemy(path: Path, rows: list[dict[str, Any]]) -> None:
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(insert(RequestLog), rows)
    await engine.dispose()


def _rows() -> list[dict[str, Any]]:
    # the writer formats a second once and reuses it: times within one second, across seconds,
    # minutes and midnight, and back to an earlier second, each with and without microseconds
    start = datetime(2024, 12, 31, 23, 59, 58, 999999, tzinfo=UTC)
    offsets = [0, 1, 2, 1_000_000, 1, 1_500_000, 61_000_000, -3_000_000, 0]
    times = [start + timedelta(microseconds=us) for us in offsets] + [start.replace(microsecond=0)]
    return [
        row(request_id=f"r{i}", ts=ts, stream=i % 2 == 0, usage_estimated=i % 3 == 0, dedupe=None if i % 2 else "leader", upstream_ms=None if i % 3 else 1.5)
        for i, ts in enumerate(times)
    ]


@pytest.mark.asyncio
async def test_rows_across_seconds_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/writer.db"
    await asyncio.to_thread(upgrade_to_head, url)
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), batch_size=3)
    for r in _rows():
        writer.submit(r)
    await writer.close()
    await engine.dispose()
    await _by_sqlalchemy(tmp_path / "sqlalchemy.db", _rows())
    stored = _stored(tmp_path / "writer.db")
    assert len(stored) == len(_rows())
    assert stored == _stored(tmp_path / "sqlalchemy.db")


@pytest.mark.asyncio
async def test_a_batch_written_again_keeps_its_times(tmp_path: Path) -> None:
    # the first write fails (no table yet) after the rows were made ready for SQLite; the retry must not make them again
    url = f"sqlite+aiosqlite:///{tmp_path}/writer.db"
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics(), flush_interval_s=0.01, backoff_s=0.01, max_backoff_s=0.01)
    writer.start()
    for r in _rows():
        writer.submit(r)
    for _ in range(500):
        if writer.failures:
            break
        await asyncio.sleep(0.01)
    assert writer.failures >= 1
    await asyncio.to_thread(upgrade_to_head, url)
    await writer.close()
    await engine.dispose()
    await _by_sqlalchemy(tmp_path / "sqlalchemy.db", _rows())
    assert _stored(tmp_path / "writer.db") == _stored(tmp_path / "sqlalchemy.db")
