"""Shared state on Redis for several replicas, falling back to in-process state during an outage.

Every operation is one atomic command or Lua script, and every clock reading is Redis ``TIME``,
so replicas agree on limits without trusting each other's clocks. Keys live under the configured
prefix: ``{prefix}v:{key}`` values, ``{prefix}gcra:{key}`` rate limits, ``{prefix}quota:{key}``
daily quotas, ``{prefix}win:{key}`` event windows (and ``lock:`` / ``flight:`` for :mod:`app.state.redis_channels`).

Outage handling: a connection error or timeout on any call switches the store to a fresh
:class:`~app.state.memory.MemoryStateStore` — that call and the following ones are answered
in-process, a warning is logged once, ``admiral_state_degraded`` goes to 1 and :meth:`ping`
answers False. A background probe pings Redis every ``probe_interval_s`` and switches back when it
answers. Resynchronisation is a restart from Redis's view: whatever the replica counted, set or
locked in-process during the outage is dropped, and limits, windows and values continue from what
Redis holds (keys written before the outage, minus those that expired). Limits are therefore
per replica during an outage and exact again as soon as Redis answers.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.pipeline.inflight import InflightCoordinator
from app.pipeline.inflight_redis import RedisInflight
from app.state.memory import MemoryStateStore
from app.state.redis_cache import LayeredTier, RedisCacheTier
from app.state.redis_channels import RedisChannels
from app.storage.cache_tiers import CacheTier, SqlCacheTier

if TYPE_CHECKING:
    from app.metrics import Metrics

__all__ = ["OUTAGE_ERRORS", "RedisStateStore", "describe_url", "open_client"]

log = logging.getLogger("admiral.state")

T = TypeVar("T")

#: what counts as "Redis is unavailable" (anything else, e.g. WRONGTYPE, is a bug and propagates)
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, builtins.TimeoutError, OSError)

# Numbers cross the Lua boundary as strings: Redis truncates a Lua number reply to an integer and
# Lua's tostring keeps only 14 digits, too few for epoch seconds with microseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# GCRA: the key holds the theoretical arrival time (TAT); it expires when the TAT passes, which is
# exactly when it stops mattering. A wait under 1 µs (float noise at epoch scale) counts as none.
_ACQUIRE = _NOW + """
local limit, period, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + cost * (period / limit)
local wait = new_tat - period - now
if wait > 0.000001 then return string.format('%.6f', wait) end
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
return '0'
"""

_ADJUST = _NOW + """
local limit, period, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + delta * (period / limit)
if new_tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
end
return 0
"""

# Sliding window: one member per event scored by its time; members are random so that two
# events in the same microsecond stay two.
_RECORD = _NOW + """
local window = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - window))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(window * 1000)))
return redis.call('ZCARD', KEYS[1])
"""


# Fixed-window quota: the key counts the window's units and expires with it.
_TAKE = """
local limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1])) or 0
if used + cost > limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], cost)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""

_GIVE = """
local used = (tonumber(redis.call('GET', KEYS[1])) or 0) + tonumber(ARGV[1])
if used < 0 then used = 0 end
redis.call('SET', KEYS[1], used, 'PX', ARGV[2])
return used
"""


def describe_url(url: str) -> str:
    """``redis://host:port/db`` without credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


def open_client(url: str, *, timeout_s: float, connect_timeout_s: float = 0.5, max_connections: int = 200) -> aioredis.Redis:
    """A client that fails fast: short timeouts and one immediate retry (for a stale pooled connection)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=2.0,  # wait for a free connection under load instead of failing at once
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis.from_pool(pool)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStateStore:
    """The state-store interface on Redis, shared by every replica with the same URL and prefix."""

    def __init__(
        self,
        url: str,
        prefix: str = "admiral:",
        *,
        metrics: Metrics | None = None,
        timeout_s: float = 0.5,
        probe_interval_s: float = 1.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._where = describe_url(url)
        self._metrics = metrics
        self._probe_interval_s = probe_interval_s
        self._redis = open_client(url, timeout_s=timeout_s, connect_timeout_s=timeout_s)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._adjust = self._redis.register_script(_ADJUST)
        self._record = self._redis.register_script(_RECORD)
        self._take = self._redis.register_script(_TAKE)
        self._give = self._redis.register_script(_GIVE)
        # None while Redis answers; the in-process stand-in during an outage
        self._fallback: MemoryStateStore | None = None
        self._outage_started = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._channels: RedisChannels | None = None
        if metrics is not None:
            metrics.state_degraded.set(0)

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and calls are answered from in-process state."""
        return self._fallback is not None

    @property
    def channels(self) -> RedisChannels:
        """Single-flight primitives on the same Redis and prefix (own connections; opened on first use)."""
        if self._channels is None:
            self._channels = RedisChannels.from_url(self._url, self._prefix)
        return self._channels

    def coordinator(self) -> InflightCoordinator:
        """Single flight across every replica on this Redis and prefix (in-process while it is down)."""
        return RedisInflight(self)

    def cache_tier(self, table: SqlCacheTier) -> CacheTier:
        """Redis (same server and key prefix, a client of its own) in front of ``table``, skipped while Redis is down."""
        client = open_client(self._url, timeout_s=0.5, connect_timeout_s=0.5)  # fails as fast as the state store
        return LayeredTier(RedisCacheTier(client, self._prefix), table, self)

    # -- StateStore --------------------------------------------------------------------------

    async def acquire_rate(self, key: str, limit: float, period_s: float, cost: float = 1.0) -> float:
        async def remote() -> float:
            return float(await self._acquire(keys=[self._prefix + "gcra:" + key], args=[limit, period_s, cost]))

        return await self._call(remote, lambda m: m.acquire_rate(key, limit, period_s, cost))

    async def adjust_rate(self, key: str, limit: float, period_s: float, delta: float) -> None:
        async def remote() -> None:
            await self._adjust(keys=[self._prefix + "gcra:" + key], args=[limit, period_s, delta])

        await self._call(remote, lambda m: m.adjust_rate(key, limit, period_s, delta))

    async def take_quota(self, key: str, limit: int, cost: int, ttl_s: float) -> tuple[bool, int]:
        async def remote() -> tuple[bool, int]:
            taken, used = await self._take(keys=[self._prefix + "quota:" + key], args=[limit, cost, _ms(ttl_s)])
            return bool(taken), int(used)

        return await self._call(remote, lambda m: m.take_quota(key, limit, cost, ttl_s))

    async def give_quota(self, key: str, delta: int, ttl_s: float) -> int:
        async def remote() -> int:
            return int(await self._give(keys=[self._prefix + "quota:" + key], args=[delta, _ms(ttl_s)]))

        return await self._call(remote, lambda m: m.give_quota(key, delta, ttl_s))

    async def quota_used(self, key: str) -> int:
        async def remote() -> int:
            value = await self._redis.get(self._prefix + "quota:" + key)
            return int(value) if value is not None else 0

        return await self._call(remote, lambda m: m.quota_used(key))

    async def record_event(self, key: str, window_s: float) -> int:
        async def remote() -> int:
            return int(await self._record(keys=[self._prefix + "win:" + key], args=[window_s, os.urandom(12).hex()]))

        return await self._call(remote, lambda m: m.record_event(key, window_s))

    async def get(self, key: str) -> bytes | None:
        async def remote() -> bytes | None:
            value: bytes | None = await self._redis.get(self._prefix + "v:" + key)
            return value

        return await self._call(remote, lambda m: m.get(key))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        async def remote() -> None:
            if ttl_s is None:
                await self._redis.set(self._prefix + "v:" + key, value)
            elif ttl_s <= 0:  # already expired: same as never stored
                await self._redis.delete(self._prefix + "v:" + key)
            else:
                await self._redis.set(self._prefix + "v:" + key, value, px=_ms(ttl_s))

        await self._call(remote, lambda m: m.set(key, value, ttl_s))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        async def remote() -> bool:
            if ttl_s <= 0:
                return not await self._redis.exists(self._prefix + "v:" + key)
            return bool(await self._redis.set(self._prefix + "v:" + key, value, px=_ms(ttl_s), nx=True))

        return await self._call(remote, lambda m: m.set_if_absent(key, value, ttl_s))

    async def delete(self, key: str) -> None:
        async def remote() -> None:
            await self._redis.delete(self._prefix + "v:" + key, self._prefix + "win:" + key)

        await self._call(remote, lambda m: m.delete(key))

    async def ping(self) -> bool:
        """False while degraded, so readiness shows the outage even though requests are served."""
        if self._fallback is not None:
            return False
        try:
            return bool(await self._redis.ping())
        except OUTAGE_ERRORS as exc:
            self._degrade(exc)
            return False

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
            self._probe = None
        if self._channels is not None:
            await self._channels.aclose()
        await self._redis.aclose()

    # -- outage handling ---------------------------------------------------------------------

    async def _call(self, remote: Callable[[], Awaitable[T]], local: Callable[[MemoryStateStore], Awaitable[T]]) -> T:
        fallback = self._fallback
        if fallback is None:
            try:
                return await remote()
            except OUTAGE_ERRORS as exc:
                fallback = self._degrade(exc)
        return await local(fallback)

    def _degrade(self, exc: BaseException) -> MemoryStateStore:
        if self._fallback is not None:  # several calls failed at once: one outage
            return self._fallback
        self._fallback = MemoryStateStore()
        self._outage_started = time.monotonic()
        log.warning(
            "state store: Redis at %s unreachable (%s: %s); serving limits and state from this replica's memory until it answers",
            self._where,
            type(exc).__name__,
            exc,
        )
        if self._metrics is not None:
            self._metrics.state_degraded.set(1)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back(), name="admiral-redis-probe")
        return self._fallback

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self._redis.ping()
            except Exception:  # still down, or answering with an error: keep waiting
                continue
            self._recover()
            return

    def _recover(self) -> None:
        self._fallback = None
        self._probe = None
        if self._metrics is not None:
            self._metrics.state_degraded.set(0)
        log.warning(
            "state store: Redis at %s answers again after %.1f s; in-process state of the outage dropped, continuing from Redis",
            self._where,
            time.monotonic() - self._outage_started,
        )
