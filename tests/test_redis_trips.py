"""Redis round trips per request in the shared mode: at most 3 for a cache miss (streamed or not), 1 for a hit.

Counted as ``bench/redis_trips.py`` counts them (the sends of the gateway to Redis, through a
counting proxy), on the benchmark's pipeline: an agent with rpm and tpm limits, the exact cache
and single flight, one replica on the real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import app.state.redis
from bench.redis_trips import TripCounter, measure
from tests.conftest import REDIS_URL
from tests.fake_upstream import FakeUpstream
from tests.support import gateway

pytestmark = pytest.mark.redis

KEY = "sk-agent-trips-0001"


def _flight_streams(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=prefix + "flight:*"))
    finally:
        client.close()


@pytest.fixture
def counter() -> Iterator[TripCounter]:
    counter = TripCounter(REDIS_URL)
    yield counter
    counter.close()


def config(up: FakeUpstream, counter: TripCounter, prefix: str, tmp_path: Path) -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: tester, rpm: 1000000, tpm: 1000000000}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-trips, timeout_s: 5}}
models:
  bench: [up/m1]
  bench-stream: [up/m1]
cache: {{enabled: true}}
dedupe: {{enabled: true}}
database: {{url: "sqlite+aiosqlite:///{tmp_path}/trips.db"}}
state: {{url: "{counter.url}", key_prefix: "{prefix}"}}
"""


def test_a_miss_takes_at_most_3_round_trips_a_hit_1_and_a_stream_3(
    upstream: FakeUpstream, counter: TripCounter, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a settlement then always goes with the next admission, however slow this machine is today
    monkeypatch.setattr(app.state.redis, "ADJUST_DELAY_S", 3600.0)
    requests = 40
    with gateway(config(upstream, counter, prefix, tmp_path)) as gw:
        counts = measure(gw.url, KEY, counter, REDIS_URL, requests=requests, streams=requests)
    # beside the requests, the notices' connection may send a health check (PING) every 2 s
    allowance = 2
    assert counts["miss"].sends <= 3 * requests + allowance, counts["miss"].describe()
    assert counts["hit"].sends <= requests + allowance, counts["hit"].describe()
    # a stream nobody follows is never written to Redis: no XADD per chunk
    assert counts["stream"].sends <= 3 * requests + allowance, counts["stream"].describe()
    assert _flight_streams(prefix) == []
    assert upstream.calls == 5 + requests + 1 + requests  # warm-up, misses, the hits' first, streams: every miss called, no hit did
