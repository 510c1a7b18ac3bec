"""The response cache on Redis: a tier every replica reads, put in front of the SQL table.

:meth:`app.state.redis.RedisStateStore.cache_tier` builds :class:`LayeredTier` on the store's own
Redis and key prefix; the table still holds every entry, so nothing is lost while Redis is away.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Protocol, cast

import redis.asyncio as aioredis

from app.storage.cache_tiers import CacheWrite, SqlCacheTier

__all__ = ["LayeredTier", "RedisCacheTier", "RedisHealth"]

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


class RedisCacheTier:
    """Entries as Redis strings ``{prefix}cache:{key}`` with a native TTL; every replica reads them.

    A value is the entry's ``expires_at`` (8 bytes) then its bytes: the TTL is set relative to the
    writer's clock, which need not be Redis's, so the expiry time itself decides at ``now``.
    """

    write_delay_s = 0.05

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix + "cache:"

    async def get(self, key: str, now: float) -> bytes | None:
        raw = cast(bytes | None, await self._redis.get(self._prefix + key))
        if raw is None or _EXPIRES_AT.unpack_from(raw)[0] <= now:
            return None
        return raw[_EXPIRES_AT.size :]

    async def put(self, entries: Sequence[CacheWrite]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for e in entries:
                ttl_ms = math.ceil((e.expires_at - e.created_at) * 1000)
                if ttl_ms > 0:
                    pipe.set(self._prefix + e.key, _EXPIRES_AT.pack(e.expires_at) + e.body, px=ttl_ms)
            await pipe.execute()

    async def sweep(self, now: float) -> int:
        return 0  # Redis expires entries itself

    async def get_shared(self, key: str, now: float) -> bytes | None:
        return await self.get(key, now)

    async def put_shared(self, entries: Sequence[CacheWrite]) -> None:
        await self.put(entries)

    async def aclose(self) -> None:
        await self._redis.aclose()


class LayeredTier:
    """Redis in front of the SQL table: reads try Redis, then the table (copying a find back to Redis); writes go to both.

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

    async def get(self, key: str, now: float) -> bytes | None:
        if not self._state.degraded:
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
        await self._put_redis(entries)

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
