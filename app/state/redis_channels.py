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
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.state.redis_link import RedisLink
from app.state.redis_watch import NOTICES

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

# Entries in one round trip. Exact MAXLEN (not ~) so that trimming is visible to readers through
# the index gap. KEYS[1]: the stream; ARGV: maxlen, ttl, the first entry's index, then kind, data pairs.
_APPEND = """
for i = 1, (#ARGV - 3) / 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'i', tonumber(ARGV[3]) + i - 1, 'k', ARGV[2 + 2 * i], 'd', ARGV[3 + 2 * i])
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# Lead or follow in one round trip: take the lease, or mark its flight as followed (so the leader
# publishes to its stream: the flag for its last round trip, a notice for the chunks before) and
# name its holder. A new leader also learns whether ``KEYS[2]`` (the
# flight's answer in the shared cache) exists: the flight before may have ended a moment ago.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, ARGV[1], redis.call('EXISTS', KEYS[2])}
end
local holder = redis.call('GET', KEYS[1])
local stream = ARGV[3] .. holder
redis.call('SET', stream .. ':w', '1', 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[5], 'f:' .. stream)
return {0, holder, 0}
"""

# The leader's last round trip: the last entries (to the stream when it was followed or has begun),
# the shared writes, then the lease released. KEYS: lock, stream, followed flag, written keys;
# ARGV: token, maxlen, stream ttl, first index, whether the stream has begun, entry count, the
# entries' kind and data, each written key's value and PX, then the channel their notice goes to
# (app.state.redis_watch).
_FINISH = """
local n = tonumber(ARGV[6])
local published = 0
if ARGV[5] == '1' or redis.call('EXISTS', KEYS[3]) == 1 then
  for i = 1, n do
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '*', 'i', tonumber(ARGV[4]) + i - 1, 'k', ARGV[5 + 2 * i], 'd', ARGV[6 + 2 * i])
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  published = 1
end
redis.call('DEL', KEYS[3])
local a = 7 + 2 * n
local written = {}
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[a], 'PX', ARGV[a + 1])
  written[#written + 1] = KEYS[i]
  a = a + 2
end
if #written > 0 then redis.call('PUBLISH', ARGV[a], 'c:' .. table.concat(written, ' ')) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return published
"""

_CHUNK, _END, _ERROR = b"chunk", b"end", b"error"
#: kinds of entries, for :meth:`RedisChannels.finish`
CHUNK, END, ERROR = _CHUNK, _END, _ERROR


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
        link: RedisLink,
        prefix: str = "admiral:",
        *,
        maxlen: int = 10_000,
        stream_ttl_s: float = 60.0,
        poll_s: float = 0.25,
        owns_client: bool = False,
        owns_link: bool = False,
    ) -> None:
        """``poll_s`` is how long one XREAD blocks; it must stay below the client's socket timeout.
        Every command but XREAD goes through ``link`` (they answer at once)."""
        self._redis = client
        self._link = link
        self._owns_link = owns_link
        self._prefix = prefix
        self._maxlen = maxlen
        self._stream_ttl_ms = max(1, int(stream_ttl_s * 1000))
        self._poll_ms = max(1, int(poll_s * 1000))
        self._owns_client = owns_client
        self._renew = link.script(_RENEW)
        self._release = link.script(_RELEASE)
        self._append = link.script(_APPEND)
        self._claim = link.script(_CLAIM)
        self._finish = link.script(_FINISH)

    @classmethod
    def from_url(cls, url: str, prefix: str = "admiral:", *, poll_s: float = 0.25, link: RedisLink | None = None, **kwargs: Any) -> RedisChannels:
        """Channels with their own connections for blocking reads, so blocked readers never starve limit
        checks; the other commands on ``link`` (the state store's), else on a link of their own."""
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
        own = link is None
        link = RedisLink(url, timeout_s=poll_s + 1.0) if link is None else link
        return cls(client, link, prefix, poll_s=poll_s, owns_client=True, owns_link=own, **kwargs)

    async def aclose(self) -> None:
        if self._owns_link:
            await self._link.aclose()
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
        ok = await self._io(self._link.call("SET", self.lock_key(key), token, "NX", "PX", max(1, int(ttl_s * 1000))))
        return token if ok is not None else None

    async def renew(self, key: str, token: str, ttl_s: float) -> bool:
        """Extend the lease to ``ttl_s`` from now; False when ``token`` no longer holds it."""
        return bool(await self._io(self._link.evalsha(self._renew, [self.lock_key(key)], [token, max(1, int(ttl_s * 1000))])))

    async def release(self, key: str, token: str) -> bool:
        """Drop the lease if ``token`` still holds it (never someone else's)."""
        return bool(await self._io(self._link.evalsha(self._release, [self.lock_key(key)], [token])))

    async def claim(self, key: str, ttl_s: float, stored_key: str) -> tuple[str | None, str | None, bool]:
        """Lead or follow in one round trip: (this lease's token, None, whether ``stored_key`` exists) when
        it was free, else (None, the holder's token, False); a follower's claim makes the leader publish."""
        token = secrets.token_hex(8)
        ttl_ms = max(1, int(ttl_s * 1000))
        args = [token, ttl_ms, f"{self._prefix}flight:{key}:", self._stream_ttl_ms, self._prefix + NOTICES]
        won, holder, stored = await self._io(self._link.evalsha(self._claim, [self.lock_key(key), stored_key], args))
        if won:
            return token, None, bool(stored)
        return None, holder.decode(), False

    async def finish(
        self, publisher: StreamPublisher, key: str, token: str, entries: Sequence[tuple[bytes, bytes]], writes: Sequence[tuple[str, bytes, int]] = ()
    ) -> bool:
        """The leader's last round trip: ``entries`` to the stream (when a follower claimed or it has
        begun), ``writes`` (key, value, PX ms) stored, the lease released. True when it published."""
        stream = publisher.stream
        args: list[bytes | str | int] = [token, self._maxlen, self._stream_ttl_ms, publisher.index, 1 if publisher.index else 0, len(entries)]
        for kind, data in entries:
            args += (kind, data)
        for _, value, px in writes:
            args += (value, px)
        args.append(self._prefix + NOTICES)
        keys = [self.lock_key(key), stream, stream + ":w", *(w[0] for w in writes)]
        publisher.closed = True
        published = bool(await self._io(self._link.evalsha(self._finish, keys, args)))
        if published:
            publisher.index += len(entries)
        return published

    async def holder(self, key: str) -> str | None:
        """The token of the current lease on ``key``, or None."""
        value = await self._io(self._link.call("GET", self.lock_key(key)))
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

    async def append(self, publisher: StreamPublisher, entries: Sequence[tuple[bytes, bytes]]) -> None:
        """Publish ``entries`` (kind, data) after those ``publisher`` has sent, in one round trip."""
        if publisher.closed:
            raise RuntimeError("flight stream already ended")
        args: list[bytes | int] = [self._maxlen, self._stream_ttl_ms, publisher.index]
        for kind, data in entries:
            args += (kind, data)
        await self._io(self._link.evalsha(self._append, [publisher.stream], args))
        publisher.index += len(entries)

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
        self.stream = stream
        #: entries published so far
        self.index = 0
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
        await self._channels.append(self, [(kind, data)])
