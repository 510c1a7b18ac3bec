"""Shared state on Redis for several replicas, falling back to in-process state during an outage.

Every operation is one atomic command or Lua script, and every clock reading is Redis ``TIME``,
so replicas agree on limits without trusting each other's clocks. Keys live under the configured
prefix: ``{prefix}v:{key}`` values, ``{prefix}gcra:{key}`` rate limits, ``{prefix}quota:{key}``
daily quotas, ``{prefix}win:{key}`` event windows (and ``lock:`` / ``flight:`` for :mod:`app.state.redis_channels`,
``cache:`` for :mod:`app.state.redis_cache`, the ``notices`` channel for :mod:`app.state.redis_watch`).

Round trips are what a request pays for shared state, so the store spends few: an admission checks
and takes every window of a budget in one script (:meth:`RedisStateStore.admit`); a settlement
(``adjust_rate``) needs no answer and goes with the next admission, or alone ``ADJUST_DELAY_S``
later; a write of a value publishes a notice in the same round trip, so values that rarely change
(the breaker's records) are read from a local copy (``get_cached``) that the notices keep fresh.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.pipeline.inflight import InflightCoordinator
from app.pipeline.inflight_redis import RedisInflight
from app.state.base import Admission, QuotaTake, RateTake, RateWindow
from app.state.memory import MemoryStateStore
from app.state.redis_cache import LayeredTier, RedisCacheTier
from app.state.redis_channels import RedisChannels
from app.state.redis_link import RedisLink
from app.state.redis_watch import RedisWatch
from app.storage.cache_tiers import CacheTier, SqlCacheTier

if TYPE_CHECKING:
    from app.metrics import Metrics

__all__ = ["ADJUST_DELAY_S", "OUTAGE_ERRORS", "RedisStateStore", "describe_url", "open_client"]

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

# An admission: settlements first (see adjust_rate), then every window is checked, then, when all
# have room, every window takes its units. GCRA: a rate key holds the theoretical arrival time
# (TAT); it expires when the TAT passes, which is exactly when it stops mattering. A wait under
# 1 µs (float noise at epoch scale) counts as none. A quota key counts its window's units.
# KEYS: settlements, rates, quotas; ARGV: their three counts, then 3 numbers for each of them.
# Returns {refused (1-based, 0 = admitted), wait, each quota's units}.
_ADMIT = _NOW + """
local ns, nr, nq = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then return now end
  return tat
end
local function keep(key, tat)
  if tat <= now then redis.call('DEL', key)
  else redis.call('SET', key, string.format('%.6f', tat), 'PX', math.max(1, math.ceil((tat - now) * 1000))) end
end
for i = 1, ns do
  local a = 1 + 3 * i
  keep(KEYS[i], tat_of(KEYS[i]) + tonumber(ARGV[a + 2]) * (tonumber(ARGV[a + 1]) / tonumber(ARGV[a])))
end
local tats, used = {}, {}
for i = 1, nq do used[i] = tonumber(redis.call('GET', KEYS[ns + nr + i])) or 0 end
for i = 1, nr do
  local a = 1 + 3 * (ns + i)
  local period = tonumber(ARGV[a + 1])
  local tat = tat_of(KEYS[ns + i]) + tonumber(ARGV[a + 2]) * (period / tonumber(ARGV[a]))
  local wait = tat - period - now
  if wait > 0.000001 then return {i, string.format('%.6f', wait), unpack(used)} end
  tats[i] = tat
end
for i = 1, nq do
  local a = 1 + 3 * (ns + nr + i)
  if used[i] + tonumber(ARGV[a + 1]) > tonumber(ARGV[a]) then return {nr + i, '0', unpack(used)} end
end
for i = 1, nr do keep(KEYS[ns + i], tats[i]) end
for i = 1, nq do
  local key, a = KEYS[ns + nr + i], 1 + 3 * (ns + nr + i)
  used[i] = redis.call('INCRBY', key, tonumber(ARGV[a + 1]))
  redis.call('PEXPIRE', key, ARGV[a + 2])
end
return {0, '0', unpack(used)}
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


_GIVE = """
local used = (tonumber(redis.call('GET', KEYS[1])) or 0) + tonumber(ARGV[1])
if used < 0 then used = 0 end
redis.call('SET', KEYS[1], used, 'PX', ARGV[2])
return used
"""


#: an admission with no daily window to report (the script's reply {0, '0'}), or of nothing
_ADMITTED = Admission(-1, 0.0, ())

#: how long a settlement (``adjust_rate``) waits for an admission to go with before it is sent alone
ADJUST_DELAY_S = 0.05


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
        #: every request's calls (admission, single flight, cache reads) on one pipelined connection
        self._link = RedisLink(url, timeout_s=timeout_s, connect_timeout_s=timeout_s)
        self._admit = self._link.script(_ADMIT)
        self._record = self._redis.register_script(_RECORD)
        self._give = self._redis.register_script(_GIVE)
        # None while Redis answers; the in-process stand-in during an outage
        self._fallback: MemoryStateStore | None = None
        self._outage_started = 0.0
        # settlements not sent yet: the next admission carries them, or a flush ADJUST_DELAY_S after the first
        self._settlements: list[RateTake] = []
        self._flush: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Admission]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._channels: RedisChannels | None = None
        self._cache: RedisCacheTier | None = None
        #: copies of values and the shared cache's keys, kept fresh by notices (subscribes on first use)
        self.watch = RedisWatch(url, prefix)
        if metrics is not None:
            metrics.state_degraded.set(0)

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and calls are answered from in-process state."""
        return self._fallback is not None

    @property
    def channels(self) -> RedisChannels:
        """Single-flight primitives on the same Redis and prefix: their commands on this store's link, a
        follower's blocking XREAD on a connection of its own (made on first use)."""
        if self._channels is None:
            self._channels = RedisChannels.from_url(self._url, self._prefix, link=self._link)
        return self._channels

    def coordinator(self) -> InflightCoordinator:
        """Single flight across every replica on this Redis and prefix (in-process while it is down)."""
        return RedisInflight(self)

    def cache_tier(self, table: SqlCacheTier) -> CacheTier:
        """Redis (same server and key prefix) in front of ``table``, skipped while Redis is down: reads on
        this store's link, the batched writes on a client of their own."""
        client = open_client(self._url, timeout_s=0.5, connect_timeout_s=0.5)  # fails as fast as the state store
        self._cache = RedisCacheTier(client, self._prefix, link=self._link)
        return LayeredTier(self._cache, table, self)

    def stored_key(self, key: str) -> str:
        """The Redis key of ``key``'s entry in the shared cache (see :mod:`app.state.redis_cache`)."""
        return self._prefix + "cache:" + key

    def followed(self, stream: str) -> bool:
        """Whether a replica follows the flight ``stream`` (see :meth:`RedisWatch.followed`)."""
        return self.watch.followed(stream)

    def take_writes(self) -> list[tuple[str, bytes, int]]:
        """The shared cache's writes not sent yet, for a lease release to carry (see :class:`RedisCacheTier`)."""
        return self._cache.take_writes() if self._cache is not None else []

    # -- StateStore --------------------------------------------------------------------------

    async def acquire_rate(self, key: str, limit: float, period_s: float, cost: float = 1.0) -> float:
        admission = await self.admit([(RateWindow(key, limit, period_s), cost)], [])
        return admission.wait_s

    def adjust_rate(self, key: str, limit: float, period_s: float, delta: float) -> None:
        if self._fallback is not None:
            self._fallback.adjust_rate(key, limit, period_s, delta)
            return
        # a settlement needs no answer: it goes with the next admission instead of a round trip of its own
        self._settlements.append((RateWindow(key, limit, period_s), delta))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(ADJUST_DELAY_S, self._send_settlements)

    def _send_settlements(self) -> None:
        self._flush = None
        if self._settlements:
            task = asyncio.get_running_loop().create_task(self.admit([], []), name="admiral-settle")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def admit(self, rates: Sequence[RateTake], quotas: Sequence[QuotaTake]) -> Admission:
        settlements, self._settlements = self._settlements, []
        if not (settlements or rates or quotas):
            return _ADMITTED
        fallback = self._fallback
        if fallback is None:
            # every request's path: written out, not through _call's closures
            prefix = self._prefix
            takes = (*settlements, *rates) if settlements else rates
            keys = [prefix + "gcra:" + window.key for window, _ in takes]
            args: list[float | int] = [len(settlements), len(rates), len(quotas)]
            for window, cost in takes:
                args += (window.limit, window.period_s, cost)
            for q in quotas:
                keys.append(prefix + "quota:" + q.key)
                args += (q.limit, q.cost, _ms(q.ttl_s))
            try:
                refused, wait, *used = await self._link.evalsha(self._admit, keys, args)
            except OUTAGE_ERRORS as exc:
                fallback = self._degrade(exc)
            else:
                return _ADMITTED if refused == 0 and not used else Admission(int(refused) - 1, float(wait), tuple([int(u) for u in used]))
        return await fallback.admit(rates, quotas)

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

    async def get_cached(self, key: str) -> bytes | None:
        """``get`` from a local copy that the other replicas' notices keep fresh (:mod:`app.state.redis_watch`)."""

        async def fetch() -> tuple[bytes | None, float | None]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._prefix + "v:" + key)
                pipe.pttl(self._prefix + "v:" + key)
                value, pttl = await pipe.execute()
            return value, (pttl / 1000 if pttl > 0 else None)

        return await self._call(lambda: self.watch.get(key, fetch), lambda m: m.get(key))

    def may_hold(self, key: str) -> bool:
        """False when the shared cache surely lacks ``key`` (see :meth:`RedisWatch.may_hold`); True while degraded."""
        return self._fallback is not None or self.watch.may_hold(key)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        async def remote() -> None:
            name = self._prefix + "v:" + key
            if ttl_s is None:
                await self._noticed(key, lambda pipe: pipe.set(name, value))
            elif ttl_s <= 0:  # already expired: same as never stored
                await self._noticed(key, lambda pipe: pipe.delete(name))
            else:
                await self._noticed(key, lambda pipe: pipe.set(name, value, px=_ms(ttl_s)))

        await self._call(remote, lambda m: m.set(key, value, ttl_s))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        async def remote() -> bool:
            if ttl_s <= 0:
                return not await self._redis.exists(self._prefix + "v:" + key)
            return bool(await self._noticed(key, lambda pipe: pipe.set(self._prefix + "v:" + key, value, px=_ms(ttl_s), nx=True)))

        return await self._call(remote, lambda m: m.set_if_absent(key, value, ttl_s))

    async def delete(self, key: str) -> None:
        async def remote() -> None:
            await self._noticed(key, lambda pipe: pipe.delete(self._prefix + "v:" + key, self._prefix + "win:" + key))

        await self._call(remote, lambda m: m.delete(key))

    async def _noticed(self, key: str, write: Callable[[Pipeline], object]) -> object:
        """``write``'s reply, the write and its notice to every replica sent in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            write(pipe)
            pipe.publish(self.watch.channel, b"v:" + key.encode())
            reply, _ = await pipe.execute()
        self.watch.forget(key)
        return reply

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
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._settlements and self._fallback is None:
            await self.admit([], [])
        for task in list(self._background):
            await task
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
            self._probe = None
        if self._channels is not None:
            await self._channels.aclose()
        await self.watch.aclose()
        await self._link.aclose()
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
