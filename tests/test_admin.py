"""``/admin/stats`` and ``/admin/backends``: the admin key, and numbers computed from the request log."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.metrics import Metrics
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.request_log import RequestLogWriter
from tests.fake_upstream import FakeUpstream
from tests.serve import NewDatabase
from tests.support import GatewayServer, gateway
from tests.test_request_log import row

ADMIN_KEY = "admin-key-for-tests-0001"
AGENT_KEY = "sk-agent-stats-0001"
PROVIDER_KEY = "sk-provider-never-shown-42"


def config(up: FakeUpstream, database_url: str | None = None, admin: bool = True) -> str:
    text = f"""
keys: [{{key: {AGENT_KEY}, agent: a}}]
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, rpm: 600, timeout_s: 5}}
  demo: {{kind: demo}}
models: {{fast: [up/m], demo: [demo/echo]}}
retry: {{attempts: 1}}
"""
    if admin:
        text += f"admin_key: {ADMIN_KEY}\n"
    if database_url:
        text += f"database: {{url: '{database_url}'}}\n"
    return text


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def gw(upstream: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(upstream)) as server:
        yield server


def test_admin_key_rules(gw: GatewayServer) -> None:
    for path in ("/admin/stats", "/admin/backends"):
        r = httpx.get(f"{gw.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(f"{gw.url}{path}", headers={"Authorization": "Bearer not-the-admin-key"})
        assert r.status_code == 401
        r = httpx.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {AGENT_KEY}"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert httpx.get(f"{gw.url}{path}", headers=ADMIN).status_code == 200


def test_without_admin_key_configured_admin_is_refused(upstream: FakeUpstream) -> None:
    with gateway(config(upstream, admin=False)) as gw:
        r = httpx.get(f"{gw.url}/admin/stats", headers={"Authorization": f"Bearer {AGENT_KEY}"})
    assert r.status_code == 403
    assert "no admin_key is configured" in r.json()["error"]["message"]


@pytest.mark.parametrize("hours", ["0", "8761", "-3", "abc", "1.5", ""])
def test_hours_out_of_range_is_400(gw: GatewayServer, hours: str) -> None:
    r = httpx.get(f"{gw.url}/admin/stats", params={"hours": hours}, headers=ADMIN)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "hours"


def test_hours_bounds_are_accepted(gw: GatewayServer) -> None:
    for hours in ("1", "8760"):
        r = httpx.get(f"{gw.url}/admin/stats", params={"hours": hours}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["hours"] == int(hours)


def test_empty_log(gw: GatewayServer) -> None:
    stats = httpx.get(f"{gw.url}/admin/stats", headers=ADMIN).json()
    assert stats["total_requests"] == 0 and stats["cache_hit_rate"] == 0.0 and stats["dedupe_savings"] == 0
    assert stats["latency_ms"] == {"cache": {"p50": None, "avg": None, "count": 0}, "upstream": {"p50": None, "avg": None, "count": 0}}
    assert stats["backend_distribution"] == {} and stats["by_agent"] == {} and stats["errors"] == {}


def seed_rows(now: datetime) -> list[dict[str, Any]]:
    return [
        row(request_id="r1", agent="a", cache="miss", backend="p1", latency_ms=100, upstream_ms=90, prompt_tokens=10, completion_tokens=20),
        row(request_id="r2", agent="a", cache="hit", backend="p1", latency_ms=2, upstream_ms=None, prompt_tokens=10, completion_tokens=20),
        row(request_id="r3", agent="a", cache="hit", backend="p1", latency_ms=4, upstream_ms=None),
        row(request_id="r4", agent="a", cache="miss", dedupe="follower", backend="p1", latency_ms=80, prompt_tokens=10, completion_tokens=20),
        row(request_id="r5", agent="b", cache="miss", backend="p2", latency_ms=300, prompt_tokens=5, completion_tokens=5),
        row(request_id="r6", agent="b", cache="miss", backend="p2", status=502, outcome="error", error_type="upstream_error", latency_ms=50, prompt_tokens=0, completion_tokens=0),
        row(request_id="r7", agent="b", cache="bypass", backend=None, status=404, outcome="client_error", error_type="not_found_error"),
        row(request_id="r8", agent="b", cache="bypass", backend=None, status=429, outcome="client_error", error_type="rate_limit_error"),
        row(request_id="r9", agent="b", cache="miss", backend=None, status=499, outcome="client_error"),
        row(request_id="r10", agent="b", cache="miss", dedupe="leader", backend="p2", latency_ms=200, prompt_tokens=1, completion_tokens=1),
        row(request_id="old", agent="a", cache="miss", backend="p3", ts=now - timedelta(hours=30)),
    ]


async def _seed(url: str, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    writer = RequestLogWriter(engine, Metrics())
    for r in rows:
        writer.submit(r)
    await writer.close()
    await engine.dispose()


def check_stats(gw: GatewayServer) -> None:
    stats = httpx.get(f"{gw.url}/admin/stats?hours=24", headers=ADMIN).json()
    assert stats["total_requests"] == 10
    assert (stats["cache_hits"], stats["cache_misses"]) == (2, 6)
    assert stats["cache_hit_rate"] == pytest.approx(2 / 8, abs=1e-4)
    assert stats["dedupe_savings"] == 1
    assert stats["backend_distribution"] == {"p1": 1, "p2": 3}  # calls made upstream: no hits, no followers
    assert stats["latency_ms"]["cache"] == {"p50": 3.0, "avg": 3.0, "count": 2}
    assert stats["latency_ms"]["upstream"] == {"p50": 200.0, "avg": 200.0, "count": 3}
    assert stats["by_agent"] == {
        "a": {"requests": 4, "cache_hits": 2, "dedupe_savings": 1, "errors": 0, "prompt_tokens": 10, "completion_tokens": 20},
        "b": {"requests": 6, "cache_hits": 0, "dedupe_savings": 0, "errors": 4, "prompt_tokens": 6, "completion_tokens": 6},
    }
    assert stats["errors"] == {"upstream_error": 1, "not_found_error": 1, "rate_limit_error": 1, "499": 1}
    wider = httpx.get(f"{gw.url}/admin/stats?hours=48", headers=ADMIN).json()
    assert wider["total_requests"] == 11 and wider["backend_distribution"]["p3"] == 1


def test_stats_numbers_sqlite(upstream: FakeUpstream, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/stats.db"
    upgrade_to_head(url)
    asyncio.run(_seed(url, seed_rows(datetime.now(UTC))))
    with gateway(config(upstream, url)) as gw:
        check_stats(gw)


@pytest.mark.postgres
def test_stats_numbers_postgres(upstream: FakeUpstream, new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    upgrade_to_head(url)
    asyncio.run(_seed(url, seed_rows(datetime.now(UTC))))
    with gateway(config(upstream, url)) as gw:
        check_stats(gw)


def test_stats_follow_live_traffic(gw: GatewayServer, upstream: FakeUpstream) -> None:
    headers = {"Authorization": f"Bearer {AGENT_KEY}"}
    for i in range(2):
        assert httpx.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "fast", "messages": [{"role": "user", "content": f"hi {i}"}]}).status_code == 200
    assert httpx.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    stats = poll_stats(gw, lambda s: s["total_requests"] >= 3)
    assert stats["by_agent"]["a"]["requests"] == 3
    assert stats["backend_distribution"] == {"demo": 1, "up": 2}
    assert stats["latency_ms"]["upstream"]["count"] == 3


def poll_stats(gw: GatewayServer, done: Any, timeout: float = 15) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = httpx.get(f"{gw.url}/admin/stats", headers=ADMIN).json()
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_backends_report(gw: GatewayServer, upstream: FakeUpstream) -> None:
    headers = {"Authorization": f"Bearer {AGENT_KEY}"}

    def ask(text: str) -> int:
        return httpx.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "fast", "messages": [{"role": "user", "content": text}]}).status_code

    assert ask("fine") == 200
    upstream.behaviour = "500"
    assert ask("broken") == 502
    poll_stats(gw, lambda s: s["total_requests"] >= 2)
    r = httpx.get(f"{gw.url}/admin/backends", headers=ADMIN)
    assert r.status_code == 200
    assert PROVIDER_KEY not in r.text and upstream.base_url not in r.text
    report = r.json()["backends"]
    assert set(report) == {"up", "demo"}
    up = report["up"]
    assert up["ready"] is True and up["circuit"] in ("closed", "half_open", "open")
    assert up["budget"]["rpm"] == 600
    recent = up["recent"]
    assert (recent["requests"], recent["errors"]) == (2, 1) and recent["upstream_ms_avg"] is not None
    assert recent["last_error"]["status"] == 502 and recent["last_error"]["error_type"] == "upstream_error"
    assert report["demo"]["recent"]["requests"] == 0 and report["demo"]["recent"]["last_error"] is None
