"""Load and lifecycle: a crowd of requests, SIGTERM on the real command, stores that go away."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import GC_THRESHOLDS
from app.storage.migrate import upgrade_to_head
from tests.fake_upstream import FakeUpstream
from tests.hostile import AUTH, HostileUpstream, config, inflight, wait_for
from tests.serve import NewDatabase, ServeProcess
from tests.support import GatewayServer, gateway, make_settings
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def _body(i: int, stream: bool = False) -> dict[str, Any]:
    # each prompt its own: neither the cache nor dedupe may spare the upstream a call
    return {"model": "fast", "stream": stream, "messages": [{"role": "user", "content": f"request number {i}"}]}


# -- load ------------------------------------------------------------------------------------


def test_300_concurrent_requests_against_a_50ms_upstream_all_succeed(up: FakeUpstream) -> None:
    up.latency = 0.05

    async def crowd(gw: GatewayServer) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=gw.base_url, headers=AUTH, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.post("/chat/completions", json=_body(i, stream=i % 3 == 0)) for i in range(300)))

    with gateway(config(up)) as gw:
        responses = asyncio.run(crowd(gw))
        assert [r.status_code for r in responses] == [200] * 300, {r.status_code: r.text[:200] for r in responses if r.status_code != 200}
        for i, r in enumerate(responses):
            if i % 3 == 0:
                assert r.text.rstrip().endswith("data: [DONE]")
                chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == f"echo: request number {i}"
            else:
                assert r.json()["choices"][0]["message"]["content"] == f"echo: request number {i}"
        assert up.calls == 300
        assert up.peak_inflight > 1  # they really overlapped
        wait_for(lambda: inflight(gw) == 0, what="inflight back to 0")


def test_gc_thresholds_are_the_apps_while_any_runs_and_restored_after_the_last(up: FakeUpstream) -> None:
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    first = GatewayServer(make_settings(config(up))).start()
    second = GatewayServer(make_settings(config(up))).start()  # two apps in one process, as in tests
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
        first.stop()  # not in the order they started
        assert gc.get_threshold() == GC_THRESHOLDS  # the second still runs
        assert httpx.post(f"{second.base_url}/chat/completions", headers=AUTH, json=_body(0)).status_code == 200
    finally:
        first.stop()
        second.stop()
    assert gc.get_threshold() == before


def test_backpressure_beyond_max_concurrency_is_503_with_retry_after() -> None:
    with HostileUpstream() as up, gateway(config(up, provider=", max_concurrency: 2, queue_timeout_s: 0.05")) as gw:
        up.hostile = "gated"  # the first two hold both slots until the test lets them go
        with httpx.Client(base_url=gw.base_url, headers=AUTH, timeout=30) as client:
            holders = [threading.Thread(target=client.post, args=("/chat/completions",), kwargs={"json": _body(i)}) for i in range(2)]
            for t in holders:
                t.start()
            wait_for(lambda: up.inflight == 2, what="both slots taken")
            busy = [client.post("/chat/completions", json=_body(10 + i)) for i in range(3)]
            up.gate.set()
            for t in holders:
                t.join(30)
            assert client.post("/chat/completions", json=_body(20)).status_code == 200  # slots free again
        for r in busy:
            err = r.json()["error"]
            assert r.status_code == 503 and err["type"] == "service_unavailable", r.text
            assert "concurrency limit" in err["message"] and int(r.headers["retry-after"]) >= 1
        assert up.peak_inflight == 2 and up.calls == 3


# -- SIGTERM on the real command -------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    up = HostileUpstream().start()
    db = tmp_path / "serve.db"
    path = tmp_path / "config.yaml"
    path.write_text(config(up, extra=f'server: {{shutdown_grace_s: 20}}\ndatabase: {{url: "sqlite+aiosqlite:///{db}"}}'))
    server = ServeProcess(path)
    try:
        server.wait_ready()
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_body(0), headers=AUTH).status_code == 200
        up.hostile = "gated"  # both requests stay in flight until the test opens the gate
        results: dict[str, httpx.Response] = {}

        def slow_request(name: str, stream: bool) -> None:
            results[name] = httpx.post(f"{server.url}/v1/chat/completions", json=_body(100 + len(name), stream=stream), headers={**AUTH, "x-request-id": name}, timeout=30)

        threads = [threading.Thread(target=slow_request, args=(name, name == "in-flight-stream")) for name in ("in-flight-plain", "in-flight-stream")]
        for t in threads:
            t.start()
        wait_for(lambda: up.inflight == 2, what="both requests to reach the upstream")
        server.proc.send_signal(signal.SIGTERM)
        # no new connections once the signal is in, while the two in flight carry on
        wait_for(lambda: _refused(server.port), what="the listening socket to close")
        assert server.proc.poll() is None and up.inflight == 2
        up.gate.set()
        for t in threads:
            t.join(30)
        assert results["in-flight-plain"].status_code == 200, results["in-flight-plain"].text
        assert results["in-flight-plain"].json()["choices"][0]["message"]["content"].startswith("echo: request number")
        assert results["in-flight-stream"].status_code == 200 and results["in-flight-stream"].text.rstrip().endswith("data: [DONE]")
        code = server.proc.wait(30)
        assert code == 0, server.output()
    finally:
        server.stop()
        up.stop()
    # the request log was flushed on the way out: both in-flight requests have their rows
    with sqlite3.connect(db) as conn:
        ids = {row[0] for row in conn.execute("SELECT request_id FROM request_log")}
    assert {"in-flight-plain", "in-flight-stream"} <= ids


# -- stores that go away at run time ---------------------------------------------------------


@pytest.mark.postgres
def test_database_outage_requests_served_readiness_reports_rows_kept(up: FakeUpstream, new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    upgrade_to_head(url)
    proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/", 1)[0]))
    proxied = url.replace(url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{proxy.port}")
    with gateway(config(up, extra=f'database: {{url: "{proxied}"}}')) as gw:
        gw.call(proxy.start())
        writer = gw.services.log_writer
        assert writer is not None

        def ready() -> int:
            return httpx.get(f"{gw.url}/health/ready", timeout=20).status_code

        wait_for(lambda: ready() == 200, what="ready with the database")
        assert httpx.post(f"{gw.base_url}/chat/completions", json=_body(1), headers=AUTH).status_code == 200
        wait_for(lambda: writer.pending == 0 and writer.written >= 1, what="the first row written")

        gw.call(proxy.stop())
        for i in range(2, 7):
            r = httpx.post(f"{gw.base_url}/chat/completions", json=_body(i), headers=AUTH, timeout=20)
            assert r.status_code == 200, r.text
        wait_for(lambda: ready() == 503, what="readiness to report the database")
        checks = httpx.get(f"{gw.url}/health/ready").json()["checks"]
        assert not checks["database"]["ok"] and checks["backends"]["ok"]
        wait_for(lambda: writer.failures > 0, what="the writer to meet the outage")
        assert writer.pending == 5  # kept, bounded by database.queue_size, retried

        gw.call(proxy.start())
        wait_for(lambda: ready() == 200, what="ready again")
        wait_for(lambda: writer.pending == 0, timeout=40, what="the kept rows to be written")
        assert writer.written == 6
        gw.call(proxy.stop())


@pytest.mark.redis
def test_redis_outage_requests_served_readiness_reports(up: FakeUpstream) -> None:
    proxy = TcpProxy(6379)
    with gateway(config(up, extra=f'state: {{url: "redis://127.0.0.1:{proxy.port}/0", key_prefix: "admiral-lifecycle-test:"}}')) as gw:
        gw.call(proxy.start())

        def ready() -> str:
            return str(httpx.get(f"{gw.url}/health/ready", timeout=20).json()["status"])

        wait_for(lambda: ready() == "ready", what="ready with Redis")
        assert httpx.post(f"{gw.base_url}/chat/completions", json=_body(1), headers=AUTH).status_code == 200
        gw.call(proxy.stop())
        for i in range(2, 5):
            r = httpx.post(f"{gw.base_url}/chat/completions", json=_body(i), headers=AUTH, timeout=20)
            assert r.status_code == 200, r.text
        # still served, so still ready (200): the outage is said in the body and the gauge
        wait_for(lambda: ready() == "degraded", what="readiness to report the state store")
        degraded = httpx.get(f"{gw.url}/health/ready")
        assert degraded.status_code == 200 and degraded.json()["checks"]["state"] == {"ok": False, "degraded": True}
        assert gw.services.metrics.registry.get_sample_value("admiral_state_degraded") == 1
        gw.call(proxy.start())
        wait_for(lambda: ready() == "ready", what="ready again")
        assert httpx.post(f"{gw.base_url}/chat/completions", json=_body(9), headers=AUTH).status_code == 200
        gw.call(proxy.stop())
