"""The response cache on Redis: a tier every replica reads, put in front of the SQL table.

:meth:`app.state.redis.RedisStateStore.cache_tier` builds :class:`LayeredTier` on the store's own
Redis and key prefix; the table still holds every entry, so nothing is lost while Redis is away.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Sequence
from typing import Protocol, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.state.redis_link import RedisLink
from app.state.redis_watch import NOTICES
from app.storage.cache_tiers import CacheWrite, SqlCacheTier

__all__ = ["LayeredTier", "RedisCacheTier", "RedisHealth"]

log = logging.getLogger("admiral.cache")

_EXPIRES_AT = struct.Struct(">d")


class RedisHealth(Protocol):
    """What :class:`LayeredTier` needs of the state store: whether Redis is down, and a check."""

    @property
    def degraded(self) -> bool:
        """True while the store answers from in-process state (Redis unreachable)."""
        ...

    async def ping(self) -> bool:
        """Check Redis (going degraded when it does not answer); False while degraded."""
        ...

    def may_hold(self, key: str) -> bool:
        """False when Redis surely lacks the entry ``key`` (no replica stored it lately)."""
        ...


class RedisCacheTier:
    """Entries as Redis strings ``{prefix}cache:{key}`` with a native TTL; every replica reads them.

    A value is the entry's ``expires_at`` (8 bytes) then its bytes: the TTL is set relative to the
    writer's clock, which need not be Redis's, so the expiry time itself decides at ``now``.

    Shared writes (a flight leader's answer, :meth:`put_shared`) wait for the leader's lease
    release, which carries them in its own round trip (:meth:`take_writes`); whatever no release
    took by the next turn of the event loop is sent alone. The batched :meth:`put` then skips them.
    """

    write_delay_s = 0.05
    #: shared writes remembered so that the batched write skips them (beyond it, it writes them again)
    REMEMBERED = 65536

    def __init__(self, client: aioredis.Redis, prefix: str, *, link: RedisLink | None = None) -> None:
        """Reads go through ``link`` when given (the state store's shared connection), else ``client``."""
        self._redis = client
        self._link = link
        self._prefix = prefix + "cache:"
        self._notices = prefix + NOTICES
        self._queued: list[tuple[str, bytes, int]] = []
        #: key -> expires_at of what went to Redis with a shared write
        self._shared: dict[str, float] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def get(self, key: str, now: float) -> bytes | None:
        name = self._prefix + key
        raw = cast(bytes | None, await (self._link.call("GET", name) if self._link is not None else self._redis.get(name)))
        if raw is None or _EXPIRES_AT.unpack_from(raw)[0] <= now:
            return None
        return raw[_EXPIRES_AT.size :]

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        writes = [w for w in map(self._write, entries) if w is not None and self._shared.pop(w[0], None) != _expiry(w[1])]
        if writes:
            await self._send(writes)

    async def sweep(self, now: float) -> int:
        return 0  # Redis expires entries itself

    async def get_shared(self, key: str, now: float) -> bytes | None:
        return await self.get(key, now)

    async def put_shared(self, entries: Sequence[CacheWrite]) -> None:
        writes = [w for w in map(self._write, entries) if w is not None]
        if not writes:
            return
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._send_queued)
        self._queued += writes
        if len(self._shared) + len(writes) > self.REMEMBERED:
            self._shared.clear()
        self._shared.update((w[0], _expiry(w[1])) for w in writes)

    def take_writes(self) -> list[tuple[str, bytes, int]]:
        """The shared writes not sent yet, as (Redis key, value, PX ms); the caller sends them now."""
        writes, self._queued = self._queued, []
        return writes

    async def aclose(self) -> None:
        self._send_queued()
        for task in list(self._sending):
            await task
        await self._redis.aclose()

    def _write(self, e: CacheWrite) -> tuple[str, bytes, int] | None:
        ttl_ms = math.ceil((e.expires_at - e.created_at) * 1000)
        return (self._prefix + e.key, _EXPIRES_AT.pack(e.expires_at) + e.body, ttl_ms) if ttl_ms > 0 else None

    def _send_queued(self) -> None:
        writes = self.take_writes()
        if writes:
            task = asyncio.get_running_loop().create_task(self._send_alone(writes), name="admiral-shared-cache-write")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_alone(self, writes: list[tuple[str, bytes, int]]) -> None:
        try:
            await self._send(writes)
        except (RedisError, OSError) as exc:
            for key, _, _ in writes:
                self._shared.pop(key, None)  # the batched write sends it again
            log.warning("shared cache write failed; the entries go with the next batch: %s: %s", type(exc).__name__, exc)

    async def _send(self, writes: Sequence[tuple[str, bytes, int]]) -> None:
        """The writes and their notice to every replica's key filter, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value, px in writes:
                pipe.set(key, value, px=px)
            pipe.publish(self._notices, "c:" + " ".join(w[0] for w in writes))
            await pipe.execute()


def _expiry(value: bytes) -> float:
    return float(_EXPIRES_AT.unpack_from(value)[0])


class LayeredTier:
    """Redis in front of the SQL table: reads try Redis, then the table (copying a find back to Redis); writes go to both.

    A key that no replica stored lately (the state store's key filter says so) is read from neither;
    this replica's entries written while Redis was away are still read from the table. Entries other
    replicas wrote to the table alone during an outage are not seen once Redis is back (asked anew).

    Redis's health is the state store's: while it reports Redis down, Redis is skipped; a Redis
    error makes it check (``ping``), so an outage is logged once, shown by ``admiral_state_degraded``
    and readiness, and probed until Redis answers. An error while Redis answers is raised.
    """

    def __init__(self, redis: RedisCacheTier, sql: SqlCacheTier, state: RedisHealth) -> None:
        self._redis = redis
        self._sql = sql
        self._state = state
        # other replicas read what Redis has: it gets entries as soon as Redis would alone
        self.write_delay_s = redis.write_delay_s
        #: keys written while Redis was away
        self._unshared: set[str] = set()

    async def get(self, key: str, now: float) -> bytes | None:
        if not self._state.degraded:
            if not self._state.may_hold(key) and key not in self._unshared:
                return None  # no replica stored it: neither Redis nor the table has it
            try:
                body = await self._redis.get(key, now)
            except Exception as exc:
                await self._redis_failed(exc)
            else:
                if body is not None:
                    return body
        entry = await self._sql.get_entry(key, now)
        if entry is None:
            return None
        body, expires_at = entry
        await self._put_redis([CacheWrite(key, "", body, now, expires_at)])  # stored during an outage, or evicted
        return body

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        if self._state.degraded:
            # in the table only, where the key filter cannot tell: read there even when Redis lacks them
            if len(self._unshared) + len(entries) > RedisCacheTier.REMEMBERED:
                self._unshared.clear()
            self._unshared.update(e.key for e in entries)
        try:
            await self._put_redis(entries)
        finally:
            await self._sql.put(entries)

    async def sweep(self, now: float) -> int:
        return await self._redis.sweep(now) + await self._sql.sweep(now)

    async def get_shared(self, key: str, now: float) -> bytes | None:
        if self._state.degraded:
            return None
        try:
            return await self._redis.get(key, now)
        except Exception as exc:
            await self._redis_failed(exc)
            return None

    async def put_shared(self, entries: Sequence[CacheWrite]) -> None:
        if not self._state.degraded:
            await self._redis.put_shared(entries)  # queued: no I/O, nothing to fail here

    async def aclose(self) -> None:
        try:
            await self._redis.aclose()
        finally:
            await self._sql.aclose()

    async def _put_redis(self, entries: Sequence[CacheWrite]) -> None:
        if self._state.degraded:
            return
        try:
            await self._redis.put(entries)
        except Exception as exc:
            await self._redis_failed(exc)

    async def _redis_failed(self, exc: Exception) -> None:
        if await self._state.ping():
            raise exc  # Redis answers, so this is no outage but a fault to see
