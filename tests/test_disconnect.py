"""A client that leaves mid-request frees everything: upstream call, inflight gauge, tasks, sockets.

One lone request at a time (no dedupe followers), so the upstream call has nobody left to serve.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.disconnect import WATCH_AFTER_S, DisconnectWatcher
from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, AUTH, HELLO, config, inflight, metric_sum, wait_for
from tests.support import GatewayServer, gateway


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


async def _task_count() -> int:
    return len(asyncio.all_tasks())


def established_to(port: int) -> int:
    """This process's open TCP connections whose far end is ``port`` (Linux /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def open_request(gw: GatewayServer, body: dict[str, object]) -> socket.socket:
    """Send a chat request on a fresh connection and leave it waiting."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {AGENT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


@pytest.fixture
def settled(gw: GatewayServer, up: FakeUpstream) -> Iterator[int]:
    """The gateway at rest (warm, nothing in flight); yields its loop's task count."""
    up.reset()
    assert httpx.post(f"{gw.base_url}/chat/completions", json={**HELLO, "messages": [{"role": "user", "content": "warm-up"}]}, headers={**AUTH, "Connection": "close"}).status_code == 200
    wait_for(lambda: inflight(gw) == 0 and up.inflight == 0, what="a gateway at rest")
    yield gw.call(_task_count())
    up.reset()


def assert_everything_freed(gw: GatewayServer, up: FakeUpstream, tasks_before: int, upstream_connections_before: int) -> None:
    wait_for(lambda: up.cancelled == 1, what="the upstream call to be cancelled")
    wait_for(lambda: up.inflight == 0, what="the upstream to have nothing in flight")
    wait_for(lambda: inflight(gw) == 0, what="admiral_inflight_requests back to 0")
    assert "\nadmiral_inflight_requests 0.0\n" in httpx.get(f"{gw.url}/metrics").text  # as Prometheus sees it
    wait_for(lambda: gw.call(_task_count()) <= tasks_before, what=f"the gateway loop back to {tasks_before} tasks")
    wait_for(lambda: established_to(up.port) <= upstream_connections_before, what="no connection to the upstream left open")
    assert metric_sum(gw, "admiral_requests_total", status="499") >= 1
    # and the gateway is fine
    up.behaviour = "ok"
    assert httpx.post(f"{gw.base_url}/chat/completions", json=HELLO, headers=AUTH).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-before-first-chunk"])
def test_client_leaving_while_the_upstream_works_cancels_it(gw: GatewayServer, up: FakeUpstream, settled: int, stream: bool) -> None:
    connections = established_to(up.port)
    up.behaviour = "hang"
    sock = open_request(gw, {**HELLO, "stream": stream, "messages": [{"role": "user", "content": f"leave {stream}"}]})
    wait_for(lambda: up.inflight == 1, what="the upstream call to start")
    assert inflight(gw) == 1
    sock.close()
    assert_everything_freed(gw, up, settled, connections)


def test_client_leaving_mid_stream_cancels_the_upstream(gw: GatewayServer, up: FakeUpstream, settled: int) -> None:
    connections = established_to(up.port)
    up.behaviour = "dribble:0.5"
    body = {**HELLO, "stream": True, "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}
    with httpx.Client(timeout=10) as client, client.stream("POST", f"{gw.base_url}/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: a dropped line iterator may close the response early
        first = next(line for line in lines if line.startswith("data:"))
        assert '"role":"assistant"' in first
        assert up.inflight == 1
    # leaving the with-block closed the connection with most of the stream unsent
    assert_everything_freed(gw, up, settled, connections)


def test_client_timing_out_on_a_plain_request_cancels_the_upstream(gw: GatewayServer, up: FakeUpstream, settled: int) -> None:
    connections = established_to(up.port)
    up.behaviour = "slow:30"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.base_url}/chat/completions", json={**HELLO, "messages": [{"role": "user", "content": "impatient"}]}, headers=AUTH, timeout=httpx.Timeout(10, read=0.3))
    assert_everything_freed(gw, up, settled, connections)


def test_many_clients_leaving_at_once(gw: GatewayServer, up: FakeUpstream, settled: int) -> None:
    connections = established_to(up.port)
    up.behaviour = "hang"
    socks = [open_request(gw, {**HELLO, "stream": i % 2 == 0, "messages": [{"role": "user", "content": f"crowd {i}"}]}) for i in range(20)]
    wait_for(lambda: up.inflight == 20, what="20 upstream calls")
    for sock in socks:
        sock.close()
    wait_for(lambda: up.cancelled == 20 and up.inflight == 0, what="all 20 upstream calls cancelled")
    wait_for(lambda: inflight(gw) == 0, what="inflight back to 0")
    wait_for(lambda: gw.call(_task_count()) <= settled, what="no task left behind")
    wait_for(lambda: established_to(up.port) <= connections, what="no upstream connection left behind")


# -- the watcher itself ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_watcher_starts_only_for_requests_that_outlive_its_delay_and_then_cancels_on_disconnect() -> None:
    left = asyncio.Event()
    receives = 0

    async def receive() -> dict[str, str]:
        nonlocal receives
        receives += 1
        await left.wait()
        return {"type": "http.disconnect"}

    quick_task = asyncio.create_task(asyncio.sleep(10))
    quick = DisconnectWatcher(receive, quick_task)
    quick.stop()  # answered at once: never watched
    slow_task = asyncio.create_task(asyncio.sleep(10))
    slow = DisconnectWatcher(receive, slow_task)
    await asyncio.sleep(WATCH_AFTER_S * 2)
    assert receives == 1 and not slow.fired
    left.set()
    with pytest.raises(asyncio.CancelledError):
        await slow_task
    assert slow.fired and not quick_task.done()
    slow.stop()
    quick_task.cancel()
