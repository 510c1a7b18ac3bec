"""Limits providers announce in their headers: read from every answer, a provider out of room
skipped before it answers 429, shown in /admin/backends; and ``admiral-optimizer providers``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from app.providers.announced import announced_limits, parse_reset
from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.resilience_support import PROVIDER_KEY, post, two_upstreams
from tests.serve import cli_command
from tests.support import free_port, gateway



def test_the_header_forms() -> None:
    found = announced_limits(
        {
            "x-ratelimit-limit-requests": "30",
            "x-ratelimit-remaining-requests": "29",
            "x-ratelimit-reset-requests": "2m59.56s",
            "X-RateLimit-Remaining-Tokens-Day": "990000",
            "x-ratelimit-reset-tokens-day": "33011.5",
            "content-type": "application/json",
        },
        1000.0,
    )
    by = {(a.unit, a.window): a for a in found}
    assert by[("requests", "")].limit == 30 and by[("requests", "")].remaining == 29
    assert by[("requests", "")].resets_at == pytest.approx(1179.56)
    assert by[("tokens", "day")].remaining == 990000 and by[("tokens", "day")].resets_at == pytest.approx(34011.5)
    assert parse_reset("20ms", 0) == pytest.approx(0.02)
    assert parse_reset("1h2m3s", 0) == 3723
    assert parse_reset("1767225600", 5) == 1767225600  # a unix time
    assert parse_reset("soon", 0) is None
    assert announced_limits({"x-request-id": "1"}, 0) == []


def test_a_provider_that_announced_no_room_is_skipped_until_its_reset(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock()
    config = two_upstreams(upstream, upstream2, tmp_path) + "admin_key: admin-key-announced-0001\n"
    with gateway(config, clock=clock) as gw:
        upstream.response_headers = {"x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "30s"}
        assert post(gw).headers["x-admiral-backend"] == "up"  # says: 1 left
        assert post(gw).headers["x-admiral-backend"] == "up"  # takes it (the answer says 1 left again)
        upstream.response_headers["x-ratelimit-remaining-requests"] = "0"
        assert post(gw).headers["x-admiral-backend"] == "up"  # the answer says none left
        assert post(gw).headers["x-admiral-backend"] == "up2"  # skipped before it could answer 429
        assert upstream.calls == 3
        status = gw.call(gw.services.resilience.provider_status("up"))
        assert status["announced"] == [{"unit": "requests", "window": None, "limit": 30, "remaining": 0, "resets_in_s": 30.0}]
        clock.advance(30)
        assert post(gw).headers["x-admiral-backend"] == "up"


def test_tokens_announced_count_down_with_each_admission(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=clock) as gw:
        upstream.response_headers = {"x-ratelimit-remaining-tokens-minute": "1000", "x-ratelimit-reset-tokens-minute": "60"}
        assert post(gw).headers["x-admiral-backend"] == "up"
        # each request estimates ~1 + its max_tokens: 600 fits in 1000, the next 600 no longer does
        assert post(gw, max_tokens=600).headers["x-admiral-backend"] == "up"
        upstream.response_headers = {"x-ratelimit-remaining-tokens-minute": "300", "x-ratelimit-reset-tokens-minute": "60"}
        assert post(gw, max_tokens=100).headers["x-admiral-backend"] == "up"
        assert post(gw, max_tokens=600).headers["x-admiral-backend"] == "up2"


def _providers_config(tmp_path: Path, up: FakeUpstream, dead_port: int) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(
        f"""
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}}}
  gone: {{kind: openai, base_url: "http://127.0.0.1:{dead_port}/v1", api_key: {PROVIDER_KEY}}}
  demo: {{kind: demo}}
models:
  fast: [up/fake-model, up/not-offered, gone/x]
  local: [demo/echo]
"""
    )
    return path


def test_the_providers_command_checks_keys_models_and_limits(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.response_headers = {"x-ratelimit-limit-requests-day": "14400", "x-ratelimit-remaining-requests-day": "14399", "x-ratelimit-reset-requests-day": "3600"}
    config = _providers_config(tmp_path, upstream, free_port())
    done = subprocess.run([*cli_command(), "providers", "--config", str(config), "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr  # one provider unreachable, one model missing
    assert PROVIDER_KEY not in done.stdout + done.stderr
    reports = {r["provider"]: r for r in json.loads(done.stdout)}
    up = reports["up"]
    assert up["key"] == "ok" and up["offered"] == ["fake-model"] and up["lacking"] == ["not-offered"]
    assert up["announced"][0]["unit"] == "requests" and up["announced"][0]["window"] == "day" and up["announced"][0]["remaining"] == 14399
    assert reports["gone"]["key"] == "unreachable"
    assert reports["demo"]["key"] == "local"
    assert upstream.calls == 0  # the limits came with /models: no probe needed
    text = subprocess.run([*cli_command(), "providers", "--config", str(config)], capture_output=True, text=True, timeout=60, check=False).stdout
    assert "LACKS: not-offered" in text and "announces requests per day: limit 14400, remaining 14399" in text


def test_the_probe_reads_limits_from_a_one_token_call(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = _providers_config(tmp_path, upstream, free_port())
    upstream.response_headers = {}
    subprocess.run([*cli_command(), "providers", "--config", str(config), "--json", "--no-probe"], capture_output=True, text=True, timeout=60, check=False)
    assert upstream.calls == 0
    upstream.response_headers = {}
    done = subprocess.run([*cli_command(), "providers", "--config", str(config), "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert upstream.calls == 1
    assert upstream.requests[-1].body["max_tokens"] == 1
    assert json.loads(done.stdout)[0]["announced"] == []
