"""Everything a running gateway holds, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.amqp_events import AmqpPublisher
from app.api.metrics import mark_worker_dead
from app.auth import Authenticator
from app.classifier import Encoders, RouteClassifier
from app.clock import Clock
from app.config import Settings
from app.degraded import HitRateWatch
from app.events import EventBus
from app.json_logs import log_format, request_line
from app.metrics import Metrics
from app.pipeline.backpressure import BackpressureLayer
from app.pipeline.base import Handler
from app.pipeline.cache import CacheLayer
from app.pipeline.circuit_breaker import CircuitBreakerLayer
from app.pipeline.dedupe import DedupeLayer
from app.pipeline.dispatch import Dispatcher
from app.pipeline.embedding_cache import EmbeddingCacheLayer
from app.pipeline.failover import FailoverLayer, context_windows
from app.pipeline.forward import ForwardLayer
from app.pipeline.inflight import InflightCoordinator, LocalInflight
from app.pipeline.provider_budget import ProviderBudgetLayer
from app.pipeline.rate_limit import AgentRateLimitLayer
from app.pipeline.resilience import Resilience
from app.pipeline.router import ModelRouter, RouterLayer
from app.providers import Provider, build_providers
from app.providers.openai_compat import OpenAICompatibleProvider
from app.pipeline.shared_answers import CacheAnswers
from app.pipeline.semantic_cache import SemanticCacheLayer, semantic_switch, semantic_wanted
from app.prices import Prices
from app.recorder import RequestRecorder
from app.semantic import SemanticIndex
from app.serving import Serving
from app.state import StateStore, build_state_store
from app.storage.cache_tiers import SqlCacheTier
from app.storage.db import create_engine
from app.storage.migrate import known_revisions, schema_problem, upgrade_to_head
from app.storage.request_log import RequestLogWriter
from app.storage.response_cache import ResponseCache
from app.storage.stored_responses import ResponseStore
from app.telemetry import RequestSpan, Telemetry, export_settings
from app.traced import AttemptSpan, TracedCache, TracedEngine, TracedInflight, TracedSlots
from app.webhooks import WebhookSender

log = logging.getLogger("admiral")


@dataclass
class Services:
    """The gateway's long-lived parts; built in :meth:`open`, released in :meth:`close`."""

    settings: Settings
    metrics: Metrics
    providers: dict[str, Provider]
    authenticator: Authenticator
    router: ModelRouter
    recorder: RequestRecorder
    state: StateStore
    events: EventBus
    db: AsyncEngine
    pipeline: Handler = field(init=False)
    #: the pipeline behind the HTTP edge, recording every request once
    serving: Serving = field(init=False)
    #: limits, breakers, slots and latency shared by the layers; its read API serves /admin/backends
    resilience: Resilience = field(init=False)
    clock: Clock = field(default_factory=Clock)
    #: the loop the gateway serves on, read once (on CPython 3.11 asyncio.get_running_loop() is a getpid system call)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    started_at: float = field(default_factory=time.time)
    log_writer: RequestLogWriter | None = None
    webhooks: WebhookSender | None = None
    #: events published to RabbitMQ (``events.amqp``)
    amqp: AmqpPublisher | None = None
    #: OpenTelemetry tracing; None when off (then no span work happens anywhere)
    telemetry: Telemetry | None = None
    #: the exact response cache (None when ``cache.enabled`` is off)
    cache: ResponseCache | None = None
    #: Responses API responses kept for GET /v1/responses/{id} and previous_response_id
    responses: ResponseStore | None = None
    #: where identical in-flight requests meet (single-flight dedupe)
    inflight: InflightCoordinator = field(default_factory=LocalInflight)
    #: the sentence-embedding models in use (the learned router's, the semantic cache's), loaded once
    encoders: Encoders = field(default_factory=Encoders)
    #: the learned task router (``routing.classifier``)
    classifier: RouteClassifier | None = None
    #: the semantic cache's index (``cache.semantic``, or a key or model that turns it on)
    semantic: SemanticIndex | None = None
    #: set by the resilience layers: extra ``/admin/backends`` detail for a provider name
    backend_status: Callable[[str], Awaitable[dict[str, Any]]] | None = None
    #: (head revision, known revisions) when the schema is checked rather than upgraded at start
    _schema: tuple[str | None, frozenset[str]] | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, settings: Settings, metrics: Metrics | None = None, *, clock: Clock | None = None) -> Services:
        metrics = metrics or Metrics()
        services = cls(
            settings=settings,
            metrics=metrics,
            providers=build_providers(settings),
            authenticator=Authenticator(settings.keys),
            router=ModelRouter(settings),
            recorder=RequestRecorder(metrics, log_content=settings.database.log_content),
            state=build_state_store(settings.state, metrics, clock=clock.now if clock else None),
            events=EventBus(metrics),
            db=create_engine(settings.database.url),
            clock=clock or Clock(),
        )
        if settings.database.url.startswith("sqlite"):
            # the embedded default upgrades itself so the first `serve` just works
            await asyncio.to_thread(upgrade_to_head, settings.database.url)
        else:
            # several replicas could race an upgrade: `admiral-optimizer migrate` is a deploy step
            services._schema = await asyncio.to_thread(known_revisions, settings.database.url)
            try:
                problem = await services._schema_problem()
            except Exception as exc:
                problem = f"database unreachable ({type(exc).__name__}: {exc})"
            if problem:
                log.error("NOT READY: %s; requests are served but not logged until then", problem)
        db = settings.database
        services.log_writer = RequestLogWriter(services.db, metrics, queue_size=db.queue_size, batch_size=db.batch_size, retention_days=db.retention_days)
        services.log_writer.start()
        services.recorder.log_sink = services.log_writer
        services.responses = ResponseStore(services.db, retention_days=db.retention_days)
        services.responses.start()
        services.recorder.hit_rate_watch = HitRateWatch.from_config(services.events, settings.events)
        services._start_telemetry()
        if settings.events.webhooks:
            ev = settings.events
            services.webhooks = WebhookSender(ev.webhooks, metrics, timeout_s=ev.timeout_s, queue_size=ev.queue_size)
            services.webhooks.start()
            services.events.sinks.append(services.webhooks)
        services.resilience = Resilience.build(settings, services.state, metrics, services.events, services.clock)
        services.backend_status = services.resilience.provider_status
        if settings.cache.enabled:
            services.cache = ResponseCache.from_config(settings.cache, services.state.cache_tier(SqlCacheTier(services.db, max_total_bytes=settings.cache.max_total_bytes)), services.clock)
            services.cache.start()
        services.inflight = services.state.coordinator()
        if services.cache is not None:
            # between replicas: a finished flight's answer is in the shared cache before the flight ends
            services.inflight.share_answers(CacheAnswers(services.cache))
        await services._open_economy()
        services.pipeline = build_pipeline(services)
        services.serving = Serving(services.pipeline, services.recorder)
        for provider in services.providers.values():
            await provider.start()
        return services

    async def _open_economy(self) -> None:
        """Prices for the savings report, what providers announce, the learned router, the semantic cache."""
        settings = self.settings
        self.recorder.prices = Prices(settings)
        for provider in self.providers.values():
            if isinstance(provider, OpenAICompatibleProvider):
                provider.on_headers = self.resilience.provider_budgets.learn
        if settings.routing.classifier is not None:
            self.classifier = await RouteClassifier.open(settings.routing.classifier, settings.routing.default, list(settings.models), self.encoders)
        if self.cache is not None and semantic_wanted(settings):
            await self.encoders.get(settings.cache.semantic.model)
            self.semantic = SemanticIndex(self.db, max_entries=settings.cache.semantic.max_entries, ttl_s=settings.cache.ttl_s)
            await self.semantic.start()

    def _start_telemetry(self) -> None:
        """Tracing (when on), the JSON request log line (when asked) and the RabbitMQ event sink (when configured)."""
        settings = self.settings
        export = export_settings(settings.telemetry, os.environ)
        if export is not None:
            self.telemetry = Telemetry.start(export, settings, self.metrics)
            self.recorder.observers.append(self.telemetry.finished)
            for provider in self.providers.values():
                if isinstance(provider, OpenAICompatibleProvider):
                    provider.trace_headers = self.telemetry.trace_headers
        if log_format(settings) == "json":
            self.recorder.observers.append(request_line)
        if settings.events.amqp is not None:
            self.amqp = AmqpPublisher(settings.events.amqp, self.metrics)
            self.amqp.start()
            self.events.sinks.append(self.amqp)

    async def readiness(self) -> dict[str, dict[str, Any]]:
        ready = [name for name, p in self.providers.items() if p.ready()]
        try:
            state_ok = await self.state.ping()
        except Exception:
            state_ok = False
        db_check: dict[str, Any] = {"ok": True}
        try:
            problem = await self._schema_problem()
            if problem:
                db_check = {"ok": False, "message": problem}
        except Exception as exc:
            db_check = {"ok": False, "message": f"unreachable: {type(exc).__name__}"}
        state_check: dict[str, Any] = {"ok": state_ok}
        if getattr(self.state, "degraded", False):
            state_check["degraded"] = True  # Redis down: requests are served on this replica's in-process state
        return {"database": db_check, "state": state_check, "backends": {"ok": bool(ready) and self.resilience.breaker.any_usable(), "ready": ready}}

    async def _schema_problem(self) -> str | None:
        if self._schema is None:
            async with self.db.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return None
        return await schema_problem(self.db, *self._schema)

    async def close(self) -> None:
        # in-flight requests are done by now (uvicorn drains them first): their rows are queued
        if self.log_writer is not None:
            await self.log_writer.close()
        if self.responses is not None:
            await self.responses.aclose()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.amqp is not None:
            await self.amqp.close()
        await self.inflight.aclose()
        if self.cache is not None:
            await self.cache.aclose()  # pending cache writes land before the engine goes
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for provider in self.providers.values():
            try:
                await provider.aclose()
            except Exception:
                log.exception("closing provider %s failed", provider.name)
        if self.semantic is not None:
            await self.semantic.aclose()
        await self.encoders.aclose()
        await self.state.aclose()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)  # exports what waits: blocking, bounded by its timeout
        await self.db.dispose()
        mark_worker_dead()


def build_pipeline(services: Services) -> Handler:
    """Outermost first: routing → agent rate limit → [cache (embeddings: per item) → dedupe] → failover →
    per deployment: circuit breaker → provider budget → backpressure → dispatch.

    The caller is known before the pipeline runs: the edge resolves the gateway key.
    """
    res = services.resilience
    # tracing on: the layers get traced views of what they use (app/traced.py); off: nothing changes
    tel = services.telemetry
    providers = services.providers if tel is None else TracedEngine.around(services.providers, services.settings, tel)
    # per deployment: failover sets ctx.deployment, then each try passes these
    handler: Handler = Dispatcher(providers, services.settings.providers)
    handler = BackpressureLayer(handler, res.slots if tel is None else TracedSlots.around(res.slots, tel))
    handler = ProviderBudgetLayer(handler, res.provider_budgets)
    handler = CircuitBreakerLayer(handler, res.breaker)
    if tel is not None:
        handler = AttemptSpan(handler, tel)
    handler = FailoverLayer(handler, res.retry, res.latency, res.clock, services.metrics, list(services.providers), windows=context_windows(services.settings))
    # per request: one upstream call for identical requests in flight, none for repeated ones
    if services.settings.dedupe.enabled:
        handler = DedupeLayer(handler, services.inflight if tel is None else TracedInflight(services.inflight, tel), services.metrics)
    if services.cache is not None:
        # embeddings are cached item by item; their missing items go on to dedupe like any request
        chat: Handler = handler
        if services.semantic is not None:
            # after an exact miss: a stored request that means the same (opt-in)
            semantic = services.settings.cache.semantic
            encoder = services.encoders.loaded(semantic.model)
            chat = SemanticCacheLayer(handler, services.cache, services.semantic, encoder, semantic, semantic_switch(services.settings), services.metrics)
        lookups = services.cache if tel is None else TracedCache.around(services.cache, tel)
        handler = EmbeddingCacheLayer(CacheLayer(chat, lookups, services.metrics), handler, services.cache, services.metrics)
    handler = AgentRateLimitLayer(handler, res.agent_limits)
    natives = services.settings.native_responses()
    if natives:
        # a Responses request whose route has a provider with that API natively goes as it came
        handler = ForwardLayer(handler, natives)
    handler = RouterLayer(handler, services.router, services.classifier)
    return handler if tel is None else RequestSpan(handler, tel)
