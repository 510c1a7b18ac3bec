"""Cross-replica single-flight primitives on Redis: a leader lease per key, a chunk stream per flight.

A *flight* is one upstream call shared by every replica asking the same thing. Its leader holds a
lease (``{prefix}lock:{key}``, value = a random token, with an expiry it keeps renewing) and
publishes the answer's chunks to ``{prefix}flight:{key}:{token}``, a Redis stream that expires
``stream_ttl_s`` after its last write. Followers on any replica read that stream from its first
entry, so a late joiner gets every chunk so far and then the live ones. Keying the stream by token
means a later flight for the same key never mixes with an earlier one. Intended use::

    token = await channels.acquire(key, ttl_s=10)
    if token is not None:                                   # leader
        renewal = asyncio.create_task(channels.keep_alive(key, token, ttl_s=10))
        publisher = channels.publisher(key, token)
        try:
            async for chunk in upstream():
                await publisher.send(chunk)
            await publisher.end()
        except Exception as exc:
            await publisher.fail(str(exc))
            raise
        finally:
            renewal.cancel()
            await channels.release(key, token)
    elif (token := await channels.holder(key)) is not None:  # follower
        async for chunk in channels.read(key, token):
            ...
    # else: the leader finished between the two calls; acquire again (or read the cache)

Errors (everything Redis-related is translated at this boundary)::

    ChannelError
    ├── ChannelUnavailable   Redis did not answer (connection error or timeout)
    ├── LeaderLost           the lease vanished (or the stream stayed silent) before the end marker
    ├── LeaderFailed         the leader published an error instead of the end marker
    └── StreamTruncated      MAXLEN trimmed entries this reader had not seen yet

On any of them a follower should call upstream itself.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ChannelError", "ChannelUnavailable", "LeaderFailed", "LeaderLost", "RedisChannels", "StreamPublisher", "StreamTruncated"]

T = TypeVar("T")

_OUTAGE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Exact MAXLEN (not ~) so that trimming is visible to readers through the index gap.
_APPEND = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'i', ARGV[3], 'k', ARGV[4], 'd', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
"""

_CHUNK, _END, _ERROR = b"chunk", b"end", b"error"


class ChannelError(Exception):
    """A flight could not be followed to its end; the caller should call upstream itself."""


class ChannelUnavailable(ChannelError):
    """Redis did not answer."""


class LeaderLost(ChannelError):
    """The leader's lease ended (or its stream went silent) before it published an end marker."""


class LeaderFailed(ChannelError):
    """The leader published an error instead of finishing."""


class StreamTruncated(ChannelError):
    """The stream was trimmed past entries this reader had not read."""


class RedisChannels:
    """Leases and chunk streams for cross-replica single-flight, under one key prefix."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "admiral:",
        *,
        maxlen: int = 10_000,
        stream_ttl_s: float = 60.0,
        poll_s: float = 0.25,
        owns_client: bool = False,
    ) -> None:
        """``poll_s`` is how long one XREAD blocks; it must stay below the client's socket timeout."""
        self._redis = client
        self._prefix = prefix
        self._maxlen = maxlen
        self._stream_ttl_ms = max(1, int(stream_ttl_s * 1000))
        self._poll_ms = max(1, int(poll_s * 1000))
        self._owns_client = owns_client
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._append = client.register_script(_APPEND)

    @classmethod
    def from_url(cls, url: str, prefix: str = "admiral:", *, poll_s: float = 0.25, **kwargs: Any) -> RedisChannels:
        """Channels with their own connections, so blocked readers never starve limit checks."""
        client = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=500,
                timeout=2.0,
                socket_timeout=poll_s + 1.0,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 1),
            )
        )
        return cls(client, prefix, poll_s=poll_s, owns_client=True, **kwargs)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    def lock_key(self, key: str) -> str:
        return f"{self._prefix}lock:{key}"

    def stream_key(self, key: str, token: str) -> str:
        return f"{self._prefix}flight:{key}:{token}"

    # -- lease -------------------------------------------------------------------------------

    async def acquire(self, key: str, ttl_s: float) -> str | None:
        """Take the lease on ``key`` for ``ttl_s``; returns its token, or None when someone holds it."""
        token = secrets.token_hex(8)
        ok = await self._io(self._redis.set(self.lock_key(key), token, nx=True, px=max(1, int(ttl_s * 1000))))
        return token if ok else None

    async def renew(self, key: str, token: str, ttl_s: float) -> bool:
        """Extend the lease to ``ttl_s`` from now; False when ``token`` no longer holds it."""
        return bool(await self._io(self._renew(keys=[self.lock_key(key)], args=[token, max(1, int(ttl_s * 1000))])))

    async def release(self, key: str, token: str) -> bool:
        """Drop the lease if ``token`` still holds it (never someone else's)."""
        return bool(await self._io(self._release(keys=[self.lock_key(key)], args=[token])))

    async def holder(self, key: str) -> str | None:
        """The token of the current lease on ``key``, or None."""
        value = await self._io(self._redis.get(self.lock_key(key)))
        return value.decode() if value is not None else None

    async def keep_alive(self, key: str, token: str, ttl_s: float, every_s: float | None = None) -> None:
        """Renew the lease every ``every_s`` (default ``ttl_s / 3``) until cancelled; returns when it is lost.

        A Redis outage counts as lost: followers cannot see a lease Redis cannot renew.
        """
        every_s = every_s if every_s is not None else ttl_s / 3
        while True:
            await asyncio.sleep(every_s)
            try:
                if not await self.renew(key, token, ttl_s):
                    return
            except ChannelUnavailable:
                return

    # -- stream ------------------------------------------------------------------------------

    def publisher(self, key: str, token: str) -> StreamPublisher:
        """The leader's writer for the flight ``token`` on ``key``."""
        return StreamPublisher(self, self.stream_key(key, token))

    async def _publish(self, stream: str, index: int, kind: bytes, data: bytes) -> None:
        await self._io(self._append(keys=[stream], args=[self._maxlen, self._stream_ttl_ms, index, kind, data]))

    async def read(self, key: str, token: str, *, idle_timeout_s: float | None = None) -> AsyncGenerator[bytes, None]:
        """Every chunk of the flight from the first one, then live ones, until the end marker.

        Raises :class:`LeaderFailed` for a published error, :class:`LeaderLost` when the lease is
        gone without an end marker (or no entry came for ``idle_timeout_s``), :class:`StreamTruncated`
        on a gap, :class:`ChannelUnavailable` when Redis does not answer.
        """
        stream = self.stream_key(key, token)
        last: bytes | str = "0-0"
        expected = 0
        heard = time.monotonic()
        while True:
            entries = await self._xread(stream, last, block=True)
            if not entries:
                if await self.holder(key) != token:
                    # the leader may have written its end marker and released between our two calls
                    entries = await self._xread(stream, last, block=False)
                    if not entries:
                        raise LeaderLost(f"lease on {key!r} ended without an end marker")
                elif idle_timeout_s is not None and time.monotonic() - heard > idle_timeout_s:
                    raise LeaderLost(f"no chunk on {key!r} for {idle_timeout_s:g} s")
                else:
                    continue
            heard = time.monotonic()
            for entry_id, fields in entries:
                last = entry_id
                if int(fields[b"i"]) != expected:
                    raise StreamTruncated(f"stream for {key!r} trimmed before entry {expected}")
                expected += 1
                kind, data = fields[b"k"], fields.get(b"d", b"")
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise LeaderFailed(data.decode(errors="replace"))
                yield data

    async def _xread(self, stream: str, last: bytes | str, *, block: bool) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = await self._io(self._redis.xread({stream: last}, count=500, block=self._poll_ms if block else None))
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return list(next(iter(reply.values()))[0])
        return list(reply[0][1])

    async def _io(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except _OUTAGE as exc:
            raise ChannelUnavailable(f"Redis unavailable: {exc}") from exc


class StreamPublisher:
    """Appends one flight's chunks in order, then exactly one end marker or error."""

    def __init__(self, channels: RedisChannels, stream: str) -> None:
        self._channels = channels
        self._stream = stream
        self._index = 0
        self.closed = False

    async def send(self, data: bytes) -> None:
        await self._write(_CHUNK, data)

    async def end(self) -> None:
        """Mark the flight complete; readers return after the last chunk."""
        await self._write(_END, b"")
        self.closed = True

    async def fail(self, message: str) -> None:
        """Mark the flight failed; readers raise :class:`LeaderFailed` with ``message``."""
        await self._write(_ERROR, message.encode())
        self.closed = True

    async def _write(self, kind: bytes, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("flight stream already ended")
        await self._channels._publish(self._stream, self._index, kind, data)
        self._index += 1
