"""Test helpers: a real gateway on a loopback port, served by uvicorn in its own thread."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
import yaml

from app.api.transport import CoalescingHttpToolsProtocol
from app.clock import Clock
from app.config import Settings, build_settings
from app.main import create_app
from app.services import Services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: bound, never listening, so no
    server the test starts meanwhile can take it (a :func:`free_port` may be handed out again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def make_settings(config: dict[str, Any] | str, source: str = "test.yaml", env: dict[str, str] | None = None) -> Settings:
    data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
    if "database" not in data:
        # never the working directory: each test gateway gets its own SQLite file
        data["database"] = {"url": f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='admiral-test-')}/admiral.db"}
    return build_settings(data, source, env or {})


class GatewayServer:
    """The whole app behind uvicorn on 127.0.0.1, started and stopped from sync tests."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, clock=clock)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        # the HTTP protocol ``admiral-optimizer serve`` runs
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, loop="asyncio", http=CoalescingHttpToolsProtocol, timeout_graceful_shutdown=2
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def services(self) -> Services:
        return self.app.state.services

    def start(self) -> GatewayServer:
        self._thread.start()
        # generous: a config with an in-process engine imports vLLM first, which a loaded machine
        # has been seen to take over 30 s for
        deadline = time.monotonic() + 120
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("gateway failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start in 120 s")
            time.sleep(0.01)
        self.loop = self._find_loop()
        return self

    def _find_loop(self) -> asyncio.AbstractEventLoop:
        for server in self._server.servers:
            return server.get_loop()  # type: ignore[no-any-return]
        raise RuntimeError("no server loop")

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's own loop (to inspect or poke its services)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def gateway(config: dict[str, Any] | str, env: dict[str, str] | None = None, clock: Clock | None = None) -> Iterator[GatewayServer]:
    with GatewayServer(make_settings(config, env=env), clock=clock) as server:
        yield server
