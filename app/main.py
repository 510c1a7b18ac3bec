"""The ASGI application: ``create_app(settings)``; nothing is built at import time."""

from __future__ import annotations

import gc
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import admin, chat, completions, embeddings, health, messages, metrics, models
from app.api.errors import install_error_handlers
from app.api.lane import Dialect, ModelLane
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, RequestIds
from app.api.responses_api import ResponsesDialect
from app.api.responses_api import document as responses_document
from app.api.responses_api import router as responses_router
from app.clock import Clock
from app.config import Settings, load_settings
from app.json_logs import log_format, use_json_logs
from app.pipeline.base import COMPLETIONS
from app.reload import Generation, Reloader
from app.services import Services
from app.telemetry import ServerSpans, TracedLane, tracing_enabled

#: the garbage collector's thresholds while the app runs (generation 0, 1, 2)
GC_THRESHOLDS = (20_000, 20, 20)


class _GcTuning:
    """How the garbage collector runs while apps of this process serve.

    At each app's start, what exists lives as long as the app: frozen, so later full collections
    skip it. While any app runs, collections come every 20 000 new objects rather than 700:
    requests in flight are then seldom caught alive and promoted, so the older generations (the
    cache's entries among them) are rarely traversed. Measured over about 50 s of cache misses on
    one core (``gc.callbacks``): 6.7 s in collections with the defaults, growing as the cache
    filled; 0.15 s with these. After the last app stops, the thresholds before come back and
    everything is unfrozen (a process that runs several apps, as the tests do, can free them).
    Apps may start and stop on several threads' loops at once, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._before = GC_THRESHOLDS

    def started(self) -> None:
        with self._lock:
            gc.collect()
            gc.freeze()
            if self._running == 0:
                self._before = gc.get_threshold()
                gc.set_threshold(*GC_THRESHOLDS)
            self._running += 1

    def stopped(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                gc.set_threshold(*self._before)
                gc.unfreeze()


_gc = _GcTuning()


class GatewayApp(FastAPI):
    """FastAPI, but each model endpoint goes straight to its own lane (:class:`ModelLane`)."""

    lanes: dict[str, ASGIApp]
    #: the config generation new requests get (set at start and by each reload, app/reload.py)
    generation: Generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        if lane is not None:
            # counted, so that what a reload retires is closed only after its last request
            generation = self.generation
            generation.active += 1
            try:
                await lane(scope, receive, send)
            finally:
                generation.active -= 1
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, clock: Clock | None = None) -> GatewayApp:
    """The gateway app; ``clock`` drives the limits, breakers and retries (tests pass a manual one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.open(settings, clock=clock)
        reloader = Reloader(services, lambda generation: _publish(gateway, generation))
        app.state.reloader = reloader
        reloader.install()  # SIGHUP reloads the config (app/reload.py)
        _gc.started()
        try:
            yield
        finally:
            _gc.stopped()
            await reloader.aclose()
            await app.state.services.close()  # the current generation's (it holds every part still open)

    app = gateway = GatewayApp(title="Admiral Optimizer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    chat.document(app)
    completions.document(app)
    embeddings.document(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    app.include_router(responses_router)
    responses_document(app)
    ids = RequestIds()
    max_body = settings.server.max_body_bytes
    dialects = [Dialect(chat.PATH, chat.parse_request), Dialect(completions.PATH, completions.parse_request, COMPLETIONS), embeddings.EmbeddingsDialect(), messages.MessagesDialect()]

    # what each request is served with: the current generation's services (a plain attribute, not
    # Starlette's app.state, whose every read is a failed attribute lookup and a dict look-up)
    def current() -> Services:
        return gateway.generation.services

    dialects.append(ResponsesDialect(current))
    app.lanes = {d.path: ModelLane(d, current, ids, max_body) for d in dialects}
    app.lanes[messages.COUNT_TOKENS_PATH] = messages.CountTokensLane(current, ids, max_body)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body)
    app.add_middleware(RequestIdMiddleware, ids=ids)
    if tracing_enabled(settings):
        # one SERVER span per request: around each lane, and around everything FastAPI serves
        app.lanes = {path: TracedLane(lane, path, lambda: app.state.services.telemetry) for path, lane in app.lanes.items()}
        app.add_middleware(ServerSpans, telemetry=lambda: app.state.services.telemetry)
    return app


def _publish(app: GatewayApp, generation: Generation) -> None:
    app.state.services = generation.services
    app.generation = generation


def app_from_env() -> GatewayApp:
    """Factory for ``uvicorn --factory`` and worker processes: config from ``$ADMIRAL_CONFIG``."""
    import signal

    # a worker reloads on SIGHUP (its parent passes it on) once its app has started; until then it must not end it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = load_settings()
    if log_format(settings) == "json":
        import os

        use_json_logs(os.environ.get("ADMIRAL_LOG_LEVEL", "info"))  # a worker process starts with no log handlers
    return create_app(settings)


def prepare_multiprocess() -> None:
    """Give worker processes one directory for Prometheus' multiprocess mode (before they import it)."""
    import os
    import tempfile

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="admiral-prometheus-")
