"""The request pipeline: layers nested in one visible place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.pipeline.auth import AuthLayer
from app.pipeline.backpressure import BackpressureLayer
from app.pipeline.base import Handler
from app.pipeline.cache import CacheLayer
from app.pipeline.circuit_breaker import CircuitBreakerLayer
from app.pipeline.dedupe import DedupeLayer
from app.pipeline.dispatch import Dispatcher
from app.pipeline.failover import FailoverLayer
from app.pipeline.provider_budget import ProviderBudgetLayer
from app.pipeline.rate_limit import AgentRateLimitLayer
from app.pipeline.router import RouterLayer

if TYPE_CHECKING:
    from app.services import Services


def build_pipeline(services: Services) -> Handler:
    """Outermost first: auth → routing → agent rate limit → [cache → dedupe] → failover →
    per deployment: circuit breaker → provider budget → backpressure → dispatch."""
    res = services.resilience
    # per deployment: failover sets ctx.deployment, then each try passes these
    handler: Handler = Dispatcher(services.providers)
    handler = BackpressureLayer(handler, res.slots)
    handler = ProviderBudgetLayer(handler, res.provider_budgets)
    handler = CircuitBreakerLayer(handler, res.breaker)
    handler = FailoverLayer(handler, res.retry, res.latency, res.clock, services.metrics, list(services.providers))
    # per request: one upstream call for identical requests in flight, none for repeated ones
    if services.settings.dedupe.enabled:
        handler = DedupeLayer(handler, services.inflight, services.metrics)
    if services.cache is not None:
        handler = CacheLayer(handler, services.cache, services.metrics)
    handler = AgentRateLimitLayer(handler, res.agent_limits)
    handler = RouterLayer(handler, services.router)
    return AuthLayer(handler, services.authenticator)
