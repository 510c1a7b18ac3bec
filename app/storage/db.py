"""The async engine for the configured database URL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Insert, event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the stats API read while the log writer inserts
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    # a checkpoint every 10 000 WAL pages (40 MB) rather than 1 000: cache entries dirty random
    # index pages, and a page changed again before the checkpoint is copied to the file once
    # (measured with sqlite3 alone, upserts into 100k entries in batches of 256: 10.9 µs a row against 15.1)
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


def _closed_by_the_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, a terminated backend) is replaced before use.

    In place of ``pool_pre_ping``, whose ping on asyncpg is three round trips (BEGIN, an empty
    query, ROLLBACK) before every statement the pool hands out: the driver already knows a socket
    the server closed, so asking it costs nothing. The pool retries the checkout on a new connection.
    """
    is_closed = getattr(dbapi_connection.driver_connection, "is_closed", None)
    if is_closed is not None and is_closed():
        raise DisconnectionError("the server closed this connection")


#: a server database's connections: kept open, and opened beyond them under load
POOL_SIZE, POOL_OVERFLOW = 10, 10


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_recycle=1800)
    event.listen(engine.sync_engine, "checkout", _closed_by_the_server)
    return engine


#: SQLite: the one-writer-at-a-time lock of each engine (made on first use, on the engine's loop)
_WRITERS: WeakKeyDictionary[AsyncEngine, asyncio.Lock] = WeakKeyDictionary()


@contextlib.asynccontextmanager
async def writing(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A write transaction; on SQLite the process's writers (request log, cache) take turns.

    SQLite has one write lock per file. Two pooled connections writing at once make one of them
    wait inside SQLite's busy handler, on a thread, for as long as the other's transaction lasts,
    and give up with "database is locked" after ``busy_timeout``; here they queue on the loop
    instead, and SQLite's lock is only ever contended by other processes (``--workers``).
    """
    if engine.dialect.name != "sqlite":
        async with engine.begin() as conn:
            yield conn
        return
    lock = _WRITERS.get(engine)
    if lock is None:
        lock = _WRITERS[engine] = asyncio.Lock()
    async with lock, engine.begin() as conn:
        yield conn


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


class BulkInsert:
    """An INSERT compiled once, whose batches go to the driver as plain tuples (SQLite, PostgreSQL).

    SQLAlchemy's executemany processes every bound value in Python, on the event loop (measured on
    the loop's thread, per row: a cache entry 8 µs, a request-log row 21 µs; this way 3.5 and 10;
    about 2 ms a batch either way). Values still pass through their type's bind processor, the one
    SQLAlchemy would apply, so the rows stored are the same.
    """

    def __init__(self, statement: Insert, dialect: Dialect, keys: Sequence[str], get: Callable[[str], Callable[[Any], Any]] = itemgetter) -> None:
        """``get`` makes the function that takes a key's value out of a row (a mapping's by default)."""
        # for executemany: on PostgreSQL a single-row INSERT would also return the new ids
        compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        names = compiled.positiontup
        if names is None or sorted(names) != sorted(keys):
            raise ValueError(f"expected one positional parameter per key {list(keys)}, the statement has {names}")
        self._sql = compiled.string
        self._columns = [(name, get(name), compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in names]

    async def execute(self, conn: AsyncConnection, rows: Sequence[Any], given: Mapping[str, Iterable[Any]] | None = None) -> None:
        """Run the statement for each row, in the caller's transaction; every row has every key.

        ``given``: the values to bind for a key, in the rows' order, in place of the rows' own.
        """
        given = given or {}
        # column by column, so the loops over values run in C (map, zip), not in Python
        columns = [
            given[name] if name in given else map(process, map(get, rows)) if process else map(get, rows) for name, get, process in self._columns
        ]
        await conn.exec_driver_sql(self._sql, list(zip(*columns)))
