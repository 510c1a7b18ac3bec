"""A complete answer written in one call (``app.api.transport.send_complete``) leaves as the same
bytes, with the same connection handling, as uvicorn's own ``send`` writes over two messages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.api.lane import read_body
from app.api.transport import send_complete

BODY = b'{"object":"chat.completion"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()), (b"x-admiral-cache", b"hit"), (b"x-request-id", b"abc")]
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


class MemoryTransport:
    """What the protocol writes, kept; closing is noted."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0


async def _serve(app: Any, requests: bytes, *, access_log: bool = False) -> tuple[MemoryTransport, HttpToolsProtocol]:
    config = Config(app, loop="none", http="httptools", log_config=None, access_log=access_log)
    config.load()
    state = ServerState()
    state.default_headers = [(b"Server", b"uvicorn"), (b"date", b"Sun, 06 Dec 2026 00:00:00 GMT")]
    protocol = HttpToolsProtocol(config=config, server_state=state, app_state={})
    transport = MemoryTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(requests)
    for _ in range(20):  # the app tasks run; each answered request lets a pipelined one start
        await asyncio.sleep(0)
    return transport, protocol


def _apps(headers: list[tuple[bytes, bytes]]) -> tuple[Any, Any]:
    async def one_call(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send_complete(send, 200, list(headers), BODY)

    async def two_messages(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        await send({"type": "http.response.body", "body": BODY})

    return one_call, two_messages


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "requests",
    [REQUEST, REQUEST + REQUEST, REQUEST.replace(b"host: x", b"host: x\r\nconnection: close"), REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0")],
    ids=["keep-alive", "pipelined", "connection-close", "http-1.0"],
)
async def test_one_call_writes_what_uvicorn_writes(requests: bytes) -> None:
    one_call, two_messages = _apps(HEADERS)
    ours, our_protocol = await _serve(one_call, requests)
    theirs, their_protocol = await _serve(two_messages, requests)
    assert ours.written == theirs.written and ours.written.count(BODY) == requests.count(b"POST")
    assert ours.writes == requests.count(b"POST")  # head and body in one write
    assert ours.closed == theirs.closed == (b"close" in requests or b"HTTP/1.0" in requests)
    assert our_protocol.server_state.total_requests == their_protocol.server_state.total_requests == requests.count(b"POST")
    assert our_protocol.cycle is not None and our_protocol.cycle.response_complete


@pytest.mark.asyncio
async def test_a_header_value_uvicorn_refuses_is_refused() -> None:
    one_call, two_messages = _apps([*HEADERS, (b"x-admiral-route", b"bad\r\ninjected: 1")])
    ours, _ = await _serve(one_call, REQUEST)
    theirs, _ = await _serve(two_messages, REQUEST)
    # both fail in the app after the response counts as started: nothing written, the connection closed
    assert ours.written == theirs.written == b"" and ours.closed and theirs.closed


@pytest.mark.asyncio
async def test_the_access_log_line_is_uvicorns(caplog: pytest.LogCaptureFixture) -> None:
    one_call, two_messages = _apps(HEADERS)
    lines = []
    for app in (one_call, two_messages):
        caplog.clear()
        with caplog.at_level("INFO", logger="uvicorn.access"):
            await _serve(app, REQUEST, access_log=True)
        lines.append([r.getMessage() for r in caplog.records if r.name == "uvicorn.access"])
    assert lines[0] == lines[1] and len(lines[0]) == 1


@pytest.mark.asyncio
async def test_another_send_gets_the_two_messages() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await send_complete(send, 200, HEADERS, BODY)
    assert sent == [{"type": "http.response.start", "status": 200, "headers": HEADERS}, {"type": "http.response.body", "body": BODY}]


async def _bodies(requests: list[bytes], take: Any) -> tuple[list[bytes], MemoryTransport]:
    """The bodies an app reading each request's body with ``take`` gets, the data given in ``requests``' pieces."""
    bodies: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        bodies.append(await take(receive))
        await send_complete(send, 200, list(HEADERS), BODY)

    config = Config(app, loop="none", http="httptools", log_config=None)
    config.load()
    protocol = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = MemoryTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    for piece in requests:
        protocol.data_received(piece)
        for _ in range(10):
            await asyncio.sleep(0)
    return bodies, transport


async def _by_messages(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "requests",
    [
        [REQUEST],
        [REQUEST + REQUEST],
        [REQUEST[:-1], REQUEST[-1:]],
        [REQUEST.replace(b"host: x", b"host: x\r\nexpect: 100-continue")[:-2], b"{}"],
        [b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n", b"0\r\n\r\n"],
    ],
    ids=["whole", "pipelined", "in-two-pieces", "100-continue", "chunked"],
)
async def test_a_body_read_whole_is_what_receive_gives(requests: list[bytes]) -> None:
    ours, our_transport = await _bodies(requests, lambda receive: read_body(receive, 1 << 20))
    theirs, their_transport = await _bodies(requests, _by_messages)
    assert ours == theirs and ours and all(body == b"{}" for body in ours)
    assert our_transport.written == their_transport.written  # a 100 Continue too
