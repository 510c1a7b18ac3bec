"""Savings: calls and tokens the cache and dedupe avoided, money spent and saved at the
deployments' prices and against a reference price — in /admin/stats, metrics and the request log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import ConfigError, build_settings
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

AGENT_KEY = "sk-agent-savings-0001"
ADMIN_KEY = "admin-key-savings-0001"


def _config(up: FakeUpstream, tmp_path: Path) -> str:
    return f"""
admin_key: {ADMIN_KEY}
keys: [{{key: {AGENT_KEY}, agent: saver}}]
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-savings-9999}}
models:
  paid:
    deployments: [{{deployment: up/m1, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
    reference_price: {{input_per_mtok: 3000, output_per_mtok: 15000}}
  free: [up/m2]
database: {{url: "sqlite+aiosqlite:///{tmp_path}/admiral.db"}}
"""


def _ask(gw: GatewayServer, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body, timeout=30)


def _stats(gw: GatewayServer, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:  # the request log is written in batches
        stats = httpx.get(f"{gw.url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        if stats["total_requests"] >= requests or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _metric(gw: GatewayServer, name: str, **labels: str) -> float | None:
    return gw.services.metrics.registry.get_sample_value(name, labels)


def test_spent_and_saved_at_price_and_reference(upstream: FakeUpstream, tmp_path: Path) -> None:
    with gateway(_config(upstream, tmp_path)) as gw:
        first = _ask(gw, "paid", "one two three")
        usage = first.json()["usage"]
        assert _ask(gw, "paid", "one two three").headers["x-admiral-cache"] == "hit"
        assert _ask(gw, "free", "four five").status_code == 200
        assert upstream.calls == 2
        p, c = usage["prompt_tokens"], usage["completion_tokens"]
        price = (p * 1000 + c * 2000) / 1e6
        reference = (p * 3000 + c * 15000) / 1e6
        savings = _stats(gw, 3)["savings"]
        total = savings["total"]
        assert total["calls_avoided"] == {"cache": 1, "semantic": 0, "dedupe": 0}
        assert total["tokens_avoided"] == p + c
        assert total["spent_usd"] == pytest.approx(price)
        assert total["saved_usd"] == pytest.approx(price)  # the hit would have cost what the miss did
        assert total["reference_usd"] == pytest.approx(2 * reference)  # the free model has no reference price
        assert total["saved_vs_reference_usd"] == pytest.approx(2 * reference - price)
        assert savings["by_agent"]["saver"] == total
        assert _metric(gw, "admiral_spend_usd_total", agent="saver") == pytest.approx(price)
        assert _metric(gw, "admiral_saved_usd_total", agent="saver", basis="price") == pytest.approx(price)
        assert _metric(gw, "admiral_saved_usd_total", agent="saver", basis="reference") == pytest.approx(2 * reference - price)
        assert _metric(gw, "admiral_calls_avoided_total", agent="saver", via="cache") == 1
        assert _metric(gw, "admiral_tokens_avoided_total", agent="saver", via="cache") == p + c


def test_free_tiers_cost_nothing_but_avoided_calls_still_count(upstream: FakeUpstream, tmp_path: Path) -> None:
    with gateway(_config(upstream, tmp_path)) as gw:
        _ask(gw, "free", "six seven")
        _ask(gw, "free", "six seven")
        total = _stats(gw, 2)["savings"]["total"]
        assert total["calls_avoided"]["cache"] == 1 and total["tokens_avoided"] > 0
        assert total["spent_usd"] == 0 and total["saved_usd"] == 0 and total["reference_usd"] == 0


def test_a_price_must_be_a_price() -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings({"providers": {"d": {"kind": "demo"}}, "models": {"m": {"deployments": ["d/x"], "price": {"input_per_mtok": -1}}}}, "g.yaml", {})
    assert "models.m.price.input_per_mtok" in str(caught.value)
