"""Traces, against a real OTLP/HTTP receiver on loopback that decodes the protobuf the gateway exports.

Span trees and attributes for a miss, a hit, a dedupe follower, a failover and a stream; the
client's trace continued and passed to the (fake) provider; no secret in any attribute; a dead or
hanging collector never holds up a request; JSON log lines; the off switch leaves the app as it was.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from app.api.lane import ModelLane
from app.config import ConfigError, TelemetryConfig
from app.genai_attributes import AnswerNotes
from app.json_logs import JsonFormatter, request_line
from app.pipeline.base import ModelRequest, RequestContext
from app.pipeline.router import RouterLayer
from app.telemetry import ServerSpans, TracedLane, export_settings
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, free_port, gateway

KEY = "sk-agent-telemetry-0001"
PROVIDER_KEY = "sk-provider-secret-9876543210"
HEADER_SECRET = "hdr-secret-abcdef123456"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


# --- a real OTLP/HTTP receiver ---------------------------------------------------------------


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    links: list[tuple[str, str]]
    events: list[str]
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status_code == 2  # STATUS_CODE_ERROR


class OtlpReceiver:
    """``POST /v1/traces`` (application/x-protobuf) on loopback, in its own thread; ``hang`` holds every export."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        self.hang = False
        self.headers: list[dict[str, str]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _traces(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.hang:
            assert self._stop is not None
            await self._stop.wait()
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            status_code=s.status.code,
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            events=[e.name for e in s.events],
                            resource=resource,
                        )
                    )
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while not condition(list(self.spans)):
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not received in time; got {[s.name for s in self.spans]}")
            time.sleep(0.02)
        return list(self.spans)

    def wait_for_post(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.posts == 0:
            assert time.monotonic() < deadline, "no export reached the receiver"
            time.sleep(0.02)

    def trace(self, trace_id: str, count: int) -> list[ReceivedSpan]:
        """The spans of one trace, once ``count`` of them have arrived."""
        return [s for s in self.wait_for(lambda spans: sum(s.trace_id == trace_id for s in spans) >= count) if s.trace_id == trace_id]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def config(up: FakeUpstream, endpoint: str, extra: str = "", models: str = "fast: [up/fake-model]", telemetry: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: tester}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, headers: {{X-Team-Secret: {HEADER_SECRET}}}, timeout_s: 10}}
  backup: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 10}}
models:
  {models}
routing: {{default: fast}}
retry: {{attempts: 1}}
telemetry: {{enabled: true, endpoint: "{endpoint}", export_interval_s: 0.05, service_name: admiral-test,
             headers: {{Authorization: "Bearer collector-token-xyz"}}{telemetry}}}
{extra}
"""


def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)


def ask(gw: GatewayServer, text: str = "hello traces", traceparent: str | None = TRACEPARENT, **extra: Any) -> Any:
    headers = {"traceparent": traceparent, "tracestate": "vendor=opaque"} if traceparent else {}
    return client(gw).chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": text}], extra_headers=headers, **extra)


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = by_name(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def log_row(gw: GatewayServer, request_id: str) -> dict[str, Any]:
    path = gw.settings.database.url.split("///", 1)[1]
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(path) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM request_log WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return dict(row)
        assert time.monotonic() < deadline, "no request log row"
        time.sleep(0.05)


# --- the span trees ------------------------------------------------------------------------------


def test_a_miss_continues_the_client_trace_to_the_provider(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url)) as gw:
        raw = ask(gw, temperature=0.3, max_tokens=40, seed=7)
        answer = raw.parse()
        spans = receiver.trace(CLIENT_TRACE, 4)
        server = one(spans, "POST /v1/chat/completions")
        lookup = one(spans, "cache lookup")
        dedupe = one(spans, "dedupe")
        attempt = one(spans, "chat fake-model")
        # the client's span is the server span's parent; the layers' spans hang below it
        assert server.parent_id == CLIENT_SPAN and server.kind == 2  # SPAN_KIND_SERVER
        assert lookup.parent_id == server.span_id and lookup.attributes["admiral.cache"] == "miss"
        assert dedupe.parent_id == server.span_id and dedupe.attributes["admiral.dedupe"] == "leader"
        assert attempt.parent_id == dedupe.span_id and attempt.kind == 3  # SPAN_KIND_CLIENT
        # the provider got the attempt span's context, and the client's tracestate
        sent = upstream.chat_requests[-1].headers
        assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"
        assert sent["tracestate"] == "vendor=opaque"
        # GenAI conventions on the server span
        a = server.attributes
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "fast"
        assert a["gen_ai.request.temperature"] == 0.3 and a["gen_ai.request.max_tokens"] == 40 and a["gen_ai.request.seed"] == 7
        assert a["gen_ai.response.model"] == answer.model and a["gen_ai.response.id"] == answer.id
        assert a["gen_ai.response.finish_reasons"] == ["stop"]
        assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens and a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
        assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.system"] == "openai"
        assert a["admiral.agent"] == "tester" and a["admiral.cache"] == "miss" and a["admiral.route"] == "fast" and a["admiral.backend"] == "up"
        assert a["http.response.status_code"] == 200 and a["http.route"] == "/v1/chat/completions"
        assert a["admiral.request_id"] == raw.headers["x-request-id"]
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # content is off by default
        # the attempt: deployment, retry, the provider's address
        b = attempt.attributes
        assert b["admiral.deployment"] == "up/fake-model" and b["admiral.attempt"] == 1 and b["admiral.retry"] == 0
        assert b["gen_ai.request.model"] == "fake-model" and b["gen_ai.response.finish_reasons"] == ["stop"]
        assert b["server.address"] == "127.0.0.1" and b["server.port"] == upstream.port
        assert not attempt.failed and not server.failed
        assert server.resource["service.name"] == "admiral-test"
        # the trace id reaches the request log row
        assert log_row(gw, raw.headers["x-request-id"])["trace_id"] == CLIENT_TRACE
        # the collector got the configured headers
        assert receiver.headers[0]["authorization"] == "Bearer collector-token-xyz"


def test_a_hit_is_answered_inside_the_cache_lookup(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url)) as gw:
        ask(gw, traceparent=None)
        hit = ask(gw, traceparent=TRACEPARENT)
        assert hit.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
        spans = receiver.trace(CLIENT_TRACE, 2)
        server = one(spans, "POST /v1/chat/completions")
        lookup = one(spans, "cache lookup")
        assert lookup.attributes["admiral.cache"] == "hit" and lookup.attributes["admiral.backend"] == "up"
        assert server.attributes["admiral.cache"] == "hit" and server.attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert not by_name(spans, "chat fake-model") and not by_name(spans, "dedupe")


def test_a_follower_names_its_leader(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url, "cache: {enabled: false}")) as gw:

        async def run() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as http:
                body = {"model": "fast", "messages": [{"role": "user", "content": "shared"}]}
                headers = {"Authorization": f"Bearer {KEY}"}
                upstream.hold()
                leader = asyncio.create_task(http.post(f"{gw.base_url}/chat/completions", json=body, headers={**headers, "x-request-id": "leader-1"}))
                await until(lambda: upstream.held == 1)
                follower_trace = "0af7651916cd43dd8448eb211c80319c"
                follower = asyncio.create_task(
                    http.post(f"{gw.base_url}/chat/completions", json=body, headers={**headers, "traceparent": f"00-{follower_trace}-b7ad6b7169203331-01"})
                )
                await until(lambda: (gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0) == 1)
                upstream.release()
                return await leader, await follower

        _, follower = asyncio.run(run())
        assert follower.headers["x-admiral-dedupe"] == "follower" and upstream.calls == 1
        spans = receiver.wait_for(lambda s: len(by_name(s, "dedupe")) == 2 and len(by_name(s, "POST /v1/chat/completions")) == 2)
        leader_dedupe = next(s for s in by_name(spans, "dedupe") if s.attributes["admiral.dedupe"] == "leader")
        follower_dedupe = next(s for s in by_name(spans, "dedupe") if s.attributes["admiral.dedupe"] == "follower")
        assert follower_dedupe.trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert follower_dedupe.attributes["admiral.dedupe.leader_request_id"] == "leader-1"
        assert follower_dedupe.attributes["admiral.dedupe.leader_trace_id"] == leader_dedupe.trace_id
        assert follower_dedupe.links == [(leader_dedupe.trace_id, leader_dedupe.span_id)]
        # one upstream attempt in all, in the leader's trace
        attempts = by_name(spans, "chat fake-model")
        assert len(attempts) == 1 and attempts[0].trace_id == leader_dedupe.trace_id
        follower_server = next(s for s in by_name(spans, "POST /v1/chat/completions") if s.trace_id == follower_dedupe.trace_id)
        assert follower_server.attributes["admiral.dedupe"] == "follower" and follower_server.attributes["admiral.backend"] == "up"


def test_a_failover_shows_each_attempt(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    upstream.by_model = {"broken": "500"}
    with gateway(config(upstream, receiver.url, models="fast: [up/broken, backup/fake-model]")) as gw:
        raw = ask(gw)
        assert raw.headers["x-admiral-backend"] == "backup"
        spans = receiver.trace(CLIENT_TRACE, 5)
        first, second = one(spans, "chat broken"), one(spans, "chat fake-model")
        assert first.failed and first.attributes["admiral.attempt"] == 1 and first.attributes["error.type"] == "upstream_error"
        # the provider's own status on each attempt (the gateway's 502 for it is admiral.error.status)
        assert first.attributes["http.response.status_code"] == 500 and second.attributes["http.response.status_code"] == 200
        assert first.attributes["admiral.deployment"] == "up/broken"
        assert not second.failed and second.attributes["admiral.attempt"] == 2
        assert second.attributes["admiral.failover_from"] == "up/broken" and second.attributes["admiral.retry"] == 0
        assert first.parent_id == second.parent_id
        server = one(spans, "POST /v1/chat/completions")
        assert server.attributes["admiral.backend"] == "backup" and server.attributes["admiral.attempts"] == 2
        # each attempt sent its own span as the provider's parent
        parents = [r.headers["traceparent"].split("-")[2] for r in upstream.chat_requests]
        assert parents == [first.span_id, second.span_id]


def test_a_wait_for_a_provider_slot_is_a_span(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    cfg = config(upstream, receiver.url, "cache: {enabled: false}").replace("timeout_s: 10}", "timeout_s: 10, max_concurrency: 1, queue_timeout_s: 30}", 1)
    with gateway(cfg) as gw:
        slots = gw.services.resilience.slots

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as http:
                headers = {"Authorization": f"Bearer {KEY}"}
                upstream.hold()
                first = asyncio.create_task(
                    http.post(f"{gw.base_url}/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": "a"}]}, headers=headers)
                )
                await until(lambda: upstream.held == 1)
                second = asyncio.create_task(
                    http.post(
                        f"{gw.base_url}/chat/completions",
                        json={"model": "fast", "messages": [{"role": "user", "content": "b"}]},
                        headers={**headers, "traceparent": TRACEPARENT},
                    )
                )
                await until(lambda: getattr(slots.load("up"), "waiting", 0) == 1)
                upstream.release()
                return [await first, await second]

        assert [r.status_code for r in asyncio.run(run())] == [200, 200]
        spans = receiver.trace(CLIENT_TRACE, 4)  # server, dedupe, attempt, wait (the cache is off)
        wait, attempt = one(spans, "backpressure wait"), one(spans, "chat fake-model")
        assert wait.parent_id == attempt.span_id
        assert wait.attributes["admiral.queue.outcome"] == "acquired" and wait.attributes["admiral.queue.max_concurrency"] == 1
        assert wait.attributes["admiral.backend"] == "up"


def test_sampling_is_parent_based(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url, telemetry=", sample_ratio: 0")) as gw:
        unsampled = ask(gw, "not sampled", traceparent=None)
        unsampled_trace = log_row(gw, unsampled.headers["x-request-id"])["trace_id"]
        sent = upstream.chat_requests[-1].headers["traceparent"]
        assert len(unsampled_trace) == 32 and sent.startswith(f"00-{unsampled_trace}-") and int(sent[-2:], 16) & 1 == 0  # not sampled
        ask(gw, "the client sampled it")  # its traceparent says sampled: the gateway's spans follow the client
        spans = receiver.trace(CLIENT_TRACE, 4)
        # spans leave in the order they ended: had the first request's been exported, they would be here
        assert {s.trace_id for s in receiver.spans} == {CLIENT_TRACE}
        assert one(spans, "POST /v1/chat/completions").parent_id == CLIENT_SPAN


def test_an_error_answer_marks_the_server_span(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    upstream.behaviour = "500"
    with gateway(config(upstream, receiver.url)) as gw:
        with pytest.raises(openai.InternalServerError):
            ask(gw)
        spans = receiver.trace(CLIENT_TRACE, 4)
        server = one(spans, "POST /v1/chat/completions")
        assert server.failed and server.attributes["http.response.status_code"] == 502
        assert server.attributes["error.type"] == "upstream_error"


def test_a_stream_is_traced_to_its_end(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url, telemetry=", capture_content: true")) as gw:
        stream = client(gw).chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"traceparent": TRACEPARENT},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        spans = receiver.trace(CLIENT_TRACE, 4)
        server, attempt = one(spans, "POST /v1/chat/completions"), one(spans, "chat fake-model")
        assert attempt.attributes["gen_ai.response.finish_reasons"] == ["stop"] and attempt.attributes["admiral.stream"] is True
        assert attempt.attributes["http.response.status_code"] == 200
        assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
        out = json.loads(server.attributes["gen_ai.output.messages"])
        assert out[0]["parts"][0]["content"] == text and out[0]["finish_reason"] == "stop"
        assert json.loads(server.attributes["gen_ai.input.messages"]) == [{"role": "user", "parts": [{"type": "text", "content": "stream me"}]}]


def test_other_routes_get_a_server_span(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url)) as gw:
        r = httpx.get(f"{gw.url}/health", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
        httpx.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {KEY}"})
        spans = receiver.wait_for(lambda s: bool(by_name(s, "GET /health")) and bool(by_name(s, "GET /v1/models")))
        health = one(spans, "GET /health")
        assert health.trace_id == CLIENT_TRACE and health.parent_id == CLIENT_SPAN
        assert health.attributes["http.route"] == "/health" and health.attributes["http.response.status_code"] == 200


def test_a_refused_key_is_traced_and_logged(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url)) as gw:
        r = httpx.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "fast", "messages": []},
            headers={"Authorization": "Bearer sk-wrong-key-000", "traceparent": TRACEPARENT},
        )
        assert r.status_code == 401
        spans = receiver.trace(CLIENT_TRACE, 1)
        server = one(spans, "POST /v1/chat/completions")
        assert server.attributes["http.response.status_code"] == 401 and server.attributes["error.type"] == "authentication_error"
        assert not server.failed  # a client's mistake is not the server's error
        assert log_row(gw, r.headers["x-request-id"])["trace_id"] == CLIENT_TRACE


def test_no_secret_in_any_attribute(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    upstream.by_model = {"broken": "status:401"}
    with gateway(config(upstream, receiver.url, models="fast: [up/broken, backup/fake-model]", telemetry=", capture_content: true")) as gw:
        ask(gw)
        ask(gw, stream=True).parse()
        spans = receiver.wait_for(lambda s: len(by_name(s, "POST /v1/chat/completions")) == 2)
        secrets = (KEY, PROVIDER_KEY, HEADER_SECRET, "collector-token-xyz")
        for span in spans:
            dumped = json.dumps([span.name, span.attributes, span.resource])
            for secret in secrets:
                assert secret not in dumped, (secret, span.name)
        assert any(s.attributes.get("error.type") == "upstream_auth_error" or s.failed for s in by_name(spans, "chat broken"))


# --- export never slows a request ---------------------------------------------------------------


@pytest.mark.parametrize("collector", ["closed port", "hanging"])
def test_a_dead_collector_costs_requests_nothing(upstream: FakeUpstream, receiver: OtlpReceiver, collector: str) -> None:
    hanging = collector == "hanging"
    receiver.hang = hanging  # accepts each export and never answers
    endpoint = receiver.url if hanging else f"http://127.0.0.1:{free_port()}"
    # export_timeout_s bounds each export (the exporter's retries, a hung POST), and so the stop's wait for it;
    # a request that waited for even one export would take about that long
    with gateway(config(upstream, endpoint, telemetry=", export_timeout_s: 3")) as gw:
        for i in range(5):
            started = time.monotonic()
            assert ask(gw, f"dead {i}").http_response.status_code == 200
            assert time.monotonic() - started < 1.5, f"request {i} waited for the export"
        assert upstream.calls == 5
        if hanging:
            receiver.wait_for_post()  # the export did reach the collector, which holds it


@pytest.mark.parametrize("bounds", ["config", "environment"])
def test_a_full_export_queue_drops_and_counts(upstream: FakeUpstream, receiver: OtlpReceiver, bounds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver.hang = True  # the collector accepts and never answers: the exporter's thread is stuck
    if bounds == "environment":
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    keys = ", queue_size: 4, batch_size: 2" if bounds == "config" else ""
    with gateway(config(upstream, receiver.url, telemetry=f"{keys}, export_timeout_s: 1")) as gw:
        ask(gw, "first")
        receiver.wait_for_post()
        for i in range(10):
            assert ask(gw, f"while stuck {i}").http_response.status_code == 200
        dropped = gw.services.metrics.registry.get_sample_value("admiral_spans_dropped_total")
        assert dropped is not None and dropped >= 10 * 4 - 4  # each request ends 4 spans; at most 4 wait
        receiver.hang = False


# --- configuration and the off switch ----------------------------------------------------------


def test_off_by_default_nothing_is_wrapped(upstream: FakeUpstream) -> None:
    with gateway(f"""
providers:
  up: {{kind: openai, base_url: "{upstream.base_url}"}}
models: {{fast: [up/m]}}
""") as gw:
        assert gw.services.telemetry is None
        assert not any(isinstance(lane, TracedLane) for lane in gw.app.lanes.values())
        assert not any(getattr(m, "cls", None) is ServerSpans for m in gw.app.user_middleware)
        assert isinstance(gw.app.lanes["/v1/chat/completions"], ModelLane)
        assert isinstance(gw.services.pipeline, RouterLayer)
        r = httpx.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "x"}], "stream": False},
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200 and "traceparent" not in upstream.chat_requests[-1].headers


def test_export_settings_from_the_environment() -> None:
    off = TelemetryConfig.model_validate({})
    assert export_settings(off, {}) is None
    on = export_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "gw"})
    assert on is not None and on.endpoint == "http://collector:4318/v1/traces" and on.service_name == "gw" and on.protocol == "http/protobuf"
    traces_only = export_settings(off, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom/path"})
    assert traces_only is not None and traces_only.endpoint == "http://c:4318/custom/path"
    assert export_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert export_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}) is None
    assert export_settings(TelemetryConfig.model_validate({"enabled": False}), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    forced = export_settings(TelemetryConfig.model_validate({"enabled": True, "sample_ratio": 0.25}), {})
    assert forced is not None and forced.endpoint == "http://localhost:4318/v1/traces" and forced.sample_ratio == 0.25
    config_wins = export_settings(TelemetryConfig.model_validate({"endpoint": "http://mine:4318/"}), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"})
    assert config_wins is not None and config_wins.endpoint == "http://mine:4318/v1/traces"
    grpc = export_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc is not None and grpc.protocol == "grpc" and grpc.endpoint == "http://c:4317"
    with pytest.raises(ConfigError, match="http/json"):
        export_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_export_batching_from_the_environment() -> None:
    """The OTEL_BSP_* and OTLP timeout variables fill the telemetry keys the config leaves unset."""
    unset = TelemetryConfig.model_validate({})

    def batching(env: dict[str, str], config: TelemetryConfig = unset) -> tuple[int, int, float, float]:
        export = export_settings(config, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", **env})
        assert export is not None
        return export.queue_size, export.batch_size, export.interval_s, export.timeout_s

    assert batching({}) == (2048, 512, 1.0, 10.0)  # the keys' defaults
    bsp = {"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10", "OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BSP_EXPORT_TIMEOUT": "30000"}
    assert batching(bsp) == (100, 10, 0.25, 30.0)
    # the exporter's timeout and the batch processor's both bound an export: the smaller wins
    assert batching({**bsp, "OTEL_EXPORTER_OTLP_TIMEOUT": "5000"})[3] == 5.0
    assert batching({**bsp, "OTEL_EXPORTER_OTLP_TIMEOUT": "5000", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2000"})[3] == 2.0
    assert batching({"OTEL_EXPORTER_OTLP_TIMEOUT": "5000", "OTEL_BSP_EXPORT_TIMEOUT": "1500"})[3] == 1.5
    config = TelemetryConfig.model_validate({"queue_size": 7, "export_interval_s": 2, "export_timeout_s": 4})
    assert batching({**bsp, "OTEL_EXPORTER_OTLP_TIMEOUT": "5000"}, config) == (7, 10, 2.0, 4.0)  # a key set in the config wins
    for name, bad in (
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2.5"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
    ):
        with pytest.raises(ConfigError, match=name):
            batching({name: bad})


def test_telemetry_config_mistakes_name_the_key() -> None:
    from tests.support import make_settings

    with pytest.raises(ConfigError, match=r"telemetry\.sample_ratio"):
        make_settings({"telemetry": {"sample_ratio": 2}})
    with pytest.raises(ConfigError, match=r"telemetry\.endpoint"):
        make_settings({"telemetry": {"endpoint": "collector:4318"}})
    with pytest.raises(ConfigError, match=r"telemetry\.colour: unknown key"):
        make_settings({"telemetry": {"colour": "blue"}})


def test_check_config_masks_collector_headers() -> None:
    from app.config import masked
    from tests.support import make_settings

    settings = make_settings(
        {"telemetry": {"headers": {"Authorization": "Bearer very-secret-token"}}, "events": {"amqp": {"url": "amqp://user:pw-secret@rabbit:5672/"}}}
    )
    shown = json.dumps(masked(settings))
    assert "very-secret-token" not in shown and "pw-secret" not in shown and "amqp://user:***@rabbit:5672/" in shown


# --- JSON logs -----------------------------------------------------------------------------------


def test_the_json_request_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("admiral.request")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ctx = RequestContext(request_id="req-1", trace_id=CLIENT_TRACE, agent="tester", route="fast", backend="up", cache_status="miss")
        ctx.upstream_seconds = 0.25
        request = ModelRequest({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        request_line(request, ctx, 200, None, {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue().strip())
    assert line["message"] == "request" and line["logger"] == "admiral.request" and line["level"] == "info"
    assert line["request_id"] == "req-1" and line["trace_id"] == CLIENT_TRACE and line["agent"] == "tester"
    assert line["model"] == "fast" and line["backend"] == "up" and line["cache"] == "miss" and line["status"] == 200
    assert line["stream"] is True and line["upstream_ms"] == 250.0 and line["latency_ms"] >= 0 and line["completion_tokens"] == 5
    assert line["ts"].endswith("Z")


def test_serve_logs_json_lines_with_the_trace_id(upstream: FakeUpstream, receiver: OtlpReceiver, tmp_path: Any) -> None:
    import subprocess

    import yaml

    from tests.serve import cli_command

    port = free_port()
    path = tmp_path / "gw.yaml"
    data = yaml.safe_load(config(upstream, receiver.url, f"database: {{url: 'sqlite+aiosqlite:///{tmp_path}/a.db'}}"))
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([*cli_command(), "serve", "--config", str(path), "--port", str(port), "--log-format", "json"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            time.sleep(0.1)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "log me"}]},
            headers={"Authorization": f"Bearer {KEY}", "traceparent": TRACEPARENT},
        )
        assert r.status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    requests = [line for line in lines if line.get("logger") == "admiral.request"]
    assert len(requests) == 1
    assert requests[0]["trace_id"] == CLIENT_TRACE and requests[0]["request_id"] == r.headers["x-request-id"] and requests[0]["status"] == 200
    assert any(line["logger"].startswith("uvicorn") for line in lines)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_request_durations_carry_the_trace_id_as_an_exemplar(upstream: FakeUpstream, receiver: OtlpReceiver) -> None:
    with gateway(config(upstream, receiver.url)) as gw:
        ask(gw)
        scraped = httpx.get(f"{gw.url}/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        assert scraped.headers["content-type"].startswith("application/openmetrics-text")
        buckets = [line for line in scraped.text.splitlines() if line.startswith("admiral_request_duration_seconds_bucket") and "#" in line]
        assert buckets and f'trace_id="{CLIENT_TRACE}"' in buckets[0]
        classic = httpx.get(f"{gw.url}/metrics")
        assert classic.headers["content-type"].startswith("text/plain") and "trace_id" not in classic.text


def test_the_compose_stack_has_a_trace_store_grafana_reads() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "16686:16686" in services["jaeger"]["ports"]
    assert services["gateway"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith("http://jaeger:4318}")
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    datasources = root / "grafana" / "provisioning" / "datasources"
    jaeger = yaml.safe_load((datasources / "jaeger.yml").read_text())["datasources"][0]
    assert jaeger["type"] == "jaeger" and jaeger["url"] == "http://jaeger:16686"
    prometheus = yaml.safe_load((datasources / "prometheus.yml").read_text())["datasources"][0]
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [{"name": "trace_id", "datasourceUid": jaeger["uid"]}]
    dashboard = json.loads((root / "grafana" / "dashboards" / "admiral-optimizer.json").read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    duration = next(p for p in panels if p.get("title") == "Request duration")
    assert all(t.get("exemplar") for t in duration["targets"])


@pytest.mark.vllm
def test_the_vllm_engine_call_is_a_span_of_its_attempt(tiny_model: Any, receiver: OtlpReceiver) -> None:
    from tests.vllm_support import ENGINE

    settings = {
        "keys": [{"key": KEY, "agent": "local-agent"}],
        "providers": {"local": {"kind": "vllm", "model": str(tiny_model), "engine": ENGINE}},
        "models": {"tiny": ["local/tiny"]},
        "routing": {"default": "tiny"},
        "retry": {"attempts": 1},
        "cache": {"enabled": False},
        "telemetry": {"enabled": True, "endpoint": receiver.url, "export_interval_s": 0.05},
    }
    with gateway(settings) as gw:
        gw.call(gw.services.providers["local"].wait_ready(), timeout=600)  # type: ignore[attr-defined]
        ai = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        plain = ai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_headers={"traceparent": TRACEPARENT})
        streamed_trace = "1" * 32
        chunks = list(
            ai.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
                stream=True,
                extra_headers={"traceparent": f"00-{streamed_trace}-{CLIENT_SPAN}-01"},
            )
        )
        assert chunks
        spans = receiver.trace(CLIENT_TRACE, 4)
        attempt, engine = one(spans, "chat tiny"), one(spans, "vllm generate")
        assert engine.parent_id == attempt.span_id and engine.kind == 1  # SPAN_KIND_INTERNAL
        assert engine.attributes["gen_ai.provider.name"] == "vllm" and engine.attributes["gen_ai.request.model"] == "tiny"
        assert plain.usage is not None and engine.attributes["gen_ai.usage.output_tokens"] == plain.usage.completion_tokens
        assert engine.attributes["gen_ai.response.finish_reasons"] == [plain.choices[0].finish_reason]
        streamed = receiver.trace(streamed_trace, 4)
        assert "first chunk" in one(streamed, "vllm generate").events


def test_a_forwarded_response_is_told_in_the_same_attributes() -> None:
    response = {
        "object": "response",
        "id": "resp_1",
        "model": "gpt-5-codex",
        "status": "completed",
        "output": [{"type": "web_search_call", "id": "ws_1"}, {"type": "message", "content": [{"type": "output_text", "text": "Sunny."}]}],
        "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
    }
    plain, streamed = AnswerNotes(capture=True), AnswerNotes(capture=True)
    plain.body(response)
    streamed.chunk({"type": "response.output_text.delta", "delta": "Sunny."})
    streamed.chunk({"type": "response.completed", "response": response})
    for notes in (plain, streamed):
        a = notes.attributes()
        assert a["gen_ai.usage.input_tokens"] == 12 and a["gen_ai.usage.output_tokens"] == 3
        assert a["gen_ai.response.model"] == "gpt-5-codex" and a["gen_ai.response.finish_reasons"] == ["completed"]
        assert "Sunny." in a["gen_ai.output.messages"]
