"""Helpers shared by the resilience, rate limit and routing tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer

AGENT_KEY = "sk-agent-tester-0001"
OTHER_KEY = "sk-agent-other-0002"
PROVIDER_KEY = "sk-provider-secret-7777"
HI = [{"role": "user", "content": "hi"}]


def two_upstreams(up: FakeUpstream, up2: FakeUpstream, tmp_path: Path, *, up_extra: str = "", up2_extra: str = "", key_extra: str = "", fast: str = "[up/m1, up2/m2]", breaker: str = "{}", retry: str = "{attempts: 1}", models_extra: str = "") -> str:
    """Providers ``up`` and ``up2`` (two fake upstreams) behind model ``fast``; no cache, no dedupe: every call counts."""
    return f"""
keys:
  - {{key: {AGENT_KEY}, agent: tester{key_extra}}}
  - {{key: {OTHER_KEY}, agent: other}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 5{up_extra}}}
  up2: {{kind: openai, base_url: "{up2.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 5{up2_extra}}}
models:
  fast: {fast}
{models_extra}
circuit_breaker: {breaker}
retry: {retry}
cache: {{enabled: false}}
dedupe: {{enabled: false}}
database: {{url: "sqlite+aiosqlite:///{tmp_path}/admiral.db"}}
"""


def client(gw: GatewayServer, key: str = AGENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def post(gw: GatewayServer, body: dict[str, Any] | None = None, key: str = AGENT_KEY, **fields: Any) -> httpx.Response:
    payload = body or {"model": "fast", "messages": HI, **fields}
    return httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=payload, timeout=30)


def sample(gw: GatewayServer, name: str, **labels: str) -> float | None:
    return gw.services.metrics.registry.get_sample_value(name, labels)


class EventLog:
    """An event sink that keeps every event, to assert on what the gateway announced."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def listen(gw: GatewayServer) -> EventLog:
    log = EventLog()
    gw.services.events.sinks.append(log)
    return log


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll for a condition the gateway reaches on its own thread (not a wait for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
