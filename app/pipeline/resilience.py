"""The resilience parts (limits, breakers, slots, latency) built once and shared by the layers.

Read API for ``GET /admin/backends`` (and tests), all on ``services.resilience``:

- ``await resilience.backends()`` → one dict per configured deployment, in config order::

      {"deployment": "cerebras/llama3.1-8b", "backend": "cerebras",
       "circuit": "closed" | "half_open" | "open", "open_for_s": 0.0, "cooling_for_s": 0.0,
       "last_error": "cerebras answered 500: ..." | None, "last_error_at": <unix time> | None,
       "latency_s": 0.42 | None,
       "budget": {"rpm": 30, "rpm_used": 3.0, "tpm": 60000, "tpm_used": 812.0,
                  "refused_total": 0, "retry_after_s": 0.0, "rpd": 14400, "rpd_used": 120,
                  "tpd": None, "tpd_used": 0, "day_resets_in_s": 36000.0} | None,
       "load": {"in_flight": 1, "waiting": 0, "max_concurrency": 256} | None}

- ``await resilience.provider_status(provider)`` → the same per provider, as ``/admin/backends``
  lists them (``services.backend_status`` points here)::

      {"circuit": <worst of its deployments>, "deployments": [<rows as above>],
       "budget": {...} (when the provider has rpm/tpm/rpd/tpd; the daily counts read afresh
       from the shared store), "announced": [{"unit": "requests", "window": "day", "limit": 14400,
       "remaining": 14000, "resets_in_s": 3600.0}, ...] (what its headers said), "load": {...}}

- the parts themselves: ``breaker`` (:class:`CircuitBreaker`: ``status``, ``known_state``,
  ``any_usable``), ``agent_limits`` / ``provider_budgets`` (:class:`RateLimiter`: ``limits``,
  ``usage``), ``slots`` (:class:`ProviderSlots`: ``load``), ``latency``
  (:class:`LatencyTracker`: ``latency``, ``snapshot``), ``retry`` (:class:`RetryPolicy`).

Budgets, load and latency are this replica's view; breaker state is read from the shared store.
No secret appears in any of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.clock import Clock
from app.config import Settings
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.backpressure import ConcurrencyLimit, ProviderSlots
from app.pipeline.base import Deployment
from app.pipeline.circuit_breaker import BreakerPolicy, CircuitBreaker
from app.pipeline.failover import RetryPolicy
from app.pipeline.latency import LatencyTracker
from app.pipeline.rate_limit import RateLimiter
from app.state import StateStore


@dataclass
class Resilience:
    """Everything the resilience layers share, plus the read API documented above."""

    clock: Clock
    retry: RetryPolicy
    breaker: CircuitBreaker
    agent_limits: RateLimiter
    provider_budgets: RateLimiter
    slots: ProviderSlots
    latency: LatencyTracker

    @classmethod
    def build(cls, settings: Settings, state: StateStore, metrics: Metrics, events: EventBus, clock: Clock) -> Resilience:
        deployments = [Deployment.parse(d) for m in settings.models.values() for d in m.deployments]
        providers = list(settings.providers)
        return cls(
            clock=clock,
            retry=RetryPolicy.from_settings(settings),
            breaker=CircuitBreaker(BreakerPolicy.from_settings(settings), deployments, providers, state, clock, metrics, events),
            agent_limits=RateLimiter.for_agents(settings, state, clock, metrics, events),
            provider_budgets=RateLimiter.for_providers(settings, state, clock, metrics, events),
            slots=ProviderSlots(ConcurrencyLimit.from_settings(settings)),
            latency=LatencyTracker(deployments),
        )

    async def backends(self) -> list[dict[str, Any]]:
        return [await self._row(d) for d in self.breaker.deployments]

    async def provider_status(self, provider: str) -> dict[str, Any]:
        """One provider's detail for ``/admin/backends``: worst circuit, budget use, load, its deployments."""
        rows = [await self._row(d) for d in self.breaker.deployments if d.provider == provider]
        worst = max((_RANK[r["circuit"]] for r in rows), default=0)
        detail: dict[str, Any] = {"circuit": _NAMES[worst], "deployments": rows}
        await self.provider_budgets.refresh(provider)
        budget = self.provider_budgets.usage(provider)
        if budget is not None:
            detail["budget"] = asdict(budget)
        announced = self.provider_budgets.announced(provider)
        if announced:
            detail["announced"] = announced
        load = self.slots.load(provider)
        if load is not None:
            detail["load"] = asdict(load)
        return detail

    async def _row(self, deployment: Deployment) -> dict[str, Any]:
        status = await self.breaker.status(deployment)
        budget = self.provider_budgets.usage(deployment.provider)
        load = self.slots.load(deployment.provider)
        return {
            "deployment": str(deployment),
            "backend": deployment.provider,
            "circuit": status.state,
            "open_for_s": status.open_for_s,
            "cooling_for_s": status.cooling_for_s,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "latency_s": self.latency.latency(deployment),
            "budget": asdict(budget) if budget else None,
            "load": asdict(load) if load else None,
        }


_NAMES = ("closed", "half_open", "open")
_RANK = {name: i for i, name in enumerate(_NAMES)}
