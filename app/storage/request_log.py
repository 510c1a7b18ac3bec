"""The request log writer: rows queue up in memory and reach the database in batches, off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, NamedTuple, cast

from sqlalchemy import Integer, String, Table, bindparam, delete, insert, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Insert

from app.metrics import Metrics
from app.storage.db import BulkInsert, writing
from app.storage.models import RequestLog
from app.storage.write_behind import WriteBehind

log = logging.getLogger("admiral.request_log")

TABLE = cast(Table, RequestLog.__table__)
#: every column but the autoincrement id: each row has them all
_INSERTED = [c.key for c in TABLE.columns if c is not TABLE.c.id]


class Row(NamedTuple):
    """A request log row: a value for every column but the id.

    A tuple rather than a dict: made once per request, and a dict of these 28 keys costs several
    times as much to make and free.
    """

    ts: datetime
    request_id: str
    agent: str
    requested_model: str
    route: str
    backend: str | None
    deployment_model: str | None
    status: int
    outcome: str
    cache: str
    dedupe: str | None
    stream: bool
    latency_ms: float
    upstream_ms: float | None
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    error_type: str | None
    prompt: str | None
    completion: str | None
    endpoint: str
    trace_id: str | None
    route_by: str | None
    route_score: float | None
    price_usd: float
    usage_estimated: bool
    reference_usd: float


#: String columns, by their place in a Row, and their lengths: values are cut to fit so one odd row never poisons a batch
_LENGTHS = [(Row._fields.index(c.name), c.type.length) for c in TABLE.columns if isinstance(c.type, String) and c.type.length]


def _fit(row: Row) -> Row:
    for index, length in _LENGTHS:
        value = row[index]
        if isinstance(value, str) and len(value) > length:
            values = list(row)
            values[index] = value[:length]
            row = Row._make(values)
    return row


#: ``None``'s adapter: gives None back, so it binds as NULL. A method of an empty dict rather than a
#: Python function: sqlite3 calls it for each NULL of each row, and a C call costs no frame
_null = cast(Callable[[None], None], {}.get)
_ONE_SECOND = timedelta(seconds=1)


class SqliteBinds:
    """Request-log rows bound for SQLite without the generic path's per-value costs, stored as SQLAlchemy stores them.

    A row per request pays these (callgrind, per cache hit): ``None`` goes through sqlite3's
    adapter lookup, whose failed ``PrepareProtocol.__adapt__`` formats an ``AttributeError`` only
    to drop it (34 k instructions for a row's ten NULLs, 16 k with the adapters); ``ts`` through
    ``DATETIME``'s processor, a ``%`` format of seven fields in Python, and the flags through
    ``Boolean``'s, on the event loop (41 k with the rest of a row's processing, 13 k this way).
    Here the adapters are registered (for the process: ``None`` stays NULL, a bool is the 0 or 1
    it was bound as; both C callables, which cost sqlite3 no Python frame per value), the flags go
    as they are, and ``ts`` as the same text, its date and seconds written once a second. And a
    column that is NULL in each row of a batch is left out of its INSERT (none of the nullable
    columns has a default, so it is stored NULL all the same): those NULLs are not bound at all.
    """

    #: the columns bound as they are (the flags) or as the text this class makes (``ts``)
    TEXT = ("ts",)
    AS_IS = ("stream", "usage_estimated")
    MAX_INSERTS = 32

    def __init__(self, dialect: Dialect) -> None:
        sqlite3.register_adapter(type(None), _null)
        sqlite3.register_adapter(bool, int)
        # the second the last ts fell in, and its text (a tzinfo no time has: none yet)
        self._tzinfo: object = object()
        self._second = self._next_second = datetime.min
        self._prefix = ""
        self._dialect = dialect
        self._nullable = [(c.key, attrgetter(c.key)) for c in TABLE.columns if c.nullable and c.key in _INSERTED]
        #: the INSERT for each set of columns left out (a few: which columns are NULL throughout a batch),
        #: at most ``MAX_INSERTS`` of them (started afresh beyond, so odd traffic cannot grow it without end)
        self._inserts: dict[tuple[str, ...], BulkInsert] = {}

    @classmethod
    def statement(cls) -> Insert:
        binds = {name: bindparam(name, type_=String()) for name in cls.TEXT} | {name: bindparam(name, type_=Integer()) for name in cls.AS_IS}
        return insert(TABLE).values(**binds)

    async def execute(self, conn: AsyncConnection, rows: Sequence[Row]) -> None:
        """Insert ``rows`` (fitted), in the caller's transaction."""
        left_out = tuple(name for name, get in self._nullable if list(map(get, rows)).count(None) == len(rows))
        bulk = self._inserts.get(left_out)
        if bulk is None:
            if len(self._inserts) >= self.MAX_INSERTS:
                self._inserts.clear()
            bulk = self._inserts[left_out] = BulkInsert(self.statement(), self._dialect, [key for key in _INSERTED if key not in left_out], get=attrgetter)
        await bulk.execute(conn, rows, given={"ts": [self._text(row.ts) for row in rows]})

    def _text(self, ts: datetime) -> str:
        # the fields as they are (SQLite keeps no time zone); a second's date and time are written
        # once, as comparing a datetime costs far less than formatting one (times of one tzinfo
        # compare field by field, as the text does)
        if not (ts.tzinfo is self._tzinfo and self._second <= ts < self._next_second):
            second = ts.replace(microsecond=0)
            self._tzinfo, self._second, self._next_second = ts.tzinfo, second, second + _ONE_SECOND
            self._prefix = second.replace(tzinfo=None).isoformat(" ")
        return f"{self._prefix}.{ts.microsecond:06d}"


class RequestLogWriter:
    """Implements the recorder's ``LogSink``: ``submit`` never waits; a background task inserts in batches.

    Rows live in a bounded queue (``queue_size``); a full queue drops the row and counts it in
    ``admiral_request_log_dropped_total``. A batch the database refuses is kept and retried with
    backoff, so an outage loses rows only once the queue overflows. ``close`` flushes what is left.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Metrics,
        *,
        queue_size: int = 10000,
        batch_size: int = 500,
        retention_days: int | None = 30,
        flush_interval_s: float = 0.5,
        prune_interval_s: float = 3600.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        drop_log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        # batches skip SQLAlchemy's per-value processing, which would run on the event loop (measured
        # on PostgreSQL, batches of 30 rows: 18 µs of CPU a row against 24)
        self._bulk: BulkInsert | SqliteBinds | None = None
        if engine.dialect.name == "sqlite":
            self._bulk = SqliteBinds(engine.dialect)
        elif engine.dialect.name == "postgresql":
            self._bulk = BulkInsert(insert(TABLE), engine.dialect, _INSERTED, get=attrgetter)
        # a deque, not an asyncio.Queue: only this loop touches it and nobody waits on it
        self._queue: deque[Row] = deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._retention_days = retention_days
        self._prune_interval_s = prune_interval_s
        self._backoff_s = backoff_s
        self._drop_log_interval_s = drop_log_interval_s
        self._clock = clock
        self._batch: list[Row] = []  # taken off the queue, not yet written
        self._writer = WriteBehind(self._drain, name="request-log-writer", interval_s=flush_interval_s, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self._pruner: asyncio.Task[None] | None = None
        self._dropped_since_log = 0
        self._last_drop_log = float("-inf")
        self.written = 0
        self.failures = 0

    # -- the request side -------------------------------------------------------------------

    def submit(self, row: Row | dict[str, Any]) -> None:
        """Queue ``row`` (a dict of every column but the id is made a Row)."""
        if isinstance(row, dict):
            row = Row(**row)
        queue = self._queue
        if len(queue) >= self._queue_size:
            self._dropped(1)
            return
        queue.append(row)
        if len(queue) >= self._batch_size:
            self._writer.wake()

    def _dropped(self, count: int) -> None:
        self._metrics.log_dropped.inc(count)
        self._dropped_since_log += count
        now = self._clock()
        if now - self._last_drop_log >= self._drop_log_interval_s:
            log.warning("request log queue full: dropped %d row(s) (the database is slow or down)", self._dropped_since_log)
            self._last_drop_log = now
            self._dropped_since_log = 0

    @property
    def pending(self) -> int:
        """Rows accepted but not yet in the database."""
        return len(self._queue) + len(self._batch)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._writer.start()
        if self._retention_days:
            self._pruner = asyncio.create_task(self._prune_loop(), name="request-log-retention")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is left, then stop; gives up (and says how many rows) after ``timeout_s``."""
        deadline = self._clock() + timeout_s
        await self._writer.stop(timeout_s)
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        before = self.written
        while self.pending:
            self._fill()
            if await self._write(self._batch):
                self._batch = []
            elif self._clock() >= deadline:
                log.error("request log: database unreachable at shutdown; %d row(s) not written", self.pending)
                return
            else:
                await asyncio.sleep(min(self._backoff_s, max(0.0, deadline - self._clock())))
        if self.written > before:
            log.info("request log: wrote %d queued row(s) at shutdown", self.written - before)

    # -- the background side ----------------------------------------------------------------

    def _fill(self) -> None:
        while len(self._batch) < self._batch_size and self._queue:
            self._batch.append(self._queue.popleft())

    async def _drain(self) -> bool:
        """Write full batches while there are some (what is queued at least once); False when the database failed."""
        while not self._writer.stopping:
            self._fill()
            if not self._batch:
                break
            if not await self._write(self._batch):
                return False  # the batch is kept; new rows wait in the queue (and overflow is counted) meanwhile
            self._batch = []
            if len(self._queue) < self._batch_size:
                break
        return True

    async def _write(self, rows: list[Row]) -> bool:
        """Insert ``rows``; False (rows kept) when the database failed, True when done with them."""
        if not rows:
            return True
        try:
            try:
                await self._insert(list(map(_fit, rows)))
                self.written += len(rows)
            except (DataError, IntegrityError):
                # one bad row must not hold the rest hostage: write them one by one, drop the bad ones
                await self._insert_one_by_one(rows)
        except Exception as exc:
            self.failures += 1
            log.warning("request log: writing %d row(s) failed, will retry: %s", len(rows), _short(exc))
            return False
        return True

    async def _insert(self, rows: list[Row]) -> None:
        async with writing(self._engine) as conn:
            if self._bulk is not None:
                await self._bulk.execute(conn, rows)
            else:
                await conn.execute(insert(TABLE), [row._asdict() for row in rows])

    async def _insert_one_by_one(self, rows: list[Row]) -> None:
        """Takes each row out of ``rows`` once written or refused; an outage leaves the rest there."""
        while rows:
            try:
                await self._insert([_fit(rows[0])])
                self.written += 1
            except (DataError, IntegrityError) as exc:
                self._metrics.log_dropped.inc()
                log.error("request log: dropping a row the database refuses (request %s): %s", rows[0].request_id, _short(exc))
            rows.pop(0)

    async def _prune_loop(self) -> None:
        while True:
            try:
                deleted = await self.prune()
                if deleted:
                    log.info("request log: pruned %d row(s) older than %d days", deleted, self._retention_days)
            except Exception as exc:
                log.warning("request log: pruning failed: %s", _short(exc))
            await asyncio.sleep(self._prune_interval_s)

    async def prune(self, now: datetime | None = None, chunk: int = 10000) -> int:
        """Delete rows older than ``retention_days``, a chunk at a time so no lock is held long."""
        if not self._retention_days:
            return 0
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self._retention_days)
        total = 0
        while True:
            ids = select(TABLE.c.id).where(TABLE.c.ts < cutoff).limit(chunk).scalar_subquery()
            async with writing(self._engine) as conn:
                result = await conn.execute(delete(TABLE).where(TABLE.c.id.in_(ids)))
            total += result.rowcount or 0
            if (result.rowcount or 0) < chunk:
                return total


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
