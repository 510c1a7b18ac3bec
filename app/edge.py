"""The HTTP edge: uvicorn's protocol with the limits nginx would put in front of it.

uvicorn alone waits forever for a request head, takes one of any size and keeps every connection
it accepts, so one client dripping heads on a thousand sockets exhausts the file descriptors and
``/health`` stops answering. Each connection here runs through these states::

    opened ──► waiting for a head ──(head complete)──► request in flight ──(response sent)──┐
                 ▲   │  no head within header_timeout_s: closed                               │
                 │   │  head over max_header_bytes: 431, closed                               │
                 │   │  body slower than body_min_bytes_per_s: 408, closed                    │
                 └───┴──────────────── idle keep-alive (idle_timeout_s: closed) ◄─────────────┘

Beyond ``max_connections`` open connections (per process), the oldest connection waiting for a
request head (idle, or its head incomplete) is closed to make room, as nginx reuses its idle
connections; only when the connections looked at all have a request in flight is the new one
answered 503 and closed. The
refusals are answered in OpenAI's error shape, then the socket is closed after a short lingering
read, so the client reads the answer instead of a reset.

The limits reach uvicorn's worker processes (spawned, not forked) through ``ADMIRAL_EDGE_LIMITS``,
as the config path reaches them through ``ADMIRAL_CONFIG``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import time
import weakref
from collections import OrderedDict
from functools import cache
from typing import TYPE_CHECKING, Any

import httptools
import orjson
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.api.transport import CoalescingHttpToolsProtocol
from app.config import ServerConfig
from app.errors import anthropic_error, speaks_anthropic

if TYPE_CHECKING:
    from uvicorn.middleware.proxy_headers import _TrustedHosts

log = logging.getLogger("admiral.edge")

ENV = "ADMIRAL_EDGE_LIMITS"
#: descriptors kept for the gateway's own sockets and files (database, Redis, providers, logs)
FD_RESERVE = 256
#: how long a refused connection is read and discarded before it is closed
LINGER_S = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeLimits:
    """The ``server:`` limits the edge enforces on each connection."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    body_timeout_s: float = 10.0
    body_min_bytes_per_s: int = 1024
    max_connections: int = 4096

    @classmethod
    def from_config(cls, server: ServerConfig, *, max_connections: int | None = None) -> EdgeLimits:
        return cls(
            header_timeout_s=server.header_timeout_s,
            max_header_bytes=server.max_header_bytes,
            body_timeout_s=server.body_timeout_s,
            body_min_bytes_per_s=server.body_min_bytes_per_s,
            max_connections=server.max_connections if max_connections is None else max_connections,
        )

    def to_env(self) -> str:
        return orjson.dumps(dataclasses.asdict(self)).decode()


@cache
def process_limits() -> EdgeLimits:
    """This process's limits: what ``serve`` put in the environment, else the defaults."""
    raw = os.environ.get(ENV)
    return EdgeLimits(**orjson.loads(raw)) if raw else EdgeLimits()


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise this process's open-file limit to its hard limit; (before, now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit cannot be the soft one for files: Linux caps it at fs.nr_open
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1024 * 1024)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # e.g. fs.nr_open below an unlimited hard limit: keep what we have
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft, now, hard


def connection_budget(wanted: int, open_files: int) -> int:
    """``max_connections`` as the open-file limit allows, keeping :data:`FD_RESERVE` for the rest."""
    if open_files == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, open_files - FD_RESERVE))


def error_response(server_state: ServerState, status: int, message: str, error_type: str, code: str, extra: bytes = b"", path: str = "") -> bytes:
    """A complete ``connection: close`` HTTP/1.1 response with an error body in OpenAI's shape
    (Anthropic's for a request to ``/v1/messages``; ``path`` is empty before a request line came)."""
    error = anthropic_error(status, message) if speaks_anthropic(path) else {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    body = orjson.dumps(error)
    head = [f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode()]
    head.extend(name + b": " + value + b"\r\n" for name, value in server_state.default_headers)
    # an x-request-id as on every answer of the gateway: clients tell its answers from a proxy's by it
    head.append(b"x-request-id: %s\r\n" % os.urandom(16).hex().encode())
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body))
    return b"".join(head) + extra + b"\r\n" + body


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _Tally:
    """Counts the connections the edge cut off; says so in one warning a minute at most, not one each."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.counts: dict[str, int] = {}
        self._said_at: float | None = None  # the first cut-off is said at once

    def note(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        now = time.monotonic()
        if self._said_at is None or now - self._said_at >= self.every_s:
            since = "" if self._said_at is None else f" in the last {now - self._said_at:.0f} s"
            said = ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items()))
            log.warning("edge: connections cut off%s: %s (the next summary in %.0f s at the earliest)", since, said, self.every_s)
            self.counts.clear()
            self._said_at = now


#: this process's cut-offs
tally = _Tally()


class _HeadTooLarge(Exception):
    """Raised inside the parser's callback to stop it at a head over the limit."""


#: per server: its open connections, oldest first, for :meth:`_make_room` (an OrderedDict takes the
#: oldest out in O(1) however many were removed before it; a dict would walk over their holes)
_open_by_server: weakref.WeakKeyDictionary[ServerState, OrderedDict[EdgeHttpToolsProtocol, None]] = weakref.WeakKeyDictionary()
#: connections looked at, at most, to find one to close for a newcomer
ROOM_SCAN = 64


def forward(scope: dict[str, Any], trusted: _TrustedHosts) -> None:
    """What uvicorn's :class:`ProxyHeadersMiddleware` makes of an HTTP request from a trusted proxy:
    the scheme and the client as its ``X-Forwarded-Proto`` and ``X-Forwarded-For`` say."""
    proto: bytes | None = None
    forwarded_for: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
    if proto is not None:
        scheme = proto.decode("latin1").strip()
        if scheme in {"http", "https", "ws", "wss"}:
            scope["scheme"] = scheme
    if forwarded_for:
        host, port = trusted.get_trusted_client_address(b", ".join(forwarded_for).decode("latin1"))
        if host:
            scope["client"] = (host, port)


class EdgeHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol with head/body timeouts, a head size limit and a connection cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the proxies trusted with X-Forwarded-*: uvicorn's middleware for that is done here (:func:`forward`),
        #: the trust decided once per connection rather than in one more coroutine per request
        self._trusted: _TrustedHosts | None = None
        if type(self.app) is ProxyHeadersMiddleware:
            self._trusted = self.app.trusted_hosts
            self.app = self.app.app
        self._forwarded = False  # whether this connection's peer is a trusted proxy
        self._limits = process_limits()
        self._max_head = self._limits.max_header_bytes
        opened = _open_by_server.get(self.server_state)
        if opened is None:
            opened = _open_by_server[self.server_state] = OrderedDict()
        self._open = opened
        self._awaiting_head = True  # between requests, or in the middle of a head
        self._head_bytes = 0  # bytes received since the head began (an upper bound of its size)
        self._body_pending = False  # a head is complete, its body is not
        self._body_bytes = 0  # bytes received in the current body window
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        #: since when the connection waits for its next request (loop time; None while a request is on)
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections and not self._make_room():
            tally.note("max_connections_503")
            self._refuse(
                error_response(
                    self.server_state,
                    503,
                    f"the gateway has {self._limits.max_connections} connections open, each with a request in flight: retry shortly",
                    "service_unavailable",
                    "too_many_connections",
                    b"retry-after: 1\r\n",
                )
            )
            return
        self._open[self] = None
        self._timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)
        if self._trusted is not None:
            self._forwarded = (self.client[0] if self.client else None) in self._trusted

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._open.pop(self, None)
        super().connection_lost(exc)

    def eof_received(self) -> None:
        # a lingering refusal ends when the client has read it and closed; otherwise uvicorn's way
        if self._lingering:
            self.transport.close()

    def _make_room(self) -> bool:
        """Close the oldest connection waiting for a request head; False when none of those looked at waits.

        Looking starts at the oldest connection; one with a request in flight moves to the back, so
        the next newcomer looks further and each look costs a bounded time. Nothing is tracked per
        request: the requests of the connections that are not full pay nothing for this.
        """
        opened = self._open
        for _ in range(min(len(opened), ROOM_SCAN)):
            victim, _ = opened.popitem(last=False)
            if victim._is_waiting():
                self.connections.discard(victim)
                log.debug("edge: %d connections open, closing the oldest one waiting for a request", len(self.connections) + 1)
                victim.transport.close()
                tally.note("max_connections_closed_idle")
                return True
            opened[victim] = None
        return False

    def _is_waiting(self) -> bool:
        cycle = self.cycle
        return self._awaiting_head and not self._lingering and (cycle is None or cycle.response_complete)

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: read and dropped until the client closes
        self._idle_since = None  # no longer idle: the keep-alive check that comes finds it so
        if self._awaiting_head:
            self._head_bytes += len(data)
        else:
            self._body_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
                return
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        if self._awaiting_head:
            if self._head_bytes:  # a head has begun and is not complete
                if self._head_bytes > self._max_head:
                    self._head_too_large()
                elif self._timer is None:
                    self._timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)
        elif self._body_pending and self._timer is None:
            self._body_bytes = 0
            self._timer = self.loop.call_later(self._limits.body_timeout_s, self._judge_body)

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def on_headers_complete(self) -> None:
        if self._head_bytes > self._max_head and self._head_size() > self._max_head:
            raise _HeadTooLarge
        self._awaiting_head = False
        self._head_bytes = 0
        self._body_pending = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._forwarded:
            forward(self.scope, self._trusted)  # type: ignore[arg-type]
        HttpToolsProtocol.on_headers_complete(self)

    def _head_size(self) -> int:
        # the chunks counted may hold the body too: measure what the parser gave (CRLFs, ": ")
        return len(self.url) + 14 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._awaiting_head = True
        self._body_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_response_complete(self) -> None:
        """uvicorn's, but the keep-alive timeout is not a timer set at each response's end and
        cancelled by the next request's first bytes (two timer operations a request on a busy
        connection): the connection notes since when it is idle, and one timer per connection
        checks that when it fires, closing the connection or firing again when the time is up."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            # a pipelined request was waiting for this one's response
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None:
            return  # a request is on: its response's end sets the next check
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self.timeout_keep_alive_handler()

    # -- the limits ----------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._awaiting_head and not self.transport.is_closing():
            log.debug("edge: no complete request head within %.1f s, closing %s", self._limits.header_timeout_s, self.client)
            tally.note("header_timeout")
            self.transport.close()

    def _head_too_large(self) -> None:
        log.debug("edge: request head over %d bytes from %s: 431", self._limits.max_header_bytes, self.client)
        tally.note("header_too_large_431")
        self._answer_and_close(
            error_response(
                self.server_state,
                431,
                f"the request head (request line and headers) is larger than the gateway's limit of {self._limits.max_header_bytes} bytes",
                "invalid_request_error",
                "request_header_too_large",
                # the request line's target, as far as it came
                path=self.url.split(b"?", 1)[0].decode("latin-1"),
            )
        )

    def _judge_body(self) -> None:
        self._timer = None
        if not self._body_pending or self.transport.is_closing():
            return
        limits = self._limits
        cycle = self.cycle
        # the gateway stopped reading (the app has not taken what came), or the client waits for 100 Continue
        ours = self.flow.read_paused or cycle.waiting_for_100_continue
        if not ours and self._body_bytes < max(1, limits.body_min_bytes_per_s * limits.body_timeout_s):
            log.debug("edge: %d body bytes in %.1f s from %s: 408", self._body_bytes, limits.body_timeout_s, self.client)
            tally.note("body_too_slow_408")
            self._body_too_slow()
            return
        self._body_bytes = 0
        self._timer = self.loop.call_later(limits.body_timeout_s, self._judge_body)

    def _body_too_slow(self) -> None:
        cycle = self.cycle
        # the app waits for the rest of the body: it gets a disconnect and writes nothing more
        cycle.disconnected = True
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
            return
        limits = self._limits
        self._answer_and_close(
            error_response(
                self.server_state,
                408,
                f"the request body arrived slower than {limits.body_min_bytes_per_s} bytes/s over {limits.body_timeout_s:g} s",
                "invalid_request_error",
                "request_timeout",
                path=cycle.scope["path"],
            )
        )

    def _answer_and_close(self, response: bytes) -> None:
        self._body_pending = False
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.disconnected:
            self.transport.close()  # a pipelined response is still being written: no room for ours
            return
        self._refuse(response)

    def _refuse(self, response: bytes) -> None:
        """Send ``response``, half-close, and drop what the client still sends until it closes."""
        self._lingering = True
        # going within LINGER_S: it no longer holds one of max_connections, nor can it be made room of
        self.connections.discard(self)
        self._open.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        self._lingering = True  # uvicorn closes after it; nothing more is read
        super().send_400_response(msg)


def prepare(server: ServerConfig) -> dict[str, Any]:
    """Raise the open-file limit, fit ``max_connections`` under it, hand the limits to the workers.

    Returns the ``uvicorn.run`` arguments that put the edge in place.
    """
    before, now, hard = raise_open_file_limit()
    budget = connection_budget(server.max_connections, now)
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("open-file limit %d (was %d, hard limit %s); at most %d connections per process", now, before, shown, budget)
    if budget < server.max_connections:
        log.warning(
            "server.max_connections %d lowered to %d: the open-file limit is %d and %d descriptors stay for the database, state and providers",
            server.max_connections,
            budget,
            now,
            FD_RESERVE,
        )
    os.environ[ENV] = EdgeLimits.from_config(server, max_connections=budget).to_env()
    process_limits.cache_clear()
    return {"http": EdgeHttpToolsProtocol, "timeout_keep_alive": server.idle_timeout_s}
