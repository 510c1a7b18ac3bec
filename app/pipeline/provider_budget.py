"""Per-provider budgets (``providers.<name>.rpm/tpm``): a spent provider is skipped, not called."""

from __future__ import annotations

from app.errors import BackendRateLimitedError, BackendUnavailableError
from app.pipeline.answer import Answer
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.pipeline.rate_limit import RateLimiter, settle_when_done


class ProviderBudgetLayer:
    """Reserves from the deployment's provider budget; when spent, raises a skip that failover passes over."""

    def __init__(self, next_handler: Handler, limiter: RateLimiter) -> None:
        self._next = next_handler
        self._limiter = limiter

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        assert ctx.deployment is not None
        provider = ctx.deployment.provider
        if provider not in self._limiter.limits:
            return await self._next(request, ctx)
        reservation = await self._limiter.reserve(provider, request.estimated_tokens())
        if reservation.wait_s > 0:
            raise BackendRateLimitedError(f"{provider} budget spent, frees up in {reservation.wait_s:.1f} s", backend=provider, retry_after=reservation.wait_s)
        try:
            answer = await self._next(request, ctx)
        except BackendUnavailableError:
            await self._limiter.settle(reservation, 0, called=False)
            raise
        except BaseException:
            await self._limiter.settle(reservation, 0)
            raise
        return await settle_when_done(self._limiter, reservation, answer, paid=True)
