"""Responses API responses kept per agent (``store: true``): written off the request path, read by id.

A stored response holds the response object as its client got it, the conversation that led to
it (its own answer included) as chat messages and as Responses items, so ``previous_response_id``
continues without walking a chain, translated or forwarded, and the request's input as Responses items.
``put`` never waits: the row waits in memory until a background task has written it, and reads
look there first, so a continuation sent right after its predecessor's answer finds it on this
process. Rows older than the request log's ``retention_days`` are pruned hourly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from sqlalchemy import Table, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.storage.models import StoredResponse
from app.storage.write_behind import WriteBehind

log = logging.getLogger("admiral.responses")

TABLE = cast(Table, StoredResponse.__table__)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored response: its object as sent and the chat messages it continues from."""

    id: str
    agent: str
    created_at: float
    conversation: list[dict[str, Any]]
    response: dict[str, Any]
    #: the request's input as Responses items (for ``GET /v1/responses/{id}/input_items``)
    input_items: list[dict[str, Any]] = field(default_factory=list)
    #: the conversation as Responses items, its own output included, for a continuation forwarded
    #: to a provider with the Responses API (None in rows stored before it was kept)
    items: list[dict[str, Any]] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent": self.agent,
            "created_at": self.created_at,
            # the column holds the chat messages and, beside them, the input items
            "conversation": orjson.dumps({"messages": self.conversation, "input": self.input_items, "items": self.items}),
            "response": orjson.dumps(self.response),
        }

    @classmethod
    def of_row(cls, row: Any) -> StoredRecord:
        kept = orjson.loads(row.conversation)
        return cls(row.id, row.agent, row.created_at, kept["messages"], orjson.loads(row.response), kept["input"], kept.get("items"))


class ResponseStore:
    """The ``stored_responses`` table with a write-behind queue; every read is scoped to one agent."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retention_days: int | None = 30,
        max_pending: int = 10000,
        prune_interval_s: float = 3600.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        # a retry after a failure whose insert did land must not fail on its own rows
        self._insert = (sqlite_insert if engine.dialect.name == "sqlite" else pg_insert)(TABLE).on_conflict_do_nothing()
        self._retention_days = retention_days
        self._max_pending = max_pending
        self._prune_interval_s = prune_interval_s
        self._backoff_s = backoff_s
        self._clock = clock
        #: accepted, not yet in the table (reads find them here)
        self._pending: dict[str, StoredRecord] = {}
        #: ids deleted while their insert was on its way: absent to reads, deleted from the table by
        #: the next flush (kept until that delete succeeds, so a failed one is tried again)
        self._doomed: set[str] = set()
        self._writing: set[str] = set()
        self._writer = WriteBehind(self._flush, name="stored-responses-writer", backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self._pruner: asyncio.Task[None] | None = None
        self.dropped = 0
        #: writes the database refused (each retried)
        self.failures = 0

    # -- the request side -------------------------------------------------------------------

    def put(self, record: StoredRecord) -> None:
        """Keep ``record``; returns at once (a full queue drops it, with a warning)."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            log.warning("stored responses: %d waiting to be written; response %s not stored (the database is slow or down)", len(self._pending), record.id)
            return
        self._pending[record.id] = record
        self._writer.wake()

    async def get(self, response_id: str, agent: str) -> StoredRecord | None:
        """The response ``response_id`` if ``agent`` stored it (another agent's is as good as absent)."""
        record = self._pending.get(response_id)
        if record is not None:
            return record if record.agent == agent else None
        if response_id in self._doomed:
            return None
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(TABLE).where(TABLE.c.id == response_id, TABLE.c.agent == agent))).first()
        if row is None:
            return None
        return StoredRecord.of_row(row)

    async def delete(self, response_id: str, agent: str) -> bool:
        """Delete ``agent``'s response ``response_id``; False when it has none by that id."""
        record = self._pending.get(response_id)
        if record is not None:
            if record.agent != agent:
                return False
            del self._pending[response_id]
            if response_id in self._writing:
                # its insert may land after this returns: reads skip it until the flush has deleted it
                self._doomed.add(response_id)
                self._writer.wake()
            return True
        if response_id in self._doomed:
            return False
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(TABLE).where(TABLE.c.id == response_id, TABLE.c.agent == agent))
        return bool(result.rowcount)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._writer.start()
        if self._retention_days:
            self._pruner = asyncio.create_task(self._prune_loop(), name="stored-responses-retention")

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Write what waits (giving up after ``timeout_s``), then stop."""
        await self._writer.stop(timeout_s)
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while (self._pending or self._doomed) and not await self._flush():
                    await asyncio.sleep(self._backoff_s)
        if self._pending:
            log.error("stored responses: database unreachable at shutdown; %d response(s) not stored", len(self._pending))

    # -- the background side ----------------------------------------------------------------

    async def _flush(self) -> bool:
        """Insert what is pending, then delete what was deleted meanwhile; False (kept for a retry) when the database failed."""
        batch = list(self._pending.values())
        if not batch and not self._doomed:
            return True
        self._writing = {r.id for r in batch}
        try:
            if batch:
                async with self._engine.begin() as conn:
                    await conn.execute(self._insert, [r.row() for r in batch])
            # deleted while the insert was on its way (until the last await, so none is missed)
            while doomed := set(self._doomed):
                async with self._engine.begin() as conn:
                    await conn.execute(delete(TABLE).where(TABLE.c.id.in_(doomed)))
                self._doomed -= doomed
        except Exception as exc:  # noqa: BLE001 -- any database failure: the rows wait for the next try
            self.failures += 1
            log.warning(
                "stored responses: writing %d response(s) failed, will retry: %s",
                len(batch),
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            )
            return False
        finally:
            self._writing = set()
        for record in batch:
            # a put after the batch was taken replaced nothing: ids are never reused
            if self._pending.get(record.id) is record:
                del self._pending[record.id]
        return True

    async def _prune_loop(self) -> None:
        while True:
            try:
                deleted = await self.prune()
                if deleted:
                    log.info("stored responses: pruned %d older than %d days", deleted, self._retention_days)
            except Exception as exc:  # noqa: BLE001 -- pruning fails quietly and runs again in an hour
                log.warning("stored responses: pruning failed: %s", str(exc)[:300])
            await asyncio.sleep(self._prune_interval_s)

    async def prune(self, now: float | None = None, chunk: int = 10000) -> int:
        """Delete responses older than ``retention_days``, a chunk at a time so no lock is held long."""
        if not self._retention_days:
            return 0
        cutoff = (self._clock() if now is None else now) - self._retention_days * 86400
        total = 0
        while True:
            ids = select(TABLE.c.id).where(TABLE.c.created_at < cutoff).limit(chunk).scalar_subquery()
            async with self._engine.begin() as conn:
                result = await conn.execute(delete(TABLE).where(TABLE.c.id.in_(ids)))
            total += result.rowcount or 0
            if (result.rowcount or 0) < chunk:
                return total
