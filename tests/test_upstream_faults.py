"""Faults from upstream: each ends in a clear answer for the client, and is logged and counted.

A clear answer is another backend's result when the route has one (``fast``: ``up`` then
``up2``), else an OpenAI error (``solo``: ``up`` only); once a stream has started, it is one
error event and ``data: [DONE]``. One round (``retry.attempts: 1``), so no test waits for backoff.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, AUTH, PROVIDER_KEY, assert_openai_error, metric_sum, wait_for
from tests.support import GatewayServer, gateway


@pytest.fixture(scope="module")
def up2() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def dead_url() -> str:
    gone = FakeUpstream().start()
    url = gone.base_url
    gone.stop()  # nothing listens there any more: connection refused
    return url


def faults_config(up: FakeUpstream, up2: FakeUpstream, dead_url: str, db: str) -> str:
    provider = "timeout_s: 5, first_byte_timeout_s: 0.5"
    return f"""
keys: [{{key: {AGENT_KEY}, agent: faults}}]
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, {provider}}}
  up2: {{kind: openai, base_url: "{up2.base_url}", api_key: {PROVIDER_KEY}, {provider}}}
  dead: {{kind: openai, base_url: "{dead_url}", api_key: {PROVIDER_KEY}, {provider}}}
models:
  fast: [up/fake-model, up2/fake-model]
  solo: [up/fake-model]
  gone: [dead/fake-model]
  gone-then-up2: [dead/fake-model, up2/fake-model]
retry: {{attempts: 1, backoff_s: 0}}
circuit_breaker: {{failure_threshold: 1000, rate_limit_cooldown_s: 0}}
cache: {{enabled: false}}
database: {{url: "sqlite+aiosqlite:///{db}"}}
"""


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("faults") / "faults.db")


@pytest.fixture(scope="module")
def shared_gw(up: FakeUpstream, up2: FakeUpstream, dead_url: str, db: str) -> Iterator[GatewayServer]:
    # breakers never open and a 429 without Retry-After pauses nobody, so faults do not carry over
    with gateway(faults_config(up, up2, dead_url, db)) as server:
        yield server


@pytest.fixture
def gw(shared_gw: GatewayServer, up: FakeUpstream, up2: FakeUpstream, caplog: pytest.LogCaptureFixture) -> GatewayServer:
    up.reset()
    up2.reset()
    caplog.set_level(logging.WARNING)
    wait_for(lambda: up.inflight == 0 and up2.inflight == 0, what="upstreams at rest")
    return shared_gw


@pytest.fixture
def fresh_gw(up: FakeUpstream, up2: FakeUpstream, dead_url: str, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway of its own, for faults that leave state behind (a provider's Retry-After pause)."""
    up.reset()
    up2.reset()
    with gateway(faults_config(up, up2, dead_url, str(tmp_path / "fresh.db"))) as server:
        yield server


class Counted:
    """Reads a metric now and later: the shared gateway's counters only ever grow."""

    def __init__(self, gw: GatewayServer, name: str, **labels: str) -> None:
        self._gw, self._name, self._labels = gw, name, labels
        self._before = metric_sum(gw, name, **labels)

    @property
    def delta(self) -> float:
        return metric_sum(self._gw, self._name, **self._labels) - self._before


@pytest.fixture
def client(gw: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.base_url, headers=AUTH, timeout=20) as c:
        yield c


def ask(client: httpx.Client, model: str, *, stream: bool = False, text: str = "hello there", request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    return client.post("/chat/completions", json={"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}, headers=headers)


def log_row(db: str, request_id: str) -> sqlite3.Row:
    """The request's row in the request log, once written (the writer batches off the request path)."""
    deadline = time.monotonic() + 15
    while True:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM request_log WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return row  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"no request log row for {request_id}")
        time.sleep(0.05)


def events(r: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in r.text.splitlines() if line.startswith("data: ")]


def warned(caplog: pytest.LogCaptureFixture, *fragments: str) -> bool:
    return any(all(f in r.getMessage() for f in fragments) for r in caplog.records if r.levelno >= logging.WARNING)


# -- another backend answers -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "status:503", "429:0.2", "429-noretry", "hang", "badjson", "wrongshape", "cut"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_failing_first_backend_is_followed_by_the_next(request: pytest.FixtureRequest, up: FakeUpstream, up2: FakeUpstream, db: str, fault: str, stream: bool) -> None:
    if stream and fault == "cut":
        pytest.skip("a stream cut after its first chunk cannot move to another backend: see the mid-stream tests")
    # a 429 pauses the provider for a while: on a gateway of its own, so the next test finds it usable
    gw: GatewayServer = request.getfixturevalue("fresh_gw" if fault.startswith("429") else "gw")
    up.behaviour = fault
    failovers = Counted(gw, "admiral_failovers_total", from_backend="up")
    rid = f"failover-{fault}-{stream}".replace(":", "_")
    with httpx.Client(base_url=gw.base_url, headers=AUTH, timeout=20) as client:
        r = ask(client, "fast", stream=stream, request_id=rid)
    assert r.status_code == 200, r.text
    assert r.headers["x-admiral-backend"] == "up2"
    if stream:
        got = events(r)
        assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1] if c["choices"]) == "echo: hello there"
    else:
        assert r.json()["choices"][0]["message"]["content"] == "echo: hello there"
    assert (up.calls, up2.calls) == (1, 1)
    assert failovers.delta == 1
    if fault in ("500", "hang"):  # the request log too (its writer is tested on its own)
        row = log_row(db, rid)
        assert (row["status"], row["backend"], row["attempts"]) == (200, "up2", 2)


def test_unreachable_backend_is_followed_by_the_next(client: httpx.Client, up2: FakeUpstream) -> None:
    r = ask(client, "gone-then-up2")
    assert r.status_code == 200 and r.headers["x-admiral-backend"] == "up2"


# -- no backend left: an OpenAI error --------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error_type", "says"),
    [
        ("500", 502, "upstream_error", "up answered 500"),
        ("status:503", 502, "upstream_error", "up answered 503"),
        ("hang", 504, "timeout", "up timed out"),
        ("badjson", 502, "upstream_error", "not JSON"),
        ("wrongshape", 502, "upstream_error", "not a chat completion"),
        ("cut", 502, "upstream_error", "up"),
    ],
)
def test_sole_backend_failing_is_an_openai_error(gw: GatewayServer, client: httpx.Client, up: FakeUpstream, db: str, caplog: pytest.LogCaptureFixture, fault: str, status: int, error_type: str, says: str) -> None:
    up.behaviour = fault
    answered = Counted(gw, "admiral_requests_total", status=str(status))
    rid = f"solo-{fault}".replace(":", "_")
    r = ask(client, "solo", request_id=rid)
    err = assert_openai_error(r, status, contains=says)
    assert err["type"] == error_type
    assert "solo" in err["message"]  # names the route and the backend that failed
    assert answered.delta == 1
    assert warned(caplog, rid, str(status), says)
    if fault in ("500", "hang"):
        row = log_row(db, rid)
        assert (row["status"], row["outcome"], row["error_type"]) == (status, "error", error_type)


def test_sole_backend_failing_a_stream_before_its_first_chunk_is_an_openai_error(client: httpx.Client, up: FakeUpstream) -> None:
    for fault, status in (("500", 502), ("hang", 504), ("badjson", 502)):
        up.behaviour = fault
        r = ask(client, "solo", stream=True)
        assert_openai_error(r, status)  # not a 200 stream: nothing was sent yet


def test_unreachable_sole_backend_is_502(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    r = ask(client, "gone")
    err = assert_openai_error(r, 502, contains="unreachable")
    assert "dead" in err["message"]


@pytest.mark.parametrize("fault", ["429:3", "429-noretry"])
def test_sole_backend_rate_limited_is_429_with_retry_after(fresh_gw: GatewayServer, up: FakeUpstream, fault: str) -> None:
    up.behaviour = fault
    r = httpx.post(f"{fresh_gw.base_url}/chat/completions", headers=AUTH, json={"model": "solo", "messages": [{"role": "user", "content": "hi"}]})
    err = assert_openai_error(r, 429)
    assert err["type"] == "rate_limit_error"
    retry_after = int(r.headers["retry-after"])
    assert retry_after >= 1
    if fault == "429:3":
        assert retry_after == 3  # the provider's own wait is passed on
    assert metric_sum(fresh_gw, "admiral_requests_total", status="429") == 1


def test_openai_sdk_sees_typed_exceptions(fresh_gw: GatewayServer, up: FakeUpstream) -> None:
    sdk = openai.OpenAI(base_url=fresh_gw.base_url, api_key=AGENT_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    for fault, exc in (("500", openai.InternalServerError), ("hang", openai.InternalServerError), ("429-noretry", openai.RateLimitError)):
        up.behaviour = fault
        with pytest.raises(exc) as info:
            sdk.chat.completions.create(model="solo", messages=messages)
        assert info.value.body["type"]  # type: ignore[index]


# -- streams that go wrong after their first chunk -------------------------------------------


def test_stream_cut_midway_ends_with_an_error_event_and_done(gw: GatewayServer, client: httpx.Client, up: FakeUpstream, db: str, caplog: pytest.LogCaptureFixture) -> None:
    up.behaviour = "cut"
    answered = Counted(gw, "admiral_requests_total", status="502")
    r = ask(client, "solo", stream=True, text="one two three four", request_id="cut-stream")
    assert r.status_code == 200  # the first chunk was already on its way
    got = events(r)
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and "up" in error["message"]
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert warned(caplog, "stream failed")
    row = log_row(db, "cut-stream")
    assert row["status"] == 502 and row["stream"]
    assert answered.delta == 1


def test_stream_that_stalls_after_its_first_chunk_ends_with_a_timeout_event(client: httpx.Client, up: FakeUpstream) -> None:
    # no [DONE], no finish, no end: silence longer than first_byte_timeout_s between chunks
    up.behaviour = "dribble:30"
    r = ask(client, "solo", stream=True, text="a b c")
    assert r.status_code == 200
    got = events(r)
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["type"] == "timeout"
    wait_for(lambda: up.inflight == 0, what="the stalled upstream call to be closed")


def test_stream_finished_without_done_is_accepted(client: httpx.Client, up: FakeUpstream) -> None:
    up.behaviour = "nodone"
    r = ask(client, "solo", stream=True, text="all but the marker")
    got = events(r)
    assert got[-1] == "[DONE]"  # the gateway ends the stream properly itself
    assert not any("error" in e for e in got[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1] if c["choices"]) == "echo: all but the marker"
    assert got[-2]["choices"][0]["finish_reason"] == "stop"


def test_plain_request_to_a_stream_without_done_is_accepted(client: httpx.Client, up: FakeUpstream) -> None:
    up.behaviour = "nodone"
    r = ask(client, "solo", text="plain please")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: plain please"


def test_slow_dribbling_stream_under_the_timeout_completes(client: httpx.Client, up: FakeUpstream) -> None:
    up.behaviour = "dribble:0.1"  # each gap well under first_byte_timeout_s
    r = ask(client, "solo", stream=True, text="w1 w2 w3 w4 w5 w6")
    got = events(r)
    assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1] if c["choices"]) == "echo: w1 w2 w3 w4 w5 w6"
    up.behaviour = "dribble:0.3"
    assert ask(client, "solo", text="plain dribble").json()["choices"][0]["message"]["content"] == "echo: plain dribble"


def test_upstream_rejecting_the_request_is_passed_on_not_failed_over(gw: GatewayServer, client: httpx.Client, up: FakeUpstream, up2: FakeUpstream) -> None:
    up.behaviour = "refuse"  # a prompt too long for it does fail over: tests/test_context_fallback.py
    r = ask(client, "fast")
    assert_openai_error(r, 400)
    assert (up.calls, up2.calls) == (1, 0)  # the caller's mistake: another backend would refuse it too


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_refusal_keeps_its_type_code_and_param(fresh_gw: GatewayServer, up: FakeUpstream, stream: bool) -> None:
    up.behaviour = "status:400"
    sdk = openai.OpenAI(base_url=fresh_gw.base_url, api_key=AGENT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="solo", messages=[{"role": "user", "content": "a very long prompt"}], stream=stream)
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", "messages")
    assert "fake upstream error 400" in error["message"]


def test_upstream_rejecting_our_key_is_502_and_fails_over(client: httpx.Client, up: FakeUpstream, up2: FakeUpstream) -> None:
    up.behaviour = "status:401"
    r = ask(client, "fast")
    assert r.status_code == 200 and r.headers["x-admiral-backend"] == "up2"
    r = ask(client, "solo")
    err = assert_openai_error(r, 502)
    assert "key" in err["message"]
