"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body when it
sends ``http.response.body``: two ``write`` system calls, and on loopback each one runs the
receiver's TCP input and wakes it. Measured on the 2-core bench VM under cache hits, the wake-up
alone was 15 % of the gateway's CPU (``perf record -g``); ``bench/cpu_per_request.py --hits`` with
the trees before and after this transport, two rounds each: 63-65 µs of CPU a hit before, 56-58
after, and wrk got 15.2-15.7k answers a second before, 17.3-17.7k after.
:class:`CoalescingTransport` keeps what is written during one turn of the event loop and sends it
in one call at the end of the turn, so a head and the body that follows it leave together; a
stream's later chunks, each sent in its own turn, still leave as they come. A complete response
written at once (:func:`send_complete`) has nothing to wait for and leaves at once.

:func:`send_complete` writes a complete response (head and body known at once) in one go: what
uvicorn's ``send`` does over its two messages, without checking every header against its name and
value patterns one by one (a cache hit's answer carries a dozen headers, most of them the gateway's
own constants). :func:`received_body` takes a request body that has all come in, as the cycle's
``receive`` would give it, without its two awaits and its message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Send
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string


#: the bytes uvicorn refuses in a header value (those its HEADER_VALUE_RE matches: controls but tab, and DEL)
_REFUSED_IN_VALUES = bytes(b for b in range(256) if HEADER_VALUE_RE.match(bytes([b])))


class CoalescingTransport:
    """A transport whose writes within one loop turn become one write to the wrapped transport."""

    __slots__ = ("_loop", "_pending", "_transport", "get_extra_info", "is_closing", "pause_reading", "resume_reading")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        # what the protocol asks on every request, bound here: through __getattr__ each call would
        # first fail the ordinary attribute look-up
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def write(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # held until the turn ends: a bytearray could change meanwhile
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def write_whole(self, data: bytes) -> None:
        """Write a whole response: at once when nothing waits for the turn's end (no turn-end call to
        pay for), else after what does."""
        if self._pending is None:
            if not self._transport.is_closing():
                self._transport.write(data)
        else:
            self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what was written to the socket's transport now."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending or ()))

    def close(self) -> None:
        # what was written before close() still goes out first, as with any transport
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # reading side, flow control, extra info: the wrapped transport's own
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


async def send_complete(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, before: Callable[[], None] | None = None) -> None:
    """Send a whole response: ``headers`` are lower-case, hold its ``content-length`` and no
    ``connection`` or ``transfer-encoding``. Through uvicorn's httptools cycle it is written as
    that cycle's ``send`` would write it (default headers, access log, keep-alive, completion),
    in one call; any other ``send`` (a test client's, a wrapping middleware's) gets the two ASGI
    messages. ``before`` runs just before the response is handed over (the answer's bookkeeping:
    a client never holds an answer that is not recorded yet)."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.response_started or cycle.scope["method"] == "HEAD":
        if before is not None:
            before()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    # one pass over every value (a tab, which values may hold, between them): what uvicorn refuses,
    # refused as it does (the response counts as started, so the connection is closed unanswered);
    # deleting the refused bytes is a cheaper pass than uvicorn's regular expression
    values = b"\t".join([value for _, value in headers])
    if len(values.translate(None, _REFUSED_IN_VALUES)) != len(values):
        raise RuntimeError("Invalid HTTP header value.")
    scope = cycle.scope
    if cycle.access_log:
        cycle.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"], get_path_with_query_string(scope), scope["http_version"], status)
    content = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        content += (name.lower(), b": ", value, b"\r\n")
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    if before is not None:
        before()
    transport = cycle.transport
    if type(transport) is CoalescingTransport:
        transport.write_whole(b"".join(content))
    else:
        transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


def received_body(receive: Receive) -> bytes | None:
    """The request's whole body when ``receive`` is uvicorn's httptools cycle's and the body has all
    come in (nothing taken of it yet): what that ``receive`` would return, taken as it takes it.
    None otherwise (part of it still to come, 100 Continue to write, the client gone, another ``receive``)."""
    cycle = getattr(receive, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return None
    if cycle.more_body or cycle.waiting_for_100_continue or cycle.disconnected or cycle.response_complete or not cycle.message_event.is_set():
        return None
    cycle.flow.resume_reading()
    cycle.message_event.clear()
    body = bytes(cycle.body)
    cycle.body = bytearray()
    return body
