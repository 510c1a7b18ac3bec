"""Local copies of what rarely changes in Redis, kept fresh by notices every replica publishes.

Every replica subscribes to ``{prefix}notices``. Whoever writes a value through the state store
publishes ``v:<key>`` in the same round trip; whoever writes shared-cache entries publishes
``c:<redis key> <redis key> ...``; a replica that follows a flight led elsewhere publishes
``f:<stream key>``. From them each replica keeps:

- copies of values (:meth:`RedisWatch.get`, the breaker's records): a copy serves only while the
  subscription is live, goes at any notice for its key, and expires with the value's TTL; a read
  that a notice overtook is not kept (a generation count);
- a Bloom filter of the shared cache's keys (:meth:`RedisWatch.may_hold`), filled by a SCAN once
  subscribed and by notices after: "no" means no replica stored the key since the scan began;
- the flights another replica follows (:meth:`RedisWatch.followed`): their leaders publish chunks
  as they come, the others keep them for their last round trip.

Until the subscription is live and the scan done, after it breaks, and while Redis is away, both
answer "ask Redis" (a fetch, a "maybe"), and what they held is dropped; they start again empty
once it is back. A notice is delivered a moment after its write: another replica may act on the
value it replaced for that moment (a breaker opened elsewhere is seen once the notice arrives; that delay was not measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["NOTICES", "KeyFilter", "RedisWatch"]

log = logging.getLogger("admiral.state.watch")

#: the channel's name after the key prefix
NOTICES = "notices"
#: a follow notice is kept this long (a flight's stream lives 60 s after its last entry)
_FOLLOWED_S = 60.0
#: how long the subscription loop waits for a notice before it looks whether it should stop
_POLL_S = 0.1
#: a copy of a value is kept for at most this long, even without an expiry of its own (bounds what a
#: write that published no notice, e.g. by an older replica during a rollout, can leave stale)
_COPY_S = 60.0


class KeyFilter:
    """A Bloom filter of SHA-256 hex keys (3 probes; 2**25 bits, 4 MiB: about 1 % false "maybe" at 3 million keys)."""

    def __init__(self, bits: int = 1 << 25) -> None:
        self._bits = bytearray(bits // 8)
        self._mask = bits - 1
        self.added = 0

    def _probes(self, key: str) -> tuple[int, int, int]:
        try:
            n = int(key[:24], 16)
        except ValueError:  # not a hex digest: hash it into one
            n = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=12).digest())
        mask = self._mask
        return n & mask, (n >> 32) & mask, (n >> 64) & mask

    def add(self, key: str) -> None:
        for p in self._probes(key):
            self._bits[p >> 3] |= 1 << (p & 7)
        self.added += 1

    def __contains__(self, key: str) -> bool:
        return all(self._bits[p >> 3] & (1 << (p & 7)) for p in self._probes(key))


class RedisWatch:
    """The subscription to ``{prefix}notices`` and what it keeps fresh (see the module docstring)."""

    #: after this many keys the filter is rebuilt from a new scan (expired keys leave it then)
    REBUILD_AFTER = 3_000_000
    #: follow notices kept before the old ones are dropped
    FOLLOWED_KEPT = 10_000

    def __init__(self, url: str, prefix: str, *, retry_s: float = 1.0) -> None:
        self.channel = prefix + NOTICES
        self._cache_prefix = prefix + "cache:"
        self._client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=5.0, health_check_interval=2)
        self._retry_s = retry_s
        self._values: dict[str, tuple[bytes | None, float]] = {}
        self._generation = 0
        self._filter = KeyFilter()
        self._filter_ready = False
        #: flight streams a follower claimed -> when the notice came
        self._followed: dict[str, float] = {}
        self.live = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._scan: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe in the background (idempotent); until it is live every read goes to Redis."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="admiral-redis-watch")

    async def aclose(self) -> None:
        # the subscription loop is told, not cancelled: redis-py's PubSub teardown can hang when its
        # read is cancelled (seen with redis 8.2), so the loop leaves by itself within _POLL_S
        self._closing = True
        if self._scan is not None:
            self._scan.cancel()
        for task in (self._scan, self._task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._scan = None
        await self._client.aclose()

    # -- values ------------------------------------------------------------------------------

    async def get(self, key: str, fetch: Callable[[], Awaitable[tuple[bytes | None, float | None]]]) -> bytes | None:
        """``key``'s value from the local copy, else from ``fetch`` (value, seconds to live or None), kept while no notice overtook it."""
        self.start()
        if self.live:
            held = self._values.get(key)
            if held is not None and held[1] > time.monotonic():
                return held[0]
        generation = self._generation
        value, ttl_s = await fetch()
        if self.live and generation == self._generation:
            self._values[key] = (value, time.monotonic() + min(ttl_s if ttl_s is not None else _COPY_S, _COPY_S))
        return value

    def forget(self, key: str) -> None:
        """Drop the copy of ``key`` (this replica wrote it; the notice reaches the others)."""
        self._values.pop(key, None)
        self._generation += 1

    # -- the shared cache's keys -------------------------------------------------------------

    def may_hold(self, key: str) -> bool:
        """False only when the shared cache surely lacks ``key`` (no replica stored it since the scan)."""
        self.start()
        return not (self.live and self._filter_ready) or key in self._filter

    def _stored(self, redis_keys: Iterable[bytes]) -> None:
        cut = len(self._cache_prefix)
        for raw in redis_keys:
            self._filter.add(raw[cut:].decode())
        if self._filter.added > self.REBUILD_AFTER and self._filter_ready:
            self._rescan()

    # -- single-flight streams that another replica follows -----------------------------------

    def followed(self, stream: str) -> bool:
        """Whether a follower claimed the flight ``stream`` (True when it cannot be told: no live subscription)."""
        self.start()
        return not self.live or stream in self._followed

    def _follow(self, stream: str) -> None:
        now = time.monotonic()
        if len(self._followed) >= self.FOLLOWED_KEPT:
            # a flight's stream outlives no lease: older notices are of flights long over
            self._followed = {k: t for k, t in self._followed.items() if now - t < _FOLLOWED_S}
        self._followed[stream] = now

    # -- the subscription --------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    while not self._closing:
                        message = await pubsub.get_message(timeout=_POLL_S)
                        if message is not None:
                            self._on(message)
            except (RedisError, OSError) as exc:  # the connection broke: everything held is dropped, the loop resubscribes
                log.info("notices from %s lost (%s: %s); reading Redis until they are back", self.channel, type(exc).__name__, exc)
            finally:
                self._drop()
            retry_at = time.monotonic() + self._retry_s
            while not self._closing and time.monotonic() < retry_at:
                await asyncio.sleep(_POLL_S)

    def _on(self, message: dict[str, object]) -> None:
        kind, data = message["type"], message["data"]
        if kind == "subscribe":
            self._drop()
            self.live = True
            self._rescan()
        elif kind == "message" and isinstance(data, bytes):
            if data.startswith(b"v:"):
                self.forget(data[2:].decode())
            elif data.startswith(b"c:"):
                self._stored(data[2:].split(b" "))
            elif data.startswith(b"f:"):
                self._follow(data[2:].decode())

    def _drop(self) -> None:
        self.live = False
        self._values.clear()
        self._generation += 1
        self._filter_ready = False
        if self._scan is not None:
            self._scan.cancel()
            self._scan = None

    def _rescan(self) -> None:
        if self._scan is not None:
            self._scan.cancel()
        self._filter = KeyFilter()
        self._filter_ready = False
        self._scan = asyncio.get_running_loop().create_task(self._fill(), name="admiral-redis-watch-scan")

    async def _fill(self) -> None:
        """Every shared-cache key now in Redis into the filter (the notices add those written meanwhile)."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._cache_prefix) + "*"
        try:
            batch: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._stored(batch)
                    batch = []
            self._stored(batch)
        except (RedisError, OSError) as exc:  # the subscription notices too, and starts over
            log.info("scanning %s* failed (%s: %s)", self._cache_prefix, type(exc).__name__, exc)
            return
        self._filter_ready = True
