"""A complete answer to the only request in progress leaves as soon as its request is recorded, not
in the loop's next pass; with other requests in progress it leaves with theirs at the turn's end.
Either way the request's bookkeeping has run before its client can have the answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.api.lane import JSONBytes
from app.api.transport import CoalescingHttpToolsProtocol
from app.pipeline.answer import Answer
from tests.test_send_complete import BODY, REQUEST, MemoryTransport


async def _answer_once(others_in_progress: int) -> tuple[list[bytes], list[bytes], MemoryTransport]:
    """One request answered through the coalescing protocol: what the socket had when its
    bookkeeping ran, and when the app returned."""
    at_bookkeeping: list[bytes] = []
    at_return: list[bytes] = []
    transport = MemoryTransport()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        answer = Answer(body={"object": "chat.completion"})  # type: ignore[typeddict-item]
        answer.after_sent(lambda: at_bookkeeping.append(bytes(transport.written)))
        await JSONBytes(BODY, [], answer)(scope, receive, send)
        at_return.append(bytes(transport.written))

    config = Config(app, loop="none", http="httptools", log_config=None, access_log=False)
    config.load()
    state = ServerState()
    state.tasks.update(asyncio.get_running_loop().create_future() for _ in range(others_in_progress))  # type: ignore[arg-type]
    protocol = CoalescingHttpToolsProtocol(config=config, server_state=state, app_state={})
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(REQUEST)
    for _ in range(5):
        await asyncio.sleep(0)
    return at_bookkeeping, at_return, transport


@pytest.mark.asyncio
async def test_the_only_answer_in_progress_leaves_once_recorded() -> None:
    at_bookkeeping, at_return, transport = await _answer_once(0)
    assert at_bookkeeping == [b""]  # recorded before the client could have it
    assert at_return[0].endswith(BODY) and transport.writes == 1  # and gone before the loop's next pass


@pytest.mark.asyncio
async def test_with_other_requests_in_progress_the_answer_leaves_at_the_turns_end() -> None:
    at_bookkeeping, at_return, transport = await _answer_once(1)
    assert at_bookkeeping == [b""] and at_return == [b""]
    assert transport.written.endswith(BODY) and transport.writes == 1
