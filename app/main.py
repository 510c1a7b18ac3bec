"""The ASGI application: ``create_app(settings)``; nothing is built at import time."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app.api import admin, chat, health, metrics
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, RequestIds
from app.clock import Clock
from app.config import Settings, load_settings
from app.services import Services


#: the garbage collector's thresholds while the app runs (generation 0, 1, 2)
GC_THRESHOLDS = (20_000, 20, 20)


class GatewayApp(FastAPI):
    """FastAPI, but ``/v1/chat/completions`` goes straight to its own lane (:class:`chat.ChatCompletions`)."""

    chat: chat.ChatCompletions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == chat.PATH:
            await self.chat(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, clock: Clock | None = None) -> GatewayApp:
    """The gateway app; ``clock`` drives the limits, breakers and retries (tests pass a manual one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.open(settings, clock=clock)
        app.state.services = services
        # what exists now lives as long as the app: frozen, every later full collection skips it
        gc.collect()
        gc.freeze()
        # a collection every 20 000 new objects rather than 700: requests in flight are then seldom
        # caught alive and promoted, so the older generations (the cache's entries among them) are
        # rarely traversed. Measured over a minute of cache misses on one core: collections took
        # 6.7 s (12 %, growing as the cache filled) with the defaults, 0.15 s with these.
        thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            yield
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()  # a process that runs several apps (the tests) can free this one's
            await services.close()

    app = GatewayApp(title="Admiral Optimizer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    chat.document(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    ids = RequestIds()
    app.chat = chat.ChatCompletions(app, ids, settings.server.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
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
