"""The stream client: chunks relayed per second and time to first byte of streamed chat completions.

wrk counts responses and bytes, not SSE events, and cannot time a body's first byte. This client
holds ``connections`` keep-alive connections, each sending the requests of a ``Workload``
(``stream=True``) one after another and reading every stream to its end: raw asyncio on uvloop
with httptools' response parser, cheap enough per stream to leave the load core to spare. Every
server of the streamed workload is measured with it, so their ratio compares like with like.

A chunk is one ``data:`` event other than ``data: [DONE]``. A stream counts only when it answers
200 with exactly ``STREAM_CHUNKS`` chunks and ends with ``data: [DONE]``; any other answer (a
status, a short or long stream, a connection lost, no answer within the timeout) is an error,
and its chunks are not counted.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from fixtures import STREAM_CHUNKS, count_chunks
from load import Workload
from procs import HOST

#: seconds a stream may take before it is an error
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StreamResult:
    """What one run of the stream client saw; only complete, correct streams count."""

    streams: int
    chunks: int
    seconds: float
    #: first body byte after the request was written, per counted stream, in milliseconds
    ttfb_ms: tuple[float, ...]
    errors: int
    first_error: str | None
    #: request written to last byte read, per counted stream, in milliseconds
    total_ms: tuple[float, ...] = ()

    def total_percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the whole streams' times; 100 is the slowest."""
        return percentile(self.total_ms, q)

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    @property
    def ttfb_p50_ms(self) -> float:
        return statistics.median(self.ttfb_ms) if self.ttfb_ms else 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive connection: ``ask`` writes a request and resolves with its whole answer."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, float, bytes]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._body = bytearray()
        self._first = 0.0
        self.closed = False

    def ask(self, request: bytes) -> asyncio.Future[tuple[int, float, bytes]]:
        """Status, the time of the first body byte, and the body of the answer to ``request``."""
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        if self.closed or self._transport is None:
            self._answer.set_exception(ConnectionResetError("connection closed"))
            return self._answer
        self._body.clear()
        self._first = 0.0
        self._timer = loop.call_later(TIMEOUT_S, self._fail, TimeoutError(f"no complete answer in {TIMEOUT_S:g} s"))
        self._transport.write(request)
        return self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
            self.close()  # the rest of that answer would otherwise be read as the next one's

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP from the server: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # httptools' callbacks

    def on_body(self, body: bytes) -> None:
        if not self._first:
            self._first = time.perf_counter()
        self._body += body

    def on_message_complete(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._parser.get_status_code(), self._first, bytes(self._body)))


def _requests(port: int, work: Workload) -> Callable[[int], bytes]:
    """Request ``i`` of ``work`` on the wire, headers and body."""
    head = f"POST {work.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in work.headers().items())
    prefix = head.encode()
    bodies = work.bodies()

    def request(i: int) -> bytes:
        body = bodies(i)
        return b"%sContent-Length: %d\r\n\r\n%s" % (prefix, len(body), body)

    return request


async def _run(port: int, work: Workload, connections: int, duration: float | None, requests: int | None, warmup: int) -> StreamResult:
    loop = asyncio.get_running_loop()
    build = _requests(port, work)
    total = None if requests is None else warmup + requests
    started = time.perf_counter()
    deadline = started + (duration or 0.0)
    issued = streams = chunks = errors = 0
    ttfb: list[float] = []
    whole: list[float] = []
    first_error: list[str] = []

    def error(what: str) -> None:
        nonlocal errors
        errors += 1
        if not first_error:
            first_error.append(what)

    async def client() -> None:
        nonlocal issued, streams, chunks
        conn: _Connection | None = None
        while (issued < total) if total is not None else (time.perf_counter() < deadline):
            i = issued
            issued += 1
            try:
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(_Connection, HOST, port)
                sent = time.perf_counter()
                status, first, body = await conn.ask(build(i))
                ended = time.perf_counter()
            except OSError as exc:
                error(f"{type(exc).__name__}: {exc}")
                conn = None
                await asyncio.sleep(0.01)  # a refused connection would otherwise spin
                continue
            if i < warmup:
                continue
            n, done = count_chunks(body)
            if status != 200 or not done or n != STREAM_CHUNKS:
                error(f"status {status}, {n} chunks of {STREAM_CHUNKS}{'' if done else ', no data: [DONE]'}: {body[:200]!r}")
                continue
            streams += 1
            chunks += n
            ttfb.append((first - sent) * 1000)
            whole.append((ended - sent) * 1000)
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return StreamResult(streams, chunks, time.perf_counter() - started, tuple(ttfb), errors, first_error[0] if first_error else None, tuple(whole))


def percentile(values: tuple[float, ...] | list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100) of ``values``; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def stream_load(port: int, work: Workload, *, connections: int, duration: float | None = None, requests: int | None = None, warmup: int = 0) -> StreamResult:
    """Streams of ``work`` on ``connections`` connections, for ``duration`` seconds or ``requests`` streams.

    With ``requests``, the first ``warmup`` streams are sent first and not counted. The client
    runs in this process (run.py keeps it on the load core).
    """
    if (duration is None) == (requests is None):
        raise ValueError("give duration or requests")
    coro = _run(port, work, connections, duration, requests, warmup)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
