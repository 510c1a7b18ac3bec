"""Config reload without a restart: SIGHUP (or ``admiral-optimizer reload``) swaps in a new generation.

A *generation* is one :class:`~app.services.Services` and the config it was built from. A reload
reads the config file again; a config that fails validation is refused (logged with its
``file: key.path: reason``) and the running generation stays. A valid one becomes a new
generation that shares every long-lived part with the running one and rebuilds what the config
decides::

    kept (same objects)                      rebuilt from the new config
    ───────────────────────────────────────  ──────────────────────────────────────────
    database engine, request-log writer,     gateway keys, models and routing, limits,
    state store (limits, breaker state),     breaker and retry policies, the pipeline;
    single flight (flights in progress),     the response cache when ``cache`` changed;
    metrics, events, telemetry, recorder,    providers added or whose config changed
    providers whose config is unchanged      (removed/changed ones are retired)

The lanes fetch the current generation per request, so the swap is one assignment: requests in
flight finish on the generation they started with, and what a new generation no longer uses
(providers removed or replaced, a replaced cache) is closed once the old generation's last request
has ended. ``server``, ``database``, ``state``, ``events`` and ``telemetry`` are bound to sockets,
connections and background senders opened at start: a change there is reported (in the log and in
``/admin/config``'s ``pending_restart``) and takes effect at the next restart.

With several workers, ``serve``'s parent process passes SIGHUP on to every worker, and each
reloads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from app.auth import Authenticator
from app.config import ConfigError, Settings, load_settings, masked
from app.pipeline.resilience import Resilience
from app.pipeline.router import ModelRouter
from app.pipeline.shared_answers import CacheAnswers
from app.providers import Provider, build_providers
from app.providers.openai_compat import OpenAICompatibleProvider
from app.serving import Serving
from app.storage.cache_tiers import SqlCacheTier
from app.storage.response_cache import ResponseCache

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger("admiral.reload")

#: sections bound to what was opened at start (sockets, connections, senders): they change at a restart
RESTART_ONLY = ("server", "database", "state", "events", "telemetry")
#: how often a retired generation is checked for requests still in flight
_DRAIN_POLL_S = 0.1


@dataclass
class Generation:
    """One config and the services built from it; ``active`` counts its requests in flight."""

    services: Services
    version: int
    loaded_at: float
    digest: str
    pending_restart: list[str] = field(default_factory=list)
    active: int = 0


@dataclass(frozen=True)
class Attempt:
    """The outcome of the last reload."""

    at: float
    ok: bool
    error: str | None = None


def digest(settings: Settings) -> str:
    """A short fingerprint of the resolved config (secrets included, so a rotated key shows)."""
    data = settings.model_dump(mode="json", by_alias=True)
    data["keys"] = [{**k, "key": _secret(k.get("key"))} for k in data.get("keys", [])]
    data["admin_key"] = _secret(settings.admin_key.get_secret_value() if settings.admin_key else None)
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()[:16]


def _secret(value: Any) -> str | None:
    return hashlib.sha256(str(value).encode()).hexdigest() if value else None


class Reloader:
    """Reloads the config of one app (one process) on demand; :meth:`install` wires SIGHUP to it."""

    def __init__(self, services: Services, publish: Callable[[Generation], None], *, load: Callable[[], Settings] | None = None) -> None:
        """``publish`` makes a generation the current one (sets what the lanes read)."""
        self._publish = publish
        source = services.settings.source
        # the embedded default has no file: reading it again picks up the environment's provider keys
        self._load = load or (lambda: load_settings(source if not source.startswith("<") else None))
        self.current = Generation(services, 1, time.time(), digest(services.settings))
        self.last: Attempt | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[Any]] = set()
        self._last_retire: asyncio.Task[None] | None = None
        self._signalled: asyncio.AbstractEventLoop | None = None
        publish(self.current)

    # -- SIGHUP -----------------------------------------------------------------------------

    def install(self) -> bool:
        """Reload on SIGHUP; only a process's main thread can take signals (tests run apps on others)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_signal)
        self._signalled = loop
        return True

    def _on_signal(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="config-reload")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- reload -----------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Read the config again and switch to it; False (and the running config kept) when it is refused."""
        async with self._lock:
            old = self.current
            try:
                settings = await asyncio.to_thread(self._load)
                kept, pending = _restart_only(old.services.settings, settings)
                services = await reconfigure(old.services, kept)
            except ConfigError as exc:
                self.last = Attempt(time.time(), False, str(exc))
                log.error("config reload refused, still running version %d: %s", old.version, exc)
                return False
            except Exception as exc:
                self.last = Attempt(time.time(), False, f"{type(exc).__name__}: {exc}")
                log.exception("config reload failed, still running version %d", old.version)
                return False
            new = Generation(services, old.version + 1, time.time(), digest(settings), pending)
            self.current = new
            self._publish(new)
            self.last = Attempt(new.loaded_at, True)
            if pending:
                log.warning("config reloaded (version %d), but %s changed: that takes a restart", new.version, ", ".join(pending))
            else:
                log.info("config reloaded: version %d (%s) from %s", new.version, new.digest, settings.source)
            task = asyncio.get_running_loop().create_task(self._retire(old, new, self._last_retire), name=f"retire-config-{old.version}")
            self._last_retire = task
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return True

    async def _retire(self, old: Generation, new: Generation, before: asyncio.Task[None] | None) -> None:
        """Once ``old`` and every generation before it have no request in flight, close what ``new`` does not use.

        The older ones first: a part ``old`` inherited may still serve their requests. At shutdown
        (cancelled) the parts are closed without waiting.
        """
        try:
            if before is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(before)
            while old.active > 0:
                await asyncio.sleep(_DRAIN_POLL_S)
        finally:
            await _close_unused(old.services, new.services)

    async def aclose(self) -> None:
        """At shutdown (the current generation is closed by its owner): close what retired generations still hold."""
        if self._signalled is not None:
            with contextlib.suppress(Exception):
                self._signalled.remove_signal_handler(signal.SIGHUP)
        tasks = list(self._retiring)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def status(self) -> dict[str, Any]:
        """What ``GET /admin/config`` shows: the loaded version, when, from where, and the last attempt."""
        current = self.current
        settings = current.services.settings
        return {
            "version": current.version,
            "digest": current.digest,
            "loaded_at": _iso(current.loaded_at),
            "source": settings.source,
            "pid": os.getpid(),
            "pending_restart": current.pending_restart,
            "last_reload": None if self.last is None else {"at": _iso(self.last.at), "ok": self.last.ok, "error": self.last.error},
            "config": masked(settings),
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _restart_only(running: Settings, loaded: Settings) -> tuple[Settings, list[str]]:
    """``loaded`` with the restart-only sections of ``running``, and the names of those that differ."""
    pending = [name for name in RESTART_ONLY if getattr(running, name) != getattr(loaded, name)]
    if not pending:
        return loaded, []
    return loaded.model_copy(update={name: getattr(running, name) for name in pending}), pending


async def reconfigure(old: Services, settings: Settings) -> Services:
    """A new generation of ``old`` for ``settings``: shared long-lived parts, rebuilt config-driven ones.

    Raises (with nothing left open) when a part cannot be built; ``old`` is not changed.
    """
    same = {n: p for n, p in old.providers.items() if old.settings.providers.get(n) == settings.providers.get(n)}
    fresh_config = {n: c for n, c in settings.providers.items() if n not in same}
    fresh = build_providers(settings.model_copy(update={"providers": fresh_config})) if fresh_config else {}
    new = copy.copy(old)
    cache_opened: ResponseCache | None = None
    try:
        new.settings = settings
        new.providers = {name: same.get(name) or fresh[name] for name in settings.providers}
        new.authenticator = Authenticator(settings.keys)
        new.router = ModelRouter(settings)
        new.resilience = Resilience.build(settings, old.state, old.metrics, old.events, old.clock)
        new.backend_status = new.resilience.provider_status
        if settings.cache != old.settings.cache:
            new.cache = None
            if settings.cache.enabled:
                tier = old.state.cache_tier(SqlCacheTier(old.db, max_total_bytes=settings.cache.max_total_bytes))
                new.cache = cache_opened = ResponseCache.from_config(settings.cache, tier, old.clock)
                cache_opened.start()
        new.classifier = None
        new.semantic = None
        await new._open_economy()
        if new.telemetry is not None:
            for provider in fresh.values():
                if isinstance(provider, OpenAICompatibleProvider):
                    provider.trace_headers = new.telemetry.trace_headers
        from app.services import build_pipeline

        new.pipeline = build_pipeline(new)
        new.serving = Serving(new.pipeline, new.recorder)
        for provider in fresh.values():
            await provider.start()
        if new.cache is not old.cache:
            # single flight (kept) publishes finished answers to the cache in use
            new.inflight.share_answers(CacheAnswers(new.cache) if new.cache is not None else None)
    except BaseException:
        await _close_parts(list(fresh.values()), cache_opened, new.semantic if new.semantic is not old.semantic else None)
        raise
    return new


async def _close_unused(old: Services, new: Services) -> None:
    """Close the parts of ``old`` that ``new`` does not hold."""
    in_use = {id(p) for p in new.providers.values()}
    await _close_parts(
        [p for p in old.providers.values() if id(p) not in in_use],
        old.cache if old.cache is not None and old.cache is not new.cache else None,
        old.semantic if old.semantic is not None and old.semantic is not new.semantic else None,
    )


async def _close_parts(providers: list[Provider], cache: ResponseCache | None, semantic: Any) -> None:
    for provider in providers:
        try:
            await provider.aclose()
        except Exception:
            log.exception("closing retired provider %s failed", provider.name)
    if cache is not None:
        await cache.aclose()  # its pending writes land first
    if semantic is not None:
        await semantic.aclose()


def forward_hup(processes: Callable[[Any], list[int]]) -> Callable[[Any], None]:
    """A replacement for uvicorn's supervisor ``handle_hup`` (which restarts every worker, cutting
    streams): pass SIGHUP on to each worker (``processes(supervisor)``), which reloads in place."""

    def handle_hup(supervisor: Any) -> None:
        pids = processes(supervisor)
        log.info("SIGHUP: reloading the config in %d worker(s)", len(pids))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    return handle_hup
