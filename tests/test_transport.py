"""One socket write per loop turn: what uvicorn writes in one turn leaves together, in order."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
import uvloop

from app.api.transport import CoalescingTransport
from tests.fake_upstream import FakeUpstream
from tests.hostile import AUTH, HELLO, config
from tests.support import gateway


class Sink(asyncio.Protocol):
    """The far end of a real socket pair: what arrives, and when the connection ends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class Counting:
    """A real transport whose writes are counted on their way through."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


async def _pair() -> tuple[CoalescingTransport, Counting, Sink]:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, left)
    sink = Sink()
    await loop.connect_accepted_socket(lambda: sink, right)
    counting = Counting(transport)  # type: ignore[arg-type]
    return CoalescingTransport(counting, loop), counting, sink  # type: ignore[arg-type]


async def _turn() -> None:
    await asyncio.sleep(0)


#: both loops the gateway runs on: uvloop when served, asyncio in the tests' in-thread servers
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@LOOPS
def test_writes_of_one_turn_leave_in_one_write_and_later_turns_in_their_own(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    run(_writes_of_one_turn_leave_in_one_write_and_later_turns_in_their_own())


async def _writes_of_one_turn_leave_in_one_write_and_later_turns_in_their_own() -> None:
    wrapped, counting, sink = await _pair()
    wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    wrapped.write(b"{}")
    assert counting.writes == []  # nothing has left yet
    assert wrapped.get_write_buffer_size() == 40
    await _turn()
    assert counting.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    wrapped.write(b"data: 1\n\n")
    await _turn()
    wrapped.write(b"data: 2\n\n")
    await _turn()
    assert counting.writes[1:] == [b"data: 1\n\n", b"data: 2\n\n"]  # a stream's chunks are not held back
    reused = bytearray(b"data: 3\n\n")
    wrapped.write(reused)
    reused[6:7] = b"X"  # the writer reuses its buffer before the turn ends
    await _turn()
    assert counting.writes[3:] == [b"data: 3\n\n"]
    wrapped.close()
    await asyncio.wait_for(sink.closed.wait(), 5)
    assert bytes(sink.received) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}data: 1\n\ndata: 2\n\ndata: 3\n\n"


@LOOPS
def test_close_sends_what_was_written_first_and_abort_drops_it(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    run(_close_sends_what_was_written_first_and_abort_drops_it())


async def _close_sends_what_was_written_first_and_abort_drops_it() -> None:
    wrapped, counting, sink = await _pair()
    wrapped.write(b"last ")
    wrapped.write(b"words")
    wrapped.close()  # in the same turn: the bytes still go out, then the connection closes
    await asyncio.wait_for(sink.closed.wait(), 5)
    assert bytes(sink.received) == b"last words"
    assert counting.writes == [b"last words"]
    await _turn()
    assert counting.writes == [b"last words"]  # the turn's end finds nothing left to send

    wrapped, counting, sink = await _pair()
    wrapped.write(b"never sent")
    wrapped.abort()
    await asyncio.wait_for(sink.closed.wait(), 5)
    await _turn()
    assert counting.writes == [] and bytes(sink.received) == b""


@LOOPS
def test_everything_else_is_the_wrapped_transports(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    run(_everything_else_is_the_wrapped_transports())


async def _everything_else_is_the_wrapped_transports() -> None:
    wrapped, _, _ = await _pair()
    assert wrapped.get_extra_info("socket") is not None
    assert not wrapped.is_closing()
    wrapped.pause_reading()
    assert not wrapped.is_reading()
    wrapped.resume_reading()
    assert wrapped.is_reading()
    wrapped.close()
    assert wrapped.is_closing()


def test_the_gateway_answers_keep_alive_close_and_streams_through_it(up: FakeUpstream) -> None:
    with gateway(config(up)) as gw, httpx.Client(base_url=gw.base_url, headers=AUTH) as client:
        for i in range(3):  # one keep-alive connection, one answer after another
            r = client.post("/chat/completions", json={**HELLO, "messages": [{"role": "user", "content": f"coalesced {i}"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        r = client.post("/chat/completions", json=HELLO, headers={"Connection": "close"})
        assert r.status_code == 200 and r.headers["connection"] == "close"
        with client.stream("POST", "/chat/completions", json={**HELLO, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
