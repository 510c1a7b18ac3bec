"""CPU per request of the HTTP protocol with and without the edge limits (``app/edge.py``).

``python bench/edge_overhead.py [--requests 20000] [--rounds 5]``

One keep-alive connection over an in-memory transport, a POST with a small body per request and an
ASGI app that answers at once: what is left is the protocol's own work per request (parsing,
the request-response cycle, the edge's bookkeeping), measured with ``time.process_time`` and
interleaved rounds; the median of each is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.api.transport import CoalescingHttpToolsProtocol
from app.edge import EdgeHttpToolsProtocol

REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-xxxxxxxxxxxxxxxx\r\n"
    b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n" + b"x" * 60
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class MemoryTransport:
    """Takes writes and drops them."""

    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def per_request_us(protocol_class: type[Any], requests: int) -> float:
    config = Config(app, loop="none", http=protocol_class, log_level="warning")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(MemoryTransport())
    started = time.process_time()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        while protocol.cycle is None or not protocol.cycle.response_complete:
            await asyncio.sleep(0)
    return (time.process_time() - started) / requests * 1e6


async def main(requests: int, rounds: int) -> None:
    classes = {"uvicorn + coalescing": CoalescingHttpToolsProtocol, "+ edge limits": EdgeHttpToolsProtocol}
    found: dict[str, list[float]] = {name: [] for name in classes}
    for _ in range(rounds):
        for name, cls in classes.items():
            found[name].append(await per_request_us(cls, requests))
    for name, values in found.items():
        print(f"{name:22} {statistics.median(values):6.2f} µs/request (median of {rounds}; min {min(values):.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.rounds))
