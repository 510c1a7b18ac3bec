"""Secrets stay where they belong: planted keys are looked for in every sink after a run full of faults.

Provider keys (and provider header secrets) go to their own provider only: never into logs at any
level, /metrics, the database, error bodies, /admin output or check-config output. Gateway keys are
never stored whole: not the key, not its full SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.hostile import HostileUpstream, free_port_url, wait_for
from tests.support import gateway

PROVIDER_A = "sk-plantedA-provider-1111aaaa"
PROVIDER_B = "sk-plantedB-provider-2222bbbb"
HEADER_SECRET = "hdr-planted-3333cccc"
AGENT_KEY = "sk-planted-agent-4444dddd"
ADMIN_KEY = "admin-planted-5555eeee"
DB_PASSWORD = "dbpass-planted-6666ffff"
PROVIDER_SECRETS = (PROVIDER_A, PROVIDER_B, HEADER_SECRET)
GATEWAY_SECRETS = (AGENT_KEY, hashlib.sha256(AGENT_KEY.encode()).hexdigest(), ADMIN_KEY)
ALL = (*PROVIDER_SECRETS, *GATEWAY_SECRETS)


def config_text(a: FakeUpstream, b: FakeUpstream, db: str) -> str:
    return f"""
keys: [{{key: "{AGENT_KEY}", agent: planted}}]
admin_key: "{ADMIN_KEY}"
providers:
  a: {{kind: openai, base_url: "{a.base_url}", api_key: "{PROVIDER_A}", headers: {{X-Api-Key: "{HEADER_SECRET}"}}, timeout_s: 5, first_byte_timeout_s: 0.3}}
  b: {{kind: openai, base_url: "{b.base_url}", api_key: "{PROVIDER_B}", timeout_s: 5}}
models:
  both: [a/m1, b/m2]
  a-only: [a/m1]
retry: {{attempts: 1, backoff_s: 0}}
circuit_breaker: {{failure_threshold: 1000, rate_limit_cooldown_s: 0}}
database: {{url: "sqlite+aiosqlite:///{db}", log_content: true}}
"""


class Sink(logging.Handler):
    """Every record of every logger, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def debug_logs() -> Iterator[Sink]:
    """DEBUG for the whole process (the gateway runs in it), uvicorn's own loggers included."""
    sink = Sink()
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "aiohttp", "sqlalchemy", "asyncio", "admiral"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(sink)
        lg.propagate = False
    yield sink
    for lg, (level, propagate) in zip(loggers, saved, strict=True):
        lg.removeHandler(sink)
        lg.setLevel(level)
        lg.propagate = propagate


def leaks(text: str, secrets: tuple[str, ...] = ALL) -> list[str]:
    return [s for s in secrets if s in text]


def test_secrets_reach_no_sink_through_a_run_full_of_faults(tmp_path: Path, debug_logs: Sink, capfd: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "secrets.db"
    seen: list[str] = []

    def record(r: httpx.Response) -> httpx.Response:
        seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    with HostileUpstream() as a, FakeUpstream() as b, gateway(config_text(a, b, str(db))) as gw:
        http = httpx.Client(base_url=gw.url, timeout=20)
        auth = {"Authorization": f"Bearer {AGENT_KEY}"}

        def chat(model: str, stream: bool = False) -> httpx.Response:
            # a new question each time: the cache must not answer in place of the provider
            body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": f"tell me secret {len(seen)}"}]}
            return record(http.post("/v1/chat/completions", json=body, headers=auth))

        # a provider that repeats our credentials back in every way it can, and fails in every way
        for hostile in ("echo-json:500", "echo-json:400", "echo-json:401", "echo-json:403", "echo-json:429", "echo-json:404", "echo-json:422", "echo-text:500", "echo-text:401", "echo-text:400", "echo-stream", "odd-error:500", "odd-stream"):
            a.hostile = hostile
            for model in ("both", "a-only"):
                for stream in (False, True):
                    chat(model, stream)
        a.hostile = None
        for behaviour in ("500", "status:401", "429:1", "429-noretry", "hang", "badjson", "wrongshape", "cut", "nodone", "ok"):
            a.behaviour = behaviour
            for stream in (False, True):
                chat("a-only", stream)
                chat("both", stream)
        a.behaviour = "ok"
        # callers with wrong keys, the admin key where an agent key goes and the other way round
        for key in ("sk-wrong-key-xyz", ADMIN_KEY, AGENT_KEY[:-1]):
            record(http.post("/v1/chat/completions", json={"model": "both", "messages": [{"role": "user", "content": "x"}]}, headers={"Authorization": f"Bearer {key}"}))
        record(http.get("/admin/stats", headers=auth))
        record(http.get("/admin/backends", headers=auth))
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        stats = record(http.get("/admin/stats?hours=1", headers=admin))
        backends = record(http.get("/admin/backends", headers=admin))
        assert stats.status_code == 200 and backends.status_code == 200
        metrics = record(http.get("/metrics"))
        assert "admiral_requests_total" in metrics.text
        record(http.get("/health/ready"))
        record(http.get("/v1/models", headers=auth))
        wait_for(lambda: gw.services.log_writer is not None and gw.services.log_writer.pending == 0, what="the request log to be written")
        # what each provider received: its own key only, never the other's, never the agent's
        for request in a.requests:
            assert request.headers.get("authorization") == f"Bearer {PROVIDER_A}"
            assert not leaks(json.dumps([request.headers, request.body]), (PROVIDER_B, *GATEWAY_SECRETS))
        for request in b.requests:
            assert request.headers.get("authorization") == f"Bearer {PROVIDER_B}"
            assert not leaks(json.dumps([request.headers, request.body]), (PROVIDER_A, HEADER_SECRET, *GATEWAY_SECRETS))
        assert a.calls > 20 and b.calls > 10
        http.close()

    # error bodies and every other answer
    assert any("answered 500" in s for s in seen) and any("mid-stream" in s for s in seen)
    assert any("Bearer ***" in s for s in seen) and any("X-Api-Key=***" in s for s in seen)  # echoed, and masked
    assert not leaks("\n".join(seen)), [s for s in seen if leaks(s)][:3]
    # logs at DEBUG, and whatever reached stdout/stderr
    assert len(debug_logs.lines) > 20
    logged = "\n".join(debug_logs.lines)
    assert not leaks(logged), [line for line in debug_logs.lines if leaks(line)][:3]
    out, err = capfd.readouterr()
    assert not leaks(out + err)
    # the database, byte for byte (rows, the cache, the write-ahead log)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("secrets.db"))
    assert b"planted" in raw  # the agent name is there: the search does see the rows
    assert not leaks(raw.decode("latin-1"))


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    url = free_port_url()
    text = config_text(FakeUpstream(), FakeUpstream(), "x.db").replace('"sqlite+aiosqlite:///x.db"', f'"postgresql+asyncpg://admiral:{DB_PASSWORD}@{url}/admiral"')
    text += f'state: {{url: "redis://:{DB_PASSWORD}@{url}/0"}}\n'
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "app.cli", "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert not leaks(result.stdout + result.stderr, (*ALL, DB_PASSWORD))
    resolved = json.loads(result.stdout)
    assert resolved["providers"]["a"]["api_key"] == "***" and resolved["providers"]["a"]["headers"] == {"X-Api-Key": "***"}
    assert "***" in resolved["database"]["url"] and "***" in resolved["state"]["url"]


def test_database_password_stays_out_of_logs_and_readiness(tmp_path: Path, debug_logs: Sink, capfd: pytest.CaptureFixture[str]) -> None:
    # a PostgreSQL URL with a password, and nothing listening there: startup, readiness and the
    # retention task all fail to connect and say so, without the password (no chat request, so no
    # row waits for the database at shutdown; the lifecycle tests cover serving through an outage)
    url = free_port_url()
    with FakeUpstream() as b:
        text = config_text(b, b, "x.db").replace('"sqlite+aiosqlite:///x.db"', f'"postgresql+asyncpg://admiral:{DB_PASSWORD}@{url}/admiral"')
        with gateway(text) as gw:
            ready = httpx.get(f"{gw.url}/health/ready", timeout=20)
            assert ready.status_code == 503 and not ready.json()["checks"]["database"]["ok"]
            assert not leaks(ready.text, (DB_PASSWORD,))
            admin = httpx.get(f"{gw.url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)
            assert admin.status_code == 503 and admin.json()["error"]["code"] == "database_unavailable"
            assert not leaks(admin.text, (DB_PASSWORD,))
    logged = "\n".join(debug_logs.lines)
    assert "Connect call failed" in logged  # the failures were logged
    out, err = capfd.readouterr()
    assert not leaks(logged + out + err, (DB_PASSWORD, *ALL))
