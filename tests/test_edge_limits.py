"""The HTTP edge against abusive clients on raw sockets, on the real ``admiral-optimizer serve``.

Each abuse is cut off as the config says while ``/health`` keeps answering other clients. The
limits are small here (a second, a few KiB) so the tests are quick; bounds on time are generous.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from app.edge import ROOM_SCAN, EdgeHttpToolsProtocol, EdgeLimits, _Tally, connection_budget, process_limits
from tests.hostile import split_response, wait_for
from tests.serve import ServeProcess, cli_command
from tests.support import free_port

CHAT = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
#: how long /health may take while an abuse goes on: normal is a millisecond
PROMPT_S = 2.0


def _config(tmp_path: Path, name: str, server: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""
server: {{{server}}}
providers: {{demo: {{kind: demo}}}}
models: {{demo: [demo/echo]}}
database: {{url: "sqlite+aiosqlite:///{tmp_path}/{name}.db"}}
"""
    )
    return path


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("edge")
    limits = "header_timeout_s: 1, max_header_bytes: 4096, body_timeout_s: 1, body_min_bytes_per_s: 200, idle_timeout_s: 1"
    process = ServeProcess(_config(tmp, "edge", limits))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def connect(port: int, timeout: float = 15) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def health_is_prompt(gw: ServeProcess) -> None:
    started = time.monotonic()
    r = httpx.get(f"{gw.url}/health", timeout=PROMPT_S)
    assert r.status_code == 200 and time.monotonic() - started < PROMPT_S


def chat_head(length: int, extra: str = "") -> bytes:
    return f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


# -- the request head ----------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        started = time.monotonic()
        health_is_prompt(gw)
        assert read_until_closed(sock) == b""  # closed without an answer, as nginx does
        assert 0.5 < time.monotonic() - started < 10
    # said in the log (the first cut-off at once, then a summary a minute at most)
    wait_for(lambda: "edge: connections cut off" in gw.output(), what="the cut-off logged")


def test_a_head_dripped_byte_by_byte_is_closed_at_the_deadline(gw: ServeProcess) -> None:
    # the slowloris way: every byte resets nothing, the head has header_timeout_s in all
    head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * 200
    with connect(gw.port) as sock:
        started = time.monotonic()
        closed = False
        for byte in head:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
            health_is_prompt(gw)  # another client is served between the drips
            if time.monotonic() - started > 10:
                break
            time.sleep(0.05)
        if not closed:
            assert read_until_closed(sock) == b""
        assert time.monotonic() - started < 10


def test_a_head_over_the_limit_is_431(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        status, headers, body = split_response(read_until_closed(sock))
    assert status == 431 and headers["connection"] == "close"
    error = httpx.Response(status, content=body).json()["error"]
    assert error["code"] == "request_header_too_large" and "4096" in error["message"]
    health_is_prompt(gw)


def test_an_endless_head_is_431_before_it_ends(gw: ServeProcess) -> None:
    # headers that never end: answered once the limit is passed, not buffered forever
    with connect(gw.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n")
        for i in range(200):
            try:
                sock.sendall(f"X-Header-{i}: {'b' * 100}\r\n".encode())
            except OSError:
                break
        status, _, _ = split_response(read_until_closed(sock))
    assert status == 431
    health_is_prompt(gw)


def test_a_big_body_after_a_small_head_is_not_mistaken_for_a_big_head(gw: ServeProcess) -> None:
    # head and body arrive in one read: only the head counts against max_header_bytes
    body = b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"x" * 30000 + b'"}]}'
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    with connect(gw.port) as sock:
        sock.sendall(chat_head(len(body), "Connection: close\r\n") + body)
        status, _, _ = split_response(read_until_closed(sock))
    assert status == 200


def test_a_head_just_under_the_limit_is_served(gw: ServeProcess) -> None:
    r = httpx.get(f"{gw.url}/health", headers={"x-padding": "p" * 3500})
    assert r.status_code == 200


def test_on_the_messages_api_the_edge_answers_in_anthropics_shape(gw: ServeProcess) -> None:
    # Anthropic's clients read {"type": "error", "error": {"type", "message"}}: a 431 and a 408 for
    # a request to /v1/messages come in that shape, as the endpoint's own errors do
    with connect(gw.port) as sock:
        sock.sendall(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        status, _, body = split_response(read_until_closed(sock))
    assert status == 431
    said = httpx.Response(status, content=body).json()
    assert said["type"] == "error" and said["error"]["type"] == "invalid_request_error" and "4096" in said["error"]["message"]
    with connect(gw.port) as sock:
        sock.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT[:10])
        status, _, body = split_response(read_until_closed(sock))
    assert status == 408
    said = httpx.Response(status, content=body).json()
    assert said["type"] == "error" and "slower than" in said["error"]["message"]


# -- the body ------------------------------------------------------------------------------------


def test_a_body_slower_than_the_floor_is_408(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        sock.sendall(chat_head(len(CHAT)) + CHAT[:10])
        started = time.monotonic()
        health_is_prompt(gw)
        status, headers, body = split_response(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert httpx.Response(status, content=body).json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 10
    health_is_prompt(gw)


def test_a_body_dripped_below_the_floor_is_408(gw: ServeProcess) -> None:
    # bytes keep coming, too few of them: 200 bytes/s is the floor, this sends about 20
    payload = CHAT + b" " * 2000
    with connect(gw.port) as sock:
        sock.sendall(chat_head(len(payload)))
        started = time.monotonic()
        answered = b""
        for i in range(len(payload)):
            try:
                sock.send(payload[i : i + 1])
            except OSError:
                break
            sock.settimeout(0.05)
            try:
                answered = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(15)
        answered += read_until_closed(sock)
    assert split_response(answered)[0] == 408
    assert time.monotonic() - started < 10


def test_a_body_at_a_fair_pace_is_served(gw: ServeProcess) -> None:
    # well above the floor, spread over more than one window: not cut off
    payload = CHAT + b" " * 1500
    with connect(gw.port) as sock:
        sock.sendall(chat_head(len(payload), "Connection: close\r\n"))
        for start in range(0, len(payload), 300):
            sock.sendall(payload[start : start + 300])
            time.sleep(0.25)
        status, _, body = split_response(read_until_closed(sock))
    assert status == 200, body


# -- keep-alive ----------------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed(gw: ServeProcess) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")  # still open for a second request
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < 4  # idle_timeout_s is 1 here; uvicorn's own default is 5


# -- connections and file descriptors ------------------------------------------------------------


@contextlib.contextmanager
def serve_with_open_files(config: Path, soft: int, hard: int) -> Iterator[ServeProcess]:
    """``serve`` started under an open-file limit of soft/hard, as a shell with ``ulimit -n`` would."""
    process = ServeProcess.__new__(ServeProcess)
    process.port = free_port()
    process.url = f"http://127.0.0.1:{process.port}"
    process.log_path = config.with_suffix(f".{process.port}.log")
    process._log = process.log_path.open("wb")
    args = [*cli_command(), "serve", "--config", str(config), "--port", str(process.port), "--log-level", "info"]
    # set the limit in a small Python that then becomes the server (exec), not in a preexec_fn
    limited = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); os.execv(sys.argv[1], sys.argv[1:])"
    process.proc = subprocess.Popen([sys.executable, "-c", limited, *args], stdout=process._log, stderr=subprocess.STDOUT, cwd=config.parent)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.fixture
def many_sockets() -> Iterator[list[socket.socket]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"the test needs 1 400 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_startup_raises_the_open_file_limit_and_logs_it(gw: ServeProcess, tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise")
    with serve_with_open_files(_config(tmp_path, "rlimit", "max_connections: 100000"), 1024, hard) as limited:
        assert open_files(limited.proc.pid)[0] == (hard if hard != resource.RLIM_INFINITY else 1024 * 1024)
        output = limited.output()
    assert "open-file limit" in output and "was 1024" in output
    assert "lowered to" in output  # 100 000 connections do not fit: said, and capped
    assert "alembic.runtime.plugins" not in gw.output()  # the startup log without Alembic's plugin lines


def test_1100_connections_without_a_head_do_not_take_health_down(tmp_path: Path, many_sockets: list[socket.socket]) -> None:
    # the case: a hard limit of 1 024 files that cannot be raised, 1 100 sockets that never
    # send a head; the oldest idle ones make room for newcomers, so /health still answers
    with serve_with_open_files(_config(tmp_path, "fds", "header_timeout_s: 60"), 1024, 1024) as limited:
        assert "at most 768 connections" in limited.output()
        for _ in range(1100):
            many_sockets.append(connect(limited.port))
        for _ in range(5):
            health_is_prompt(limited)
        assert httpx.post(f"{limited.url}/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"}, timeout=PROMPT_S).status_code == 200
        # the first ones were closed to make room, the newest still wait
        many_sockets[0].settimeout(5)
        assert read_until_closed(many_sockets[0]) == b""
        many_sockets[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            many_sockets[-1].recv(1)


def test_beyond_max_connections_with_every_one_busy_a_newcomer_gets_503(tmp_path: Path) -> None:
    # eight connections, each in the middle of a request (head sent, body pending at a fair pace
    # for the slow-body check): nobody idles, so a ninth is answered 503 with Retry-After
    config = _config(tmp_path, "busy", "max_connections: 8, header_timeout_s: 60, body_timeout_s: 60, body_min_bytes_per_s: 0")
    with serve_with_open_files(config, *resource.getrlimit(resource.RLIMIT_NOFILE)) as limited:
        busy = [connect(limited.port) for _ in range(8)]
        try:
            for sock in busy:
                sock.sendall(chat_head(len(CHAT)) + CHAT[:5])
            wait_for(lambda: _status_of_newcomer(limited.port) == 503, timeout=10, what="a newcomer refused")
            with connect(limited.port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
                status, headers, body = split_response(read_until_closed(sock))
            assert status == 503 and headers["retry-after"] == "1" and headers["x-request-id"]  # the gateway's answer, not a proxy's
            assert httpx.Response(status, content=body).json()["error"]["code"] == "too_many_connections"
            # one busy request finishes: room again
            busy[0].sendall(CHAT[5:])
            assert split_response(busy[0].recv(65536))[0] == 200
            busy.pop(0).close()
            wait_for(lambda: _status_of_newcomer(limited.port) == 200, timeout=10, what="room again")
        finally:
            for sock in busy:
                sock.close()


def _status_of_newcomer(port: int) -> int:
    with connect(port, timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        return split_response(read_until_closed(sock))[0]


def test_the_limits_hold_in_every_worker(tmp_path: Path) -> None:
    # workers are spawned processes: the limits reach them through the environment
    process = ServeProcess(_config(tmp_path, "workers", "header_timeout_s: 1, max_header_bytes: 2048"), workers=2)
    try:
        process.wait_ready()
        for _ in range(4):  # connections spread over both workers
            with connect(process.port) as sock:
                started = time.monotonic()
                assert read_until_closed(sock) == b""
                assert time.monotonic() - started < 5  # 1 s here, 10 s by default
            with connect(process.port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
                assert split_response(read_until_closed(sock))[0] == 431
        # a reset here once meant a worker had failed to start (both self-upgrading one SQLite
        # file at once) and uvicorn's parent had stopped the server: test_migrations covers that
        assert process.proc.poll() is None
    finally:
        process.stop()


# -- units ---------------------------------------------------------------------------------------


def test_connection_budget_keeps_descriptors_for_the_gateway() -> None:
    assert connection_budget(4096, 1024) == 768
    assert connection_budget(4096, 1_048_576) == 4096
    assert connection_budget(4096, 100) == 8  # never below a handful
    assert connection_budget(50, resource.RLIM_INFINITY) == 50


def test_limits_travel_to_workers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = EdgeLimits(header_timeout_s=3, max_header_bytes=2048, body_timeout_s=4, body_min_bytes_per_s=5, max_connections=99)
    monkeypatch.setenv("ADMIRAL_EDGE_LIMITS", limits.to_env())
    process_limits.cache_clear()
    try:
        assert process_limits() == limits
    finally:
        monkeypatch.delenv("ADMIRAL_EDGE_LIMITS")
        process_limits.cache_clear()
    assert process_limits() == EdgeLimits()


def test_cut_offs_are_logged_once_then_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    tally = _Tally(every_s=60)
    with caplog.at_level(logging.WARNING, logger="admiral.edge"):
        for _ in range(3):
            tally.note("header_timeout")
        tally.note("header_too_large_431")
        assert [r.getMessage() for r in caplog.records] == ["edge: connections cut off: header_timeout 1 (the next summary in 60 s at the earliest)"]
        assert tally._said_at is not None
        tally._said_at -= 60  # a minute later
        tally.note("header_timeout")
    assert caplog.records[-1].getMessage().startswith("edge: connections cut off in the last 60 s: header_timeout 3, header_too_large_431 1")


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _connection(opened: OrderedDict[EdgeHttpToolsProtocol, None], connections: set[object], *, waiting: bool) -> EdgeHttpToolsProtocol:
    """A protocol object with only the state room-making reads (no socket, no uvicorn server)."""
    conn = EdgeHttpToolsProtocol.__new__(EdgeHttpToolsProtocol)
    conn._open, conn.connections = opened, connections  # type: ignore[assignment]
    conn._awaiting_head, conn._lingering = waiting, False
    conn.cycle = None if waiting else SimpleNamespace(response_complete=False)  # type: ignore[assignment]
    conn.transport = _Transport()  # type: ignore[assignment]
    opened[conn] = None
    connections.add(conn)
    return conn


def test_room_is_made_of_the_oldest_waiting_connection_and_busy_ones_move_back() -> None:
    opened: OrderedDict[EdgeHttpToolsProtocol, None] = OrderedDict()
    connections: set[object] = set()
    busy = [_connection(opened, connections, waiting=False) for _ in range(ROOM_SCAN + 6)]
    first, second = _connection(opened, connections, waiting=True), _connection(opened, connections, waiting=True)
    newcomer = _connection(OrderedDict(), connections, waiting=True)
    newcomer._open = opened
    assert not newcomer._make_room()  # the oldest 64 are busy: a bounded look finds nobody (503) ...
    assert list(opened)[-ROOM_SCAN:] == busy[:ROOM_SCAN]  # ... and moves them to the back
    assert newcomer._make_room()  # the next look starts past them
    assert first.transport.closed and first not in opened and first not in connections  # type: ignore[attr-defined]
    assert not second.transport.closed and not any(b.transport.closed for b in busy)  # type: ignore[attr-defined]
