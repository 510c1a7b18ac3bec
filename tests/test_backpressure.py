"""Per-provider backpressure: a full provider is skipped, a queued call gets the next free slot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.resilience_support import AGENT_KEY, HI, post, two_upstreams, wait_until
from tests.support import GatewayServer, gateway


@contextmanager
def streaming(gw: GatewayServer) -> Iterator[Iterator[str]]:
    """A streamed chat on ``fast``, held open after its first line: its other lines."""
    body = {"model": "fast", "stream": True, "messages": HI}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body, timeout=10) as r:
        lines = r.iter_lines()
        next(lines)
        yield lines


def test_a_full_provider_is_skipped_and_a_lone_one_answers_503(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "dribble:0.3"
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", max_concurrency: 1, queue_timeout_s: 0", models_extra="  lone: [up/m1]")
    with gateway(config, clock=ManualClock()) as gw:
        slots = gw.services.resilience.slots
        with streaming(gw) as lines:
            load = slots.load("up")
            assert load is not None and load.in_flight == 1
            assert post(gw).headers["x-admiral-backend"] == "up2"
            busy = post(gw, model="lone")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "concurrency limit" in busy.json()["error"]["message"]
            assert [line for line in lines if line][-1] == "data: [DONE]"
        wait_until(lambda: (load := slots.load("up")) is not None and load.in_flight == 0)
        upstream.behaviour = "ok"
        assert post(gw, model="lone").status_code == 200


def test_a_call_waits_in_the_queue_for_a_free_slot(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "dribble:0.2"
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", max_concurrency: 1, queue_timeout_s: 30", fast="[up/m1]")
    with gateway(config, clock=ManualClock()) as gw:
        slots = gw.services.resilience.slots
        results: list[httpx.Response] = []
        with streaming(gw) as lines:
            waiter = threading.Thread(target=lambda: results.append(post(gw)))
            waiter.start()
            wait_until(lambda: (load := slots.load("up")) is not None and load.waiting == 1)
            assert [line for line in lines if line][-1] == "data: [DONE]"
        waiter.join(10)
        assert results[0].status_code == 200
        assert upstream.peak_inflight == 1
