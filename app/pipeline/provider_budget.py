"""Per-provider budgets (``providers.<name>.rpm/tpm/rpd/tpd``): a spent provider is skipped, not called."""

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
        limiter = self._limiter
        if provider not in limiter.limits and not limiter.announces(provider):
            return await self._next(request, ctx)  # no budget to keep: no estimate to make
        estimate = request.estimated_tokens()
        wait = limiter.announced_wait(provider, estimate)
        if wait > 0:
            # the provider said it has no room left: skipped before it answers 429
            raise BackendRateLimitedError(f"{provider} announced its limit reached, resets in {wait:.1f} s", backend=provider, retry_after=wait)
        if provider not in limiter.limits:
            return await self._next(request, ctx)
        reservation = await limiter.reserve(provider, estimate)
        if reservation.wait_s > 0:
            if reservation.refused_by in ("rpd", "tpd"):
                # out for hours, not seconds: when no deployment is left the client gets a 503
                message = f"{provider} daily budget spent ({reservation.refused_by}), starts over in {reservation.wait_s:.0f} s"
                raise BackendUnavailableError(message, backend=provider, retry_after=reservation.wait_s)
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
