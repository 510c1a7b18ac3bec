"""The pipeline's child spans, put in place by ``build_pipeline`` only when tracing is on.

Each wraps one part the layers are given (the cache, the single-flight coordinator, the provider
slots, the per-deployment chain, an in-process engine), so the layers themselves carry no tracing
code and cost nothing extra when tracing is off:

    cache lookup        TracedCache.get                  admiral.cache = hit | miss
    dedupe              TracedInflight.join → result     admiral.dedupe = leader | follower, whose (a link)
    <op> <model>        AttemptSpan (CLIENT)             one per upstream attempt: deployment, retry,
                                                         failover, outcome; its context goes upstream
    backpressure wait   TracedSlots.acquire              only when the provider's slots are all taken
    vllm generate       TracedEngine                     the in-process engine call
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind

from app.config import Settings
from app.genai_attributes import OPERATIONS, AnswerNotes, failed, note_answer, request_attributes
from app.pipeline.answer import Answer
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.pipeline.inflight import InflightCoordinator, SharedCall, Ticket
from app.providers.base import Provider, UpstreamRequest
from app.telemetry import Telemetry, recording

if TYPE_CHECKING:
    from app.pipeline.backpressure import ProviderSlots
    from app.storage.response_cache import ResponseCache


class _Around:
    """A part wrapped with spans: what a subclass does not trace passes through to ``_inner``."""

    def __init__(self, inner: Any, telemetry: Telemetry) -> None:
        self._inner = inner
        self._tracer = telemetry.tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TracedCache(_Around):
    """The response cache with each lookup in a ``cache lookup`` span; everything else passes through."""

    @classmethod
    def around(cls, cache: ResponseCache, telemetry: Telemetry) -> ResponseCache:
        return cast("ResponseCache", cls(cache, telemetry))

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if not recording():
            return await self._inner.get(key, *args, **kwargs)
        with self._tracer.start_as_current_span("cache lookup", attributes={"admiral.cache.key": key[:16]}) as span:
            stored = await self._inner.get(key, *args, **kwargs)
            if stored is None:
                span.set_attribute("admiral.cache", "miss")
            else:
                span.set_attribute("admiral.cache", "hit")
                backend = getattr(stored, "backend", None)
                if backend:
                    span.set_attribute("admiral.backend", backend)
            return stored


class _TracedTicket:
    """A waiter's ticket whose wait for the shared answer ends its ``dedupe`` span."""

    def __init__(self, ticket: Ticket, span: Span, done: Any) -> None:
        self._ticket = ticket
        self._span = span
        self._done = done
        self.leader = ticket.leader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ticket, name)

    async def result(self) -> Answer:
        span = self._span
        try:
            answer = await self._ticket.result()
        except BaseException as exc:
            failed(span, exc)
            self._end()
            raise
        span.set_attribute("admiral.dedupe.followers", self._ticket.followers)
        if not answer.is_stream:
            self._end()
            return answer

        async def over(outcome: BaseException | None) -> None:
            span.set_attribute("admiral.dedupe.followers", self._ticket.followers)
            if outcome is not None:
                failed(span, outcome)
            self._end()

        await answer.when_done(over)
        return answer

    def _end(self) -> None:
        self._done()
        self._span.end()


class TracedInflight(_Around):
    """The single-flight coordinator with each wait in a ``dedupe`` span.

    A leader's span is the parent of the shared upstream call (the call's task starts inside it);
    a follower's names the leader's request and trace and links to the leader's span when the
    leader is on this replica.
    """

    def __init__(self, coordinator: InflightCoordinator, telemetry: Telemetry) -> None:
        super().__init__(coordinator, telemetry)
        #: cache key -> the span of the leader waiting on this replica
        self._leaders: dict[str, SpanContext] = {}

    def __len__(self) -> int:
        return len(self._inner)

    async def join(self, key: str, ctx: RequestContext, call: SharedCall) -> Ticket:
        if not recording():
            return await self._inner.join(key, ctx, call)
        span = self._tracer.start_span("dedupe", attributes={"admiral.cache.key": key[:16]})
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            ticket = await self._inner.join(key, ctx, call)
        except BaseException as exc:
            failed(span, exc)
            span.end()
            raise
        finally:
            otel_context.detach(token)
        done: Any = _nothing
        if ticket.leader:
            span.set_attribute("admiral.dedupe", "leader")
            self._leaders[key] = span.get_span_context()

            def done() -> None:
                if self._leaders.get(key) == span.get_span_context():
                    del self._leaders[key]

        else:
            span.set_attribute("admiral.dedupe", "follower")
            leader = ticket.context
            span.set_attribute("admiral.dedupe.leader_request_id", leader.request_id)
            if leader.trace_id:
                span.set_attribute("admiral.dedupe.leader_trace_id", leader.trace_id)
            leader_span = self._leaders.get(key)
            if leader_span is not None:
                span.add_link(leader_span, {"admiral.link": "dedupe leader"})
        return _TracedTicket(ticket, span, done)  # type: ignore[return-value]


def _nothing() -> None:
    pass


class AttemptSpan:
    """One CLIENT span per upstream attempt (between failover and the per-deployment layers).

    The span is current while the call is made, so the provider's request carries its
    ``traceparent``; a stream's span ends with the stream.
    """

    def __init__(self, next_handler: Handler, telemetry: Telemetry) -> None:
        self._next = next_handler
        self._telemetry = telemetry
        self._tracer = telemetry.tracer

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        if not recording():
            return await self._next(request, ctx)
        deployment = ctx.deployment
        assert deployment is not None
        operation = OPERATIONS.get(request.endpoint, request.endpoint)
        span = self._tracer.start_span(f"{operation} {deployment.model}", kind=SpanKind.CLIENT)
        if span.is_recording():  # a sampler that drops this span costs no attributes
            name = str(deployment)
            tried = ctx.tried
            attrs = request_attributes(request)
            attrs.update(self._telemetry.provider_of(deployment.provider))
            attrs["gen_ai.request.model"] = deployment.model
            attrs["admiral.deployment"] = name
            attrs["admiral.backend"] = deployment.provider
            attrs["admiral.attempt"] = len(tried) + 1
            attrs["admiral.retry"] = sum(1 for t in tried if t.startswith(name + ": "))
            if tried:
                previous = tried[-1].partition(": ")[0]
                if previous != name:
                    attrs["admiral.failover_from"] = previous
            span.set_attributes(attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            answer = await self._next(request, ctx)
        except BaseException as exc:
            failed(span, exc)
            span.end()
            raise
        finally:
            otel_context.detach(token)
        if not span.is_recording():
            span.end()
            return answer
        span.set_attribute("admiral.outcome", "ok")
        await note_answer(span, answer, False, end=True)
        return answer


class TracedSlots(_Around):
    """The provider slots, with a ``backpressure wait`` span when a call has to queue for one."""

    @classmethod
    def around(cls, slots: ProviderSlots, telemetry: Telemetry) -> ProviderSlots:
        return cast("ProviderSlots", cls(slots, telemetry))

    def __contains__(self, provider: str) -> bool:
        return provider in self._inner

    async def acquire(self, provider: str) -> None:
        load = self._inner.load(provider)
        if load is None or load.in_flight < load.max_concurrency or not recording():
            await self._inner.acquire(provider)
            return
        attrs = {
            "admiral.backend": provider,
            "admiral.queue.in_flight": load.in_flight,
            "admiral.queue.waiting": load.waiting,
            "admiral.queue.max_concurrency": load.max_concurrency,
        }
        with self._tracer.start_as_current_span("backpressure wait", attributes=attrs, record_exception=False, set_status_on_exception=False) as span:
            try:
                await self._inner.acquire(provider)
            except BaseException as exc:
                failed(span, exc)
                span.set_attribute("admiral.queue.outcome", "timeout")
                raise
            span.set_attribute("admiral.queue.outcome", "acquired")


class TracedEngine(_Around):
    """An in-process engine (kind: vllm) with each call in an INTERNAL ``<provider> generate`` span."""

    def __init__(self, provider: Provider, telemetry: Telemetry) -> None:
        super().__init__(provider, telemetry)
        self._attributes = dict(telemetry.provider_of(provider.name))
        self.name = provider.name

    @classmethod
    def around(cls, providers: dict[str, Provider], settings: Settings, telemetry: Telemetry) -> dict[str, Provider]:
        """``providers`` with each in-process engine traced (HTTP providers' calls are the attempt spans)."""
        return {name: cls(p, telemetry) if getattr(settings.providers.get(name), "kind", None) == "vllm" else p for name, p in providers.items()}  # type: ignore[misc]

    def _span(self, request: UpstreamRequest) -> Span:
        attrs = {**self._attributes, "gen_ai.operation.name": OPERATIONS.get(request.endpoint, request.endpoint), "gen_ai.request.model": request.model}
        return self._tracer.start_span(f"{self._attributes['gen_ai.provider.name']} generate", kind=SpanKind.INTERNAL, attributes=attrs)

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]:
        if not recording():
            return await self._inner.complete(request)
        span = self._span(request)
        try:
            body = await self._inner.complete(request)
        except BaseException as exc:
            failed(span, exc)
            span.end()
            raise
        notes = AnswerNotes(False)
        notes.body(body)
        span.set_attributes(notes.attributes())
        span.end()
        return body

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]:
        if not recording():
            plain = self._inner.stream(request)
            try:
                async for chunk in plain:
                    yield chunk
            finally:
                await plain.aclose()  # type: ignore[attr-defined]
            return
        span = self._span(request)
        notes = AnswerNotes(False)
        chunks = self._inner.stream(request)
        first = True
        try:
            async for chunk in chunks:
                if first:
                    span.add_event("first chunk")
                    first = False
                notes.chunk(chunk)
                yield chunk
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            span.set_attributes(notes.attributes())
            span.end()
