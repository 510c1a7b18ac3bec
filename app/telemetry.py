"""OpenTelemetry traces: one server span per request, exported over OTLP from a background thread.

Off unless ``telemetry.enabled`` says so or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-only
variable) is set. When off nothing here runs on a request: the ASGI wrappers and the pipeline's
traced layers (:mod:`app.traced`) are only put in place when it is on.

    ServerSpans / TracedLane   the SERVER span, parented by the client's ``traceparent``
      RequestSpan              (top of the pipeline) request and response attributes, ctx.trace_id
        cache lookup, dedupe, upstream attempt (CLIENT, its context sent to the provider),
        backpressure wait, vLLM engine call        -- app/traced.py
      Telemetry.finished       (the recorder's end of the request) admiral.* attributes, usage, status

Attributes follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``, made in
:mod:`app.genai_attributes`) plus the gateway's own (``admiral.*``). Prompts and answers go on spans only with ``telemetry.capture_content``;
keys, provider URLs' credentials and headers never do.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import ConfigError, Settings, TelemetryConfig
from app.genai_attributes import input_messages, note_answer, request_attributes, usage_attributes
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Handler, ModelRequest, RequestContext

if TYPE_CHECKING:
    from prometheus_client import Counter

    from app.shapes import Usage

log = logging.getLogger("admiral.telemetry")

#: the request's SERVER span, for the layers and the end of the request
_SERVER: ContextVar[Span | None] = ContextVar("admiral_server_span", default=None)

#: gen_ai.provider.name for the presets the conventions name (others: the preset or "openai")
_PROVIDER_NAMES = {"together": "together_ai", "mistral": "mistral_ai", "xai": "x_ai", "gemini": "gcp.gemini", "vllm-server": "vllm"}


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """Where and how spans go, resolved from ``telemetry:`` and the ``OTEL_*`` variables (config first)."""

    protocol: str
    endpoint: str
    #: None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)HEADERS itself
    headers: dict[str, str] | None
    #: None: OTEL_TRACES_SAMPLER / _ARG decide (default: parent-based, always on)
    sample_ratio: float | None
    service_name: str
    #: the export queue's bounds (see :func:`_batching`)
    queue_size: int
    batch_size: int
    interval_s: float
    timeout_s: float


def _env(env: Mapping[str, str], name: str) -> str | None:
    return (env.get(name) or "").strip() or None


def export_settings(config: TelemetryConfig, env: Mapping[str, str]) -> ExportSettings | None:
    """The export to run, or None when tracing is off; raises :class:`ConfigError` for a bad ``OTEL_*`` value."""
    if config.enabled is False:
        return None
    traces_endpoint = _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base_endpoint = _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if config.enabled is None:
        if (_env(env, "OTEL_SDK_DISABLED") or "").lower() == "true" or (_env(env, "OTEL_TRACES_EXPORTER") or "").lower() == "none":
            return None
        if not (traces_endpoint or base_endpoint or config.endpoint):
            return None
    protocol = config.protocol or _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    if protocol == "grpc":
        endpoint = config.endpoint or traces_endpoint or base_endpoint or "http://localhost:4317"
    elif config.endpoint:
        endpoint = _traces_url(config.endpoint)
    elif traces_endpoint:
        endpoint = traces_endpoint  # the traces-only variable is the whole URL
    else:
        endpoint = _traces_url(base_endpoint or "http://localhost:4318")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT: {endpoint!r} is not an http:// or https:// URL")
    headers = {k: v.get_secret_value() for k, v in config.headers.items()} or None
    ratio = config.sample_ratio
    service = config.service_name or _env(env, "OTEL_SERVICE_NAME") or "admiral-optimizer"
    return ExportSettings(protocol, endpoint, headers, ratio, service, *_batching(config, env))


def _batching(config: TelemetryConfig, env: Mapping[str, str]) -> tuple[int, int, float, float]:
    """Queue size, batch size, export interval and timeout: each ``telemetry`` key set in the config,
    else its ``OTEL_*`` variable (times in milliseconds, as the specification says), else the key's default.

    The exporter's timeout (the traces-only variable first) and the batch processor's both bound
    one export: the smaller one set is the timeout.
    """

    def pick(key: str, from_env: Callable[[], float | None]) -> Any:
        found = None if key in config.model_fields_set else from_env()
        return getattr(config, key) if found is None else found

    def timeout() -> float | None:
        exporter = _milliseconds(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or _milliseconds(env, "OTEL_EXPORTER_OTLP_TIMEOUT")
        return min((t for t in (exporter, _milliseconds(env, "OTEL_BSP_EXPORT_TIMEOUT")) if t is not None), default=None)

    return (
        pick("queue_size", lambda: _positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", int)),
        pick("batch_size", lambda: _positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", int)),
        pick("export_interval_s", lambda: _milliseconds(env, "OTEL_BSP_SCHEDULE_DELAY")),
        pick("export_timeout_s", timeout),
    )


def _positive(env: Mapping[str, str], name: str, kind: Callable[[str], float]) -> float | None:
    """The variable's value when set; :class:`ConfigError` when it is not a positive number of ``kind``."""
    raw = _env(env, name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise ConfigError(f"{name}: {raw!r} is not a positive {'whole ' if kind is int else ''}number")
    return value


def _milliseconds(env: Mapping[str, str], name: str) -> float | None:
    value = _positive(env, name, float)
    return None if value is None else value / 1000


def _traces_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


def tracing_enabled(settings: Settings, env: Mapping[str, str] | None = None) -> bool:
    return export_settings(settings.telemetry, os.environ if env is None else env) is not None


def _exporter(export: ExportSettings, timeout_s: float) -> SpanExporter:
    if export.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise ConfigError(
                "telemetry.protocol: grpc needs opentelemetry-exporter-otlp-proto-grpc (pip install opentelemetry-exporter-otlp-proto-grpc)"
            ) from None
        return GrpcExporter(endpoint=export.endpoint, insecure=export.endpoint.startswith("http://"), headers=export.headers, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=export.endpoint, headers=export.headers, timeout=timeout_s)


# --- export ----------------------------------------------------------------------------------


class ExportQueue(SpanProcessor):
    """Ended spans wait in a bounded queue; a thread exports them in batches.

    A request only appends to the queue: a slow or dead collector holds up the thread, never the
    request, and once ``max_queue`` spans wait, further ones are dropped and counted.
    """

    def __init__(self, exporter: SpanExporter, dropped: Counter, *, max_queue: int, batch_size: int, interval_s: float, timeout_s: float) -> None:
        self._exporter = exporter
        self._dropped = dropped
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or span.context is None or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self._dropped.inc()
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                self._exporter.export(batch)
            except Exception:
                log.exception("exporting %d spans failed", len(batch))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        return True

    def shutdown(self) -> None:
        """Export what waits (for at most the export timeout), then stop the exporter."""
        self._stopping = True
        self._wake.set()
        self._thread.join(self._timeout_s)
        self._exporter.shutdown()  # also ends a retry still sleeping on a dead collector


# --- the telemetry object ----------------------------------------------------------------------


class Telemetry:
    """The tracer and what the gateway's spans need to know about its providers."""

    def __init__(self, settings: Settings, provider: TracerProvider, processor: ExportQueue | None) -> None:
        self.settings = settings
        self.capture_content = settings.telemetry.capture_content
        self._provider = provider
        self._processor = processor
        self.tracer = provider.get_tracer("admiral-optimizer")
        self._propagator = TraceContextTextMapPropagator()
        #: provider name -> attributes every span of a call to it carries (system name, address)
        self.provider_attributes: dict[str, dict[str, Any]] = {name: _provider_attributes(name, p) for name, p in settings.providers.items()}

    @classmethod
    def start(cls, export: ExportSettings, settings: Settings, metrics: Metrics) -> Telemetry:
        resource = Resource.create({"service.name": export.service_name, "service.version": "0.1.0"})
        sampler = ParentBased(TraceIdRatioBased(export.sample_ratio)) if export.sample_ratio is not None else None
        provider = TracerProvider(resource=resource, sampler=sampler)
        processor = ExportQueue(
            _exporter(export, export.timeout_s),
            metrics.spans_dropped,
            max_queue=export.queue_size,
            batch_size=export.batch_size,
            interval_s=export.interval_s,
            timeout_s=export.timeout_s,
        )
        provider.add_span_processor(processor)
        log.info("tracing on: OTLP %s to %s", export.protocol, _origin(export.endpoint))
        return cls(settings, provider, processor)

    def shutdown(self) -> None:
        """Blocking (run it in a thread): exports what waits, then stops."""
        self._provider.shutdown()

    def provider_of(self, provider: str) -> dict[str, Any]:
        attrs = self.provider_attributes.get(provider)
        if attrs is None:
            attrs = self.provider_attributes[provider] = {"gen_ai.provider.name": provider, "gen_ai.system": provider}
        return attrs

    # -- context -----------------------------------------------------------------------------

    def trace_headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of the current span: what an upstream call carries."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, route: str | None = None) -> None:
        """Run ``app`` for one HTTP request inside its SERVER span (the client's ``traceparent`` its parent)."""
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in (b"traceparent", b"tracestate")}
        parent = self._propagator.extract(carrier) if carrier else None
        method = scope["method"]
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": scope["path"], "url.scheme": scope.get("scheme", "http")}
        if route:
            attributes["http.route"] = route
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        span = self.tracer.start_span(f"{method} {route or scope['path']}", context=parent, kind=SpanKind.SERVER, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        server = _SERVER.set(span)
        if not span.is_recording():
            # not sampled: only its context matters (the request log's trace id, the upstream traceparent)
            try:
                await app(scope, receive, send)
            finally:
                _SERVER.reset(server)
                otel_context.detach(token)
            return
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            if route is None:
                matched = getattr(scope.get("route"), "path", None)
                if matched:
                    span.update_name(f"{method} {matched}")
                    span.set_attribute("http.route", matched)
            if status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
            _SERVER.reset(server)
            otel_context.detach(token)
            span.end()

    # -- the end of a request (a RequestRecorder observer) -------------------------------------

    def finished(self, request: ModelRequest | None, ctx: RequestContext, status: int, content: str | None, usage: Usage | None) -> None:
        span = _SERVER.get()
        if span is None:
            return
        if ctx.trace_id is None:
            ctx.trace_id = trace_id_of(span)
        if not span.is_recording():
            return
        attrs: dict[str, Any] = {
            "admiral.request_id": ctx.request_id,
            "admiral.agent": ctx.agent,
            "admiral.endpoint": ctx.endpoint,
            "admiral.cache": ctx.cache_status,
            "admiral.attempts": ctx.attempts,
        }
        if ctx.route:
            attrs["admiral.route"] = ctx.route
        if ctx.dedupe_role:
            attrs["admiral.dedupe"] = ctx.dedupe_role
        if ctx.backend:
            attrs["admiral.backend"] = ctx.backend
            attrs.update(self.provider_of(ctx.backend))
        if ctx.deployment is not None:
            attrs["admiral.deployment"] = str(ctx.deployment)
        if usage:
            attrs.update(usage_attributes(usage))
        if status >= 400:
            attrs["error.type"] = ctx.error_type or str(status)
        span.set_attributes(attrs)
        if status >= 500:
            span.set_status(StatusCode.ERROR, ctx.error_type or str(status))


def recording() -> bool:
    """Whether this request's trace is sampled: the layers make spans only then (an unsampled
    request still sends its server span's context upstream, with the sampled flag off)."""
    span = _SERVER.get()
    return span is not None and span.is_recording()


def trace_id_of(span: Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _provider_attributes(name: str, config: Any) -> dict[str, Any]:
    if config.kind == "vllm":
        system = "vllm"
    elif config.kind == "demo":
        system = "admiral.demo"
    else:
        preset = config.preset or name
        system = _PROVIDER_NAMES.get(preset, preset if preset in _KNOWN_PRESETS else "openai")
    attrs: dict[str, Any] = {"gen_ai.provider.name": system, "gen_ai.system": system}
    if config.base_url:
        parts = urlsplit(config.base_url)
        if parts.hostname:
            attrs["server.address"] = parts.hostname  # never the userinfo part
            attrs["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return attrs


_KNOWN_PRESETS = frozenset({"cerebras", "groq", "deepseek", "openrouter", "ollama", "together", "mistral", "xai", "gemini", "vllm-server"})


# --- the ASGI side ---------------------------------------------------------------------------------


class TracedLane:
    """A model lane inside its SERVER span (the lanes run before FastAPI's middleware)."""

    def __init__(self, lane: ASGIApp, route: str, telemetry: Callable[[], Telemetry | None]) -> None:
        self.lane = lane
        self.path = route
        self._telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        telemetry = self._telemetry()
        if telemetry is None:
            await self.lane(scope, receive, send)
        else:
            await telemetry.serve(self.lane, scope, receive, send, self.path)


class ServerSpans:
    """Pure ASGI middleware: every other HTTP request (health, models, admin, metrics) in its SERVER span."""

    def __init__(self, app: ASGIApp, telemetry: Callable[[], Telemetry | None]) -> None:
        self.app = app
        self._telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        telemetry = self._telemetry() if scope["type"] == "http" else None
        if telemetry is None:
            await self.app(scope, receive, send)
        else:
            await telemetry.serve(self.app, scope, receive, send)


class RequestSpan:
    """Outermost pipeline step when tracing: the request's GenAI attributes on its server span, ``ctx.trace_id``."""

    def __init__(self, next_handler: Handler, telemetry: Telemetry) -> None:
        self._next = next_handler
        self._capture = telemetry.capture_content

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        span = _SERVER.get()
        if span is None:
            return await self._next(request, ctx)
        ctx.trace_id = trace_id_of(span)
        if not span.is_recording():  # not sampled: the trace id still goes upstream and into the log
            return await self._next(request, ctx)
        span.set_attributes(request_attributes(request))
        if self._capture:
            span.set_attribute("gen_ai.input.messages", input_messages(request))
        answer = await self._next(request, ctx)
        await note_answer(span, answer, self._capture, end=False)
        return answer
