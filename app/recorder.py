"""The end of every request: metrics, and a row for the request log."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from app.metrics import Children, Metrics
from app.pipeline.answer import spent_tokens
from app.pipeline.base import ModelRequest, RequestContext
from app.shapes import Usage

if TYPE_CHECKING:
    from app.degraded import HitRateWatch


class LogSink(Protocol):
    """Takes request log rows without ever blocking the request."""

    def submit(self, row: dict[str, Any]) -> None: ...


class RequestRecorder:
    """Counts and logs each finished request once, whatever way it ended."""

    def __init__(self, metrics: Metrics, log_sink: LogSink | None = None, log_content: bool = False) -> None:
        self._metrics = metrics
        self._requests = Children(metrics.requests)
        self._upstream_duration = Children(metrics.upstream_duration)
        self._ttft = Children(metrics.ttft)
        self._tokens = Children(metrics.tokens)
        self.log_sink = log_sink
        #: whether rows carry the prompt and the answer's text
        self.log_content = log_content
        #: watches the cache hit rate for ``optimizer.degraded`` (set by Services)
        self.hit_rate_watch: HitRateWatch | None = None

    def start(self) -> None:
        self._metrics.inflight.inc()

    def finish(self, request: ModelRequest | None, ctx: RequestContext, status: int, content: str | None = None, usage: Usage | None = None) -> None:
        """Count and log the request; ``usage`` is what its answer reported (tokens count only when paid upstream)."""
        m = self._metrics
        m.inflight.dec()
        elapsed = time.perf_counter() - ctx.started
        backend = ctx.backend or "none"
        self._requests(ctx.agent, ctx.route or "none", backend, str(status), ctx.cache_status).inc()
        m.request_duration.observe(elapsed)
        if ctx.upstream_seconds:
            self._upstream_duration(backend).observe(ctx.upstream_seconds)
        if ctx.ttft_seconds is not None:
            self._ttft(backend).observe(ctx.ttft_seconds)
        m.overhead.observe(max(0.0, elapsed - ctx.upstream_seconds))
        reported = spent_tokens(True, usage)
        prompt_tokens, completion_tokens = (reported.prompt, reported.completion) if reported else (0, 0)
        if ctx.paid_upstream:
            if prompt_tokens:
                self._tokens(ctx.agent, backend, "prompt").inc(prompt_tokens)
            if completion_tokens:
                self._tokens(ctx.agent, backend, "completion").inc(completion_tokens)
        if self.hit_rate_watch is not None:
            self.hit_rate_watch.observe(ctx.cache_status)
        if self.log_sink is None:
            return
        row: dict[str, Any] = {
            "ts": datetime.now(UTC),
            "request_id": ctx.request_id,
            "agent": ctx.agent,
            "requested_model": (request.model if request else "")[:200],
            "route": ctx.route,
            # a failed request names the last backend it tried
            "backend": ctx.backend or (ctx.deployment.provider if ctx.deployment else None),
            "deployment_model": ctx.deployment.model if ctx.deployment else None,
            "status": status,
            "outcome": "ok" if status < 400 else ("client_error" if status < 500 else "error"),
            "cache": ctx.cache_status,
            "dedupe": ctx.dedupe_role,
            "stream": bool(request and request.stream),
            "latency_ms": elapsed * 1000.0,
            "upstream_ms": ctx.upstream_seconds * 1000.0 if ctx.upstream_seconds else None,
            "ttft_ms": ctx.ttft_seconds * 1000.0 if ctx.ttft_seconds is not None else None,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "attempts": ctx.attempts,
            "error_type": ctx.error_type,
            "prompt": None,
            "completion": None,
            "endpoint": ctx.endpoint,
            "trace_id": ctx.trace_id,
        }
        if self.log_content and request is not None:
            row["prompt"] = request.prompt_text()
            row["completion"] = content
        self.log_sink.submit(row)
