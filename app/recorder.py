"""The end of every request: metrics, and a row for the request log."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from app.metrics import Children, Metrics
from app.pipeline.answer import reported_tokens
from app.pipeline.base import ModelRequest, RequestContext
from app.shapes import Usage
from app.storage.request_log import Row

if TYPE_CHECKING:
    from app.degraded import HitRateWatch
    from app.prices import Prices


class LogSink(Protocol):
    """Takes request log rows without ever blocking the request."""

    def submit(self, row: Row) -> None: ...


class RequestRecorder:
    """Counts and logs each finished request once, whatever way it ended."""

    def __init__(self, metrics: Metrics, log_sink: LogSink | None = None, log_content: bool = False) -> None:
        self._metrics = metrics
        self._tally = metrics.tally
        self._requests = Children(metrics.requests)
        self._upstream_duration = Children(metrics.upstream_duration)
        self._ttft = Children(metrics.ttft)
        self._tokens = Children(metrics.tokens)
        self.log_sink = log_sink
        #: whether rows carry the prompt and the answer's text
        self.log_content = log_content
        #: watches the cache hit rate for ``optimizer.degraded`` (set by Services)
        self.hit_rate_watch: HitRateWatch | None = None
        #: prices for the savings report (set by Services)
        self.prices: Prices | None = None
        self._avoided_calls = Children(metrics.calls_avoided)
        self._avoided_tokens = Children(metrics.tokens_avoided)
        self._spend = Children(metrics.spend_usd)
        self._saved = Children(metrics.saved_usd)
        #: called first at each request's end, with finish's arguments (tracing, the JSON request log line)
        self.observers: list[Callable[[ModelRequest | None, RequestContext, int, str | None, Usage | None], None]] = []

    def start(self) -> None:
        tally = self._tally
        if tally.immediate:
            self._metrics.inflight.inc()
        else:
            tally.inflight += 1

    def finish(self, request: ModelRequest | None, ctx: RequestContext, status: int, content: str | None = None, usage: Usage | None = None) -> None:
        """Count and log the request; ``usage`` is what its answer reported (tokens count only when paid upstream)."""
        for observe in self.observers:
            observe(request, ctx, status, content, usage)
        m = self._metrics
        tally = self._tally
        if tally.immediate:
            m.inflight.dec()
        else:
            tally.inflight -= 1
        elapsed = time.perf_counter() - ctx.started
        backend = ctx.backend or "none"
        prompt_tokens, completion_tokens = reported_tokens(usage)
        price_usd = reference_usd = 0.0
        with tally.lock:
            # the request's counts and times, added to the collectors when /metrics is read
            tally.add(self._requests(ctx.agent, ctx.route or "none", backend, str(status), ctx.cache_status, ctx.endpoint))
            if ctx.trace_id:
                m.request_duration.observe(elapsed, {"trace_id": ctx.trace_id})  # an exemplar: the collector keeps it
            else:
                tally.observe(m.request_duration, elapsed)
            if ctx.upstream_seconds:
                tally.observe(self._upstream_duration(backend), ctx.upstream_seconds)
            if ctx.ttft_seconds is not None:
                tally.observe(self._ttft(backend), ctx.ttft_seconds)
            tally.observe(m.overhead, max(0.0, elapsed - ctx.upstream_seconds))
            if ctx.paid_upstream:
                if prompt_tokens:
                    tally.add(self._tokens(ctx.agent, backend, "prompt"), prompt_tokens)
                if completion_tokens:
                    tally.add(self._tokens(ctx.agent, backend, "completion"), completion_tokens)
            if status < 400 and (prompt_tokens or completion_tokens):
                price_usd, reference_usd = self._savings(ctx, prompt_tokens, completion_tokens)
        if self.hit_rate_watch is not None:
            self.hit_rate_watch.observe(ctx.cache_status)
        if self.log_sink is None:
            return
        deployment = ctx.deployment
        prompt = completion = None
        if self.log_content and request is not None:
            prompt, completion = request.prompt_text(), content
        # positional, in the Row's order: made this way, a Row costs a fraction of a dict or of Row(**fields)
        row = Row._make(
            (
                datetime.now(UTC),  # ts
                ctx.request_id,
                ctx.agent,
                (request.model if request else "")[:200],  # requested_model
                ctx.route,
                # a failed request names the last backend it tried
                ctx.backend or (deployment.provider if deployment else None),  # backend
                deployment.model if deployment else None,  # deployment_model
                status,
                "ok" if status < 400 else ("client_error" if status < 500 else "error"),  # outcome
                ctx.cache_status,  # cache
                ctx.dedupe_role,  # dedupe
                bool(request and request.stream),  # stream
                elapsed * 1000.0,  # latency_ms
                ctx.upstream_seconds * 1000.0 if ctx.upstream_seconds else None,  # upstream_ms
                ctx.ttft_seconds * 1000.0 if ctx.ttft_seconds is not None else None,  # ttft_ms
                prompt_tokens,
                completion_tokens,
                ctx.attempts,
                ctx.error_type,
                prompt,
                completion,
                ctx.endpoint,
                ctx.trace_id,
                ctx.route_by,
                ctx.route_score,
                price_usd,
                bool(usage and usage.get("estimated")),  # usage_estimated
                reference_usd,
            )
        )
        self.log_sink.submit(row)

    def _savings(self, ctx: RequestContext, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        """Count what an answered request cost or saved; (at price, at reference price) for its row (under the tally's lock)."""
        tally = self._tally
        paid = ctx.paid_upstream
        if not paid:
            via = "dedupe" if ctx.dedupe_role == "follower" else ("semantic" if ctx.cache_status == "semantic-hit" else "cache")
            tally.add(self._avoided_calls(ctx.agent, via))
            tally.add(self._avoided_tokens(ctx.agent, via), prompt_tokens + completion_tokens)
        if self.prices is None or not self.prices.any:
            return 0.0, 0.0
        price, reference = self.prices.cost(ctx.deployment, ctx.route, prompt_tokens, completion_tokens)
        if paid:
            if price:
                tally.add(self._spend(ctx.agent), price)
        elif price:
            tally.add(self._saved(ctx.agent, "price"), price)
        if reference - (price if paid else 0.0) > 0:
            tally.add(self._saved(ctx.agent, "reference"), reference - (price if paid else 0.0))
        return price, reference
