"""The keep-alive timeout as the edge keeps it (one check per connection, not a timer per request):
a connection is closed ``idle_timeout_s`` after its last response, never while it keeps asking."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.serve import ServeProcess
from tests.test_edge_limits import _config, connect, read_until_closed

IDLE_S = 1.0
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess(_config(tmp_path_factory.mktemp("keep-alive"), "keep-alive", f"idle_timeout_s: {IDLE_S:g}"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_a_connection_that_keeps_asking_stays_open_and_closes_a_timeout_after_its_last_answer(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        started = time.monotonic()
        # requests 0.4 s apart for over twice the timeout: the check that fires meanwhile finds the connection busy or idle for less
        while time.monotonic() - started < 2.5 * IDLE_S:
            sock.sendall(HEALTH)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.4 * IDLE_S)
        sock.sendall(HEALTH)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        assert read_until_closed(sock) == b""
        idle = time.monotonic() - answered
        assert 0.9 * IDLE_S <= idle < 4 * IDLE_S, idle


def test_a_connection_idle_from_its_first_answer_is_closed(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        sock.sendall(HEALTH)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.9 * IDLE_S <= time.monotonic() - answered < 4 * IDLE_S
