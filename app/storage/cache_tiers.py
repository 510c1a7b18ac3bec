"""Persistent tiers of the response cache: one small interface, the SQL table behind it.

With ``state.url: redis://`` (several replicas) the state store puts a Redis tier in front of the
table (:meth:`app.state.base.StateStore.cache_tier`, :mod:`app.state.redis_cache`): every replica
reads what any of them stored, and the table still holds every entry, so nothing is lost while
Redis is away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import Insert, Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.db import BulkInsert, writing
from app.storage.key_filter import StoredKeys
from app.storage.models import CacheEntry
from app.storage.sqlite_reader import SqliteReader

_TABLE = cast(Table, CacheEntry.__table__)
#: rows deleted per statement when the sweep evicts (keeps bound parameters within limits)
_EVICT_BATCH = 500
#: one entry by key, unless expired; built once (the SQLite reader runs its compiled text)
_READ = select(_TABLE.c.body, _TABLE.c.expires_at).where(_TABLE.c.key == bindparam("key"), _TABLE.c.expires_at > bindparam("now"))
_TOTAL = select(func.coalesce(func.sum(_TABLE.c.size), 0))


class CacheWrite(NamedTuple):
    """One entry to insert or replace (a tuple: pending writes are not the garbage collector's work)."""

    key: str
    namespace: str
    body: bytes
    created_at: float
    expires_at: float


class CacheTier(Protocol):
    """Where cached answers outlive the process; values are opaque bytes, keys are SHA-256 hex.

    Time is passed in by the caller (the cache's injectable clock), never read here.
    """

    #: how long the cache gathers writes after the first pending one before calling ``put``
    write_delay_s: float

    async def get(self, key: str, now: float) -> bytes | None:
        """The entry's bytes when present and not expired at ``now``."""
        ...

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        """Insert or replace entries, as one batch where the store allows."""
        ...

    async def sweep(self, now: float) -> int:
        """Delete expired entries, then the soonest-expiring ones while over the size limit; return how many went."""
        ...

    async def get_shared(self, key: str, now: float) -> bytes | None:
        """As ``get``, from the part every replica reads at once (Redis), or None where there is none."""
        ...

    async def put_shared(self, entries: Sequence[CacheWrite]) -> None:
        """Write ``entries`` to the part every replica reads, now (``put`` still follows); nothing where there is none."""
        ...

    async def aclose(self) -> None: ...


def _upsert(dialect: str) -> Insert | None:
    """Insert-or-replace by key, where the dialect has it (SQLite, PostgreSQL)."""
    if dialect not in ("sqlite", "postgresql"):
        return None
    insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(_TABLE)
    changed = {c: insert.excluded[c] for c in ("namespace", "body", "size", "created_at", "expires_at")}
    return insert.on_conflict_do_update(index_elements=[_TABLE.c.key], set_=changed)


class SqlCacheTier:
    """The ``cache_entries`` table: reads are one primary-key SELECT, writes are upserts."""

    def __init__(self, engine: AsyncEngine, *, max_total_bytes: int) -> None:
        self._engine = engine
        self._max_total_bytes = max_total_bytes
        self._dialect = engine.dialect.name
        # SQLite gathers a second of entries: measured on a 2-core VM, a flush every 50 ms put a lone
        # client's p50 at 1.2-2.2 ms against 0.9-1.0 ms with one a second (why so small a write costs
        # that much was not pinned down); reads in this process see pending entries meanwhile
        self.write_delay_s = 1.0 if self._dialect == "sqlite" else 0.05
        database = engine.url.database
        # SQLite reads skip the async pool: a connection of their own on a thread of its own, and a
        # key the table cannot hold is not read at all
        self._reader = SqliteReader(database) if self._dialect == "sqlite" and database and database != ":memory:" else None
        self._stored = StoredKeys(self._reader, _TABLE.name) if self._reader is not None else None
        read = _READ.compile(dialect=engine.dialect)
        assert read.positiontup in (None, ["key", "now"]), "the reader passes (key, now) in that order"
        self._read_sql = str(read)
        self._total_sql = str(_TOTAL.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        # built once: making the statement costs more than running it on a small batch
        self._upsert = _upsert(self._dialect)
        # SQLite: batches skip SQLAlchemy's per-value processing, which would run on the event loop
        self._bulk = BulkInsert(self._upsert, engine.dialect, _TABLE.columns.keys()) if self._dialect == "sqlite" and self._upsert is not None else None

    async def get(self, key: str, now: float) -> bytes | None:
        entry = await self.get_entry(key, now)
        return entry[0] if entry is not None else None

    async def get_entry(self, key: str, now: float) -> tuple[bytes, float] | None:
        """The entry's bytes and expiry time when present and not expired at ``now``."""
        if self._reader is not None:
            assert self._stored is not None
            if not await self._stored.may_hold(key):
                return None
            row = await self._reader.fetchone(self._read_sql, (key, now))
        else:
            async with self._engine.connect() as conn:
                row = (await conn.execute(_READ, {"key": key, "now": now})).one_or_none()
        return (bytes(row[0]), float(row[1])) if row is not None else None

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        if not entries:
            return
        rows: list[dict[str, Any]] = [
            {"key": e.key, "namespace": e.namespace[:128], "body": e.body, "size": len(e.body), "created_at": e.created_at, "expires_at": e.expires_at} for e in entries
        ]
        async with writing(self._engine) as conn:
            if self._bulk is not None:
                await self._bulk.execute(conn, rows)
            elif self._upsert is not None:
                await conn.execute(self._upsert, rows)
            else:
                await conn.execute(delete(_TABLE).where(_TABLE.c.key.in_([r["key"] for r in rows])))
                await conn.execute(_TABLE.insert(), rows)
        if self._stored is not None:
            self._stored.add(e.key for e in entries)

    async def sweep(self, now: float) -> int:
        # each step its own short transaction: the size total is a scan of the whole table, and
        # the write lock is the request log's too (SQLite has one per file)
        async with writing(self._engine) as conn:
            removed = (await conn.execute(delete(_TABLE).where(_TABLE.c.expires_at <= now))).rowcount or 0
        excess = await self._total_bytes() - self._max_total_bytes
        while excess > 0:
            async with writing(self._engine) as conn:
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
        if removed and self._stored is not None:
            await self._stored.rebuild()  # forget the deleted keys
        return removed

    async def get_shared(self, key: str, now: float) -> bytes | None:
        return None  # the table is shared, but written in batches: what it holds is read by ``get``

    async def put_shared(self, entries: Sequence[CacheWrite]) -> None:
        return

    async def _total_bytes(self) -> int:
        """The entries' total size, read outside any write transaction (on SQLite by the reader's connection)."""
        if self._reader is not None:
            return int(await self._reader.call(lambda conn: conn.execute(self._total_sql).fetchone()[0]))
        async with self._engine.connect() as conn:
            return int((await conn.execute(_TOTAL)).scalar_one())

    async def aclose(self) -> None:
        # the engine belongs to Services, which disposes of it; the reader is ours
        if self._stored is not None:
            await self._stored.aclose()
        if self._reader is not None:
            await self._reader.aclose()
