"""One Redis connection that every request's calls share, written as they come and answered in order.

redis-py's client takes a connection from its pool for each call (a condition, a lock and a
timeout context), sends the command in a task of its own (``asyncio.wait_for`` around the write,
when the client has a socket timeout), reads the reply under another timeout and gives the
connection back; on CPython 3.11 each ``get_running_loop`` behind that is a ``getpid`` system call.
:class:`RedisLink` keeps one connection: a call packs its command and waits for its own reply; the
commands of one event-loop turn (the requests that arrived together) are written in one piece at
its end, so they cost one system call and wake Redis once, not once each; one reader task reads
replies in the order the commands went and hands each to its caller, so the commands of
concurrent requests share the connection (Redis pipelining). Commands
are packed by hiredis in one C call (redis-py's packer encodes each argument in Python first; the
bytes are the same) and replies parsed by it (redis-py's hiredis parser, used when installed).

Only for commands that answer at once (scripts, GET, SET): a blocking command (XREAD BLOCK) would
hold up every reply behind it, so those keep a pooled client.

Failure: when no reply comes for ``timeout_s`` (up to twice that: one timer checks, not one per
call) or the connection breaks, every call waiting on it fails with redis-py's
:class:`~redis.exceptions.TimeoutError` / :class:`~redis.exceptions.ConnectionError` (the callers'
"Redis is unavailable") and the connection is dropped; the next call connects anew, and an idle
connection the server closed meanwhile is replaced before use. A reply that is an error (e.g.
NOSCRIPT) fails only its own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["RedisLink"]

try:  # what redis-py's hiredis reader returns for a reply not read whole yet
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # laid out otherwise: replies are read one by one (see _buffered)
    NOT_ENOUGH_DATA = None


def _buffered(conn: Connection) -> Callable[[], Any] | None:
    """The next reply already read from ``conn`` (``NOT_ENOUGH_DATA`` when there is none), taken
    from redis-py's hiredis reader; None when the connection parses some other way (redis-py
    without hiredis, or a version laid out differently): every reply is then read by
    ``read_response``."""
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    return reader.gets if NOT_ENOUGH_DATA is not None and isinstance(reader, hiredis.Reader) else None


class RedisLink:
    """Calls to one Redis on one shared connection (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float = 0.5) -> None:
        # the pool only builds the connection from the URL (host, db, password, TLS); it is never released to it
        self._pool = aioredis.ConnectionPool.from_url(url, socket_timeout=None, socket_connect_timeout=connect_timeout_s)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._conn: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        #: the packed commands of this event-loop turn, written together by ``_send`` at its end
        self._out: list[bytes] = []
        self._send_soon: asyncio.Handle | None = None
        self._reader: asyncio.Task[None] | None = None
        self._scripts: dict[str, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: replies read so far, and that count when the watchdog was set: no reply in between while calls wait is a timeout
        self._replies = 0
        self._watched_from = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """The raw reply to one command (bytes, int, list; redis-py applies no response callback)."""
        while (conn := self._conn) is None or (not self._waiting and await self._stale(conn)):
            if self._conn is None:
                await self._connect()
        loop = self._loop
        assert loop is not None  # set by the connect
        reply: asyncio.Future[Any] = loop.create_future()
        # no await between the two appends: the commands go in the order of the futures
        self._waiting.append(reply)
        self._out.append(hiredis.pack_command(args))
        if self._send_soon is None:
            self._send_soon = loop.call_soon(self._send, conn)
        if self._reader is None:
            self._reader = loop.create_task(self._read(conn), name="admiral-redis-link")
            if self._watchdog is None:
                self._watch_from(conn)
        return await reply

    def _send(self, conn: Connection) -> None:
        """Write the commands of this event-loop turn in one piece (one system call, one read for Redis)."""
        self._send_soon = None
        out, self._out = self._out, []
        if self._conn is not conn or not out:
            return
        # redis-py's own write (``send_packed_command``) is a coroutine that also awaits drain();
        # a call never waited for that (the watchdog fails a Redis that stops reading)
        writer = conn._writer
        if writer is None or writer.transport.is_closing():
            self._broken(conn, RedisConnectionError("Redis closed the connection before a write"))
            return
        try:
            writer.write(out[0] if len(out) == 1 else b"".join(out))
        except (OSError, RuntimeError) as exc:
            self._broken(conn, exc)

    def script(self, source: str) -> str:
        """Register a Lua script; returns its SHA1, for :meth:`evalsha`."""
        body = source.encode()
        sha = hashlib.sha1(body).hexdigest()
        self._scripts[sha] = body
        return sha

    async def evalsha(self, sha: str, keys: list[Any], args: list[Any]) -> Any:
        """Run a registered script, loading it first when Redis lacks it (a restart, a flush)."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", self._scripts[sha])
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        conn, reader = self._conn, self._reader
        if conn is not None:
            self._broken(conn, RedisConnectionError("Redis link closed"))
        for task in list(self._closing):
            await task
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)
        await self._pool.aclose()

    async def _connect(self) -> Connection:
        if self._connecting is None:  # one connect for every caller that finds no connection
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> Connection:
        conn = self._pool.make_connection()
        try:
            async with asyncio.timeout(self._connect_timeout_s + self._timeout_s):  # the handshake's replies too
                await conn.connect()
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("no answer from Redis while connecting") from None
        self._loop = asyncio.get_running_loop()
        self._conn = conn
        return conn

    async def _stale(self, conn: Connection) -> bool:
        """Whether an idle connection was closed by the server meanwhile (dropped, then, for a new one)."""
        try:
            if not await conn.can_read():  # an idle connection has nothing to read
                return False
        except (OSError, RedisConnectionError):
            pass
        if self._conn is conn:
            self._broken(conn, RedisConnectionError("Redis closed the idle connection"))
        return True

    async def _read(self, conn: Connection) -> None:
        buffered = _buffered(conn)
        try:
            while self._waiting and self._conn is conn:
                try:
                    value: Any = await conn.read_response(timeout=math.inf)  # the watchdog times replies out
                except ResponseError as exc:  # an error reply: the connection goes on
                    value = exc
                self._hand(value)
                if buffered is None:
                    continue
                # the other replies of the same read (a turn's commands are answered together), parsed
                # already: handed out without read_response's coroutines and timeout bookkeeping each
                while self._waiting and (value := buffered()) is not NOT_ENOUGH_DATA:
                    if isinstance(value, RedisConnectionError):  # as read_response raises it
                        raise value
                    self._hand(value)
        except BaseException as exc:
            self._broken(conn, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._conn is conn:  # else _broken let go of this reader (a new connection may have its own)
                self._reader = None

    def _hand(self, value: Any) -> None:
        """Give the oldest waiting call its reply (an error reply fails that call only)."""
        self._replies += 1
        reply = self._waiting.popleft()
        if reply.done():  # its caller was cancelled
            return
        if isinstance(value, ResponseError):
            reply.set_exception(value)
        else:
            reply.set_result(value)

    def _watch_from(self, conn: Connection) -> None:
        """Check in ``timeout_s`` that a reply came meanwhile (one timer, not one a call)."""
        assert self._loop is not None
        self._watched_from = self._replies
        self._watchdog = self._loop.call_later(self._timeout_s, self._watch, conn)

    def _watch(self, conn: Connection) -> None:
        self._watchdog = None
        if self._conn is not conn or not self._waiting:
            return
        if self._replies == self._watched_from:  # the oldest call has waited timeout_s at least
            self._broken(conn, RedisTimeoutError(f"no reply from Redis within {self._timeout_s:g} s"))
        else:
            self._watch_from(conn)

    def _broken(self, conn: Connection, exc: BaseException) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        self._reader = None
        self._out = []
        if self._send_soon is not None:
            self._send_soon.cancel()
            self._send_soon = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            exc = RedisConnectionError(f"Redis connection lost: {type(exc).__name__}: {exc}")
        waiting, self._waiting = self._waiting, deque()
        for reply in waiting:
            if not reply.done():
                reply.set_exception(exc)
        assert self._loop is not None
        task = self._loop.create_task(self._close(conn), name="admiral-redis-link-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(conn: Connection) -> None:
        with contextlib.suppress(OSError, RedisConnectionError):
            await conn.disconnect(nowait=True)
