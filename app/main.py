"""The ASGI application: ``create_app(settings)``; nothing is built at import time."""

from __future__ import annotations

import gc
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app.api import admin, chat, health, metrics
from app.api.errors import install_error_handlers
from app.api.lane import Dialect, ModelLane
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, RequestIds
from app.clock import Clock
from app.config import Settings, load_settings
from app.services import Services

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

    lanes: dict[str, ModelLane]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lanes.get(scope["path"]) if scope["type"] == "http" else None
        if lane is not None:
            await lane(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, clock: Clock | None = None) -> GatewayApp:
    """The gateway app; ``clock`` drives the limits, breakers and retries (tests pass a manual one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.open(settings, clock=clock)
        app.state.services = services
        _gc.started()
        try:
            yield
        finally:
            _gc.stopped()
            await services.close()

    app = GatewayApp(title="Admiral Optimizer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    chat.document(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    ids = RequestIds()
    max_body = settings.server.max_body_bytes
    dialects = [Dialect(chat.PATH, chat.parse_request)]
    app.lanes = {d.path: ModelLane(d, lambda: app.state.services, ids, max_body) for d in dialects}
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body)
    app.add_middleware(RequestIdMiddleware, ids=ids)
    return app


def app_from_env() -> GatewayApp:
    """Factory for ``uvicorn --factory`` and worker processes: config from ``$ADMIRAL_CONFIG``."""
    return create_app(load_settings())


def prepare_multiprocess() -> None:
    """Give worker processes one directory for Prometheus' multiprocess mode (before they import it)."""
    import os
    import tempfile

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="admiral-prometheus-")
