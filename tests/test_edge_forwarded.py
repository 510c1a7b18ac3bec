"""The edge reads ``X-Forwarded-*`` as uvicorn's proxy-headers middleware does (it takes that
middleware's place): the same scheme and client in the scope, from a trusted proxy only."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.edge import EdgeHttpToolsProtocol
from tests.test_send_complete import MemoryTransport


class Peer(MemoryTransport):
    """A transport whose far end is ``peer``."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.peer, 50000)
        return ("127.0.0.1", 8000) if name == "sockname" else default

    def can_write_eof(self) -> bool:
        return False


async def _seen(protocol_class: type[HttpToolsProtocol], peer: str, trusted: str, headers: bytes) -> tuple[Any, Any]:
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, loop="none", http="httptools", log_config=None, proxy_headers=True, forwarded_allow_ips=trusted)
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Peer(peer))  # type: ignore[arg-type]
    protocol.data_received(b"GET /health HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    (scope,) = scopes
    return scope["client"], scope["scheme"]


@pytest.mark.asyncio
@pytest.mark.parametrize("peer", ["127.0.0.1", "10.0.0.9"])
@pytest.mark.parametrize("trusted", ["127.0.0.1", "*", "10.0.0.0/8, 127.0.0.1"])
@pytest.mark.parametrize(
    "headers",
    [
        b"",
        b"x-forwarded-for: 203.0.113.7\r\nx-forwarded-proto: https\r\n",
        b"x-forwarded-for: 203.0.113.7, 10.0.0.5\r\nx-forwarded-for: 10.0.0.6:81\r\n",
        b"x-forwarded-proto: gopher\r\nx-forwarded-for: \r\n",
    ],
    ids=["none", "one-hop", "hops", "unusable"],
)
async def test_the_forwarded_client_and_scheme_are_uvicorns(peer: str, trusted: str, headers: bytes) -> None:
    ours = await _seen(EdgeHttpToolsProtocol, peer, trusted, headers)
    theirs = await _seen(HttpToolsProtocol, peer, trusted, headers)
    assert ours == theirs
