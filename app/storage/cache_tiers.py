"""Persistent tiers of the response cache: one small interface, the SQL table behind it.

The Redis tier (several replicas, ``state.url: redis://``) implements the same :class:`CacheTier`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.models import CacheEntry

_TABLE = cast(Table, CacheEntry.__table__)
#: rows deleted per statement when the sweep evicts (keeps bound parameters within limits)
_EVICT_BATCH = 500
_SQLITE_READ = "SELECT body FROM cache_entries WHERE key = ? AND expires_at > ?"


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """One entry to insert or replace."""

    key: str
    namespace: str
    body: bytes
    created_at: float
    expires_at: float


class CacheTier(Protocol):
    """Where cached answers outlive the process; values are opaque bytes, keys are SHA-256 hex.

    Time is passed in by the caller (the cache's injectable clock), never read here.
    """

    async def get(self, key: str, now: float) -> bytes | None:
        """The entry's bytes when present and not expired at ``now``."""
        ...

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        """Insert or replace entries, as one batch where the store allows."""
        ...

    async def sweep(self, now: float) -> int:
        """Delete expired entries, then the soonest-expiring ones while over the size limit; return how many went."""
        ...

    async def aclose(self) -> None: ...


class SqlCacheTier:
    """The ``cache_entries`` table: reads are one primary-key SELECT, writes are upserts."""

    def __init__(self, engine: AsyncEngine, *, max_total_bytes: int) -> None:
        self._engine = engine
        self._max_total_bytes = max_total_bytes
        self._dialect = engine.dialect.name
        database = engine.url.database
        # SQLite reads skip the async pool: one connection on one thread of its own costs a tenth
        self._sqlite_path = database if self._dialect == "sqlite" and database and database != ":memory:" else None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None

    async def get(self, key: str, now: float) -> bytes | None:
        if self._sqlite_path is not None:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-read")
            return await asyncio.get_running_loop().run_in_executor(self._reader, self._sqlite_get, key, now)
        query = select(_TABLE.c.body).where(_TABLE.c.key == key, _TABLE.c.expires_at > now)
        async with self._engine.connect() as conn:
            body = (await conn.execute(query)).scalar_one_or_none()
        return bytes(body) if body is not None else None

    def _sqlite_get(self, key: str, now: float) -> bytes | None:
        # runs on the reader thread only; autocommit, so every read sees the latest commit
        if self._reader_conn is None:
            assert self._sqlite_path is not None
            self._reader_conn = sqlite3.connect(self._sqlite_path, check_same_thread=False, isolation_level=None)
            self._reader_conn.execute("PRAGMA busy_timeout=5000")
            self._reader_conn.execute("PRAGMA query_only=1")
        row = self._reader_conn.execute(_SQLITE_READ, (key, now)).fetchone()
        return bytes(row[0]) if row is not None else None

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        if not entries:
            return
        rows: list[dict[str, Any]] = [
            {"key": e.key, "namespace": e.namespace[:128], "body": e.body, "size": len(e.body), "created_at": e.created_at, "expires_at": e.expires_at} for e in entries
        ]
        async with self._engine.begin() as conn:
            if self._dialect in ("sqlite", "postgresql"):
                insert = (sqlite.insert if self._dialect == "sqlite" else postgresql.insert)(_TABLE)
                changed = {c: insert.excluded[c] for c in ("namespace", "body", "size", "created_at", "expires_at")}
                await conn.execute(insert.on_conflict_do_update(index_elements=[_TABLE.c.key], set_=changed), rows)
            else:
                await conn.execute(delete(_TABLE).where(_TABLE.c.key.in_([r["key"] for r in rows])))
                await conn.execute(_TABLE.insert(), rows)

    async def sweep(self, now: float) -> int:
        async with self._engine.begin() as conn:
            removed = (await conn.execute(delete(_TABLE).where(_TABLE.c.expires_at <= now))).rowcount or 0
            total = int((await conn.execute(select(func.coalesce(func.sum(_TABLE.c.size), 0)))).scalar_one())
            excess = total - self._max_total_bytes
            while excess > 0:
                # every entry has the same TTL, so the soonest to expire is the oldest (and indexed)
                batch = (await conn.execute(select(_TABLE.c.key, _TABLE.c.size).order_by(_TABLE.c.expires_at).limit(_EVICT_BATCH))).all()
                if not batch:
                    break
                victims: list[str] = []
                for key, size in batch:
                    victims.append(key)
                    excess -= size
                    if excess <= 0:
                        break
                await conn.execute(delete(_TABLE).where(_TABLE.c.key.in_(victims)))
                removed += len(victims)
        return removed

    async def aclose(self) -> None:
        # the engine belongs to Services, which disposes of it; the reader thread is ours
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.get_running_loop().run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=True)

    def _close_reader(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None
