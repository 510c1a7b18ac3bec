"""Everything a running gateway holds, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline import build_pipeline
from app.pipeline.auth import Authenticator
from app.pipeline.base import Handler
from app.pipeline.router import ModelRouter
from app.providers import Provider, build_providers
from app.recorder import RequestRecorder
from app.state import StateStore, build_state_store
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head

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
    started_at: float = field(default_factory=time.time)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, settings: Settings, metrics: Metrics | None = None) -> Services:
        metrics = metrics or Metrics()
        services = cls(
            settings=settings,
            metrics=metrics,
            providers=build_providers(settings),
            authenticator=Authenticator(settings.keys),
            router=ModelRouter(settings),
            recorder=RequestRecorder(metrics, log_content=settings.database.log_content),
            state=build_state_store(settings.state),
            events=EventBus(metrics),
            db=create_engine(settings.database.url),
        )
        if settings.database.url.startswith("sqlite"):
            # the embedded default upgrades itself so the first `serve` just works
            await asyncio.to_thread(upgrade_to_head, settings.database.url)
        services.pipeline = build_pipeline(services)
        for provider in services.providers.values():
            await provider.start()
        return services

    async def readiness(self) -> dict[str, dict[str, Any]]:
        ready = [name for name, p in self.providers.items() if p.ready()]
        try:
            state_ok = await self.state.ping()
        except Exception:
            state_ok = False
        try:
            async with self.db.connect() as conn:
                await conn.execute(text("SELECT 1"))
            db_ok = True
        except Exception:
            db_ok = False
        return {"database": {"ok": db_ok}, "state": {"ok": state_ok}, "backends": {"ok": bool(ready), "ready": ready}}

    async def close(self) -> None:
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
        await self.state.aclose()
        await self.db.dispose()
