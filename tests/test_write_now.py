"""A complete answer leaves at once, not at the end of its loop turn: its client does not wait for
the request's bookkeeping that runs after it (``CoalescingTransport.write_now``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.api.transport import CoalescingHttpToolsProtocol, send_complete
from tests.test_send_complete import BODY, HEADERS, REQUEST, MemoryTransport
from tests.test_transport import LOOPS, _pair, _turn


@LOOPS
def test_write_now_sends_what_the_turn_wrote_and_its_data_in_one_write_at_once(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    run(_write_now_sends_what_the_turn_wrote_and_its_data_in_one_write_at_once())


async def _write_now_sends_what_the_turn_wrote_and_its_data_in_one_write_at_once() -> None:
    wrapped, counting, sink = await _pair()
    wrapped.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    wrapped.write_now(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
    assert counting.writes == [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert wrapped.get_write_buffer_size() == 0
    await _turn()
    assert len(counting.writes) == 1  # the turn's end has nothing left to send
    wrapped.close()
    await sink.closed.wait()
    assert bytes(sink.received).endswith(b"{}")


async def _answer_once(others_in_progress: int) -> tuple[list[bytes], MemoryTransport]:
    """One request answered through the coalescing protocol; ``seen``: what the socket had when ``send_complete`` returned."""
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send_complete(send, 200, list(HEADERS), BODY)
        seen.append(bytes(transport.written))  # what the socket had before the request's bookkeeping runs

    config = Config(app, loop="none", http="httptools", log_config=None, access_log=False)
    config.load()
    state = ServerState()
    others = [asyncio.get_running_loop().create_future() for _ in range(others_in_progress)]
    state.tasks.update(others)  # type: ignore[arg-type]
    protocol = CoalescingHttpToolsProtocol(config=config, server_state=state, app_state={})
    transport = MemoryTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(REQUEST)
    for _ in range(5):
        await asyncio.sleep(0)
    return seen, transport


@pytest.mark.asyncio
async def test_the_only_answer_in_progress_has_left_when_send_complete_returns() -> None:
    seen, transport = await _answer_once(0)
    assert len(seen) == 1 and seen[0].endswith(BODY) and transport.writes == 1


@pytest.mark.asyncio
async def test_with_other_requests_in_progress_the_answer_leaves_at_the_turns_end() -> None:
    seen, transport = await _answer_once(1)
    assert seen == [b""]  # held for the turn's end, with what other requests write in it
    assert transport.written.endswith(BODY) and transport.writes == 1
