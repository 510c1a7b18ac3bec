"""Ordered failover: try each deployment of the route until one answers."""

from __future__ import annotations

from app.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from app.pipeline.base import ChatRequest, ChatResult, Handler, RequestContext


class FailoverLayer:
    """Walks ``ctx.deployments`` in order; a retryable failure moves on to the next one."""

    def __init__(self, next_handler: Handler) -> None:
        self._next = next_handler

    async def __call__(self, request: ChatRequest, ctx: RequestContext) -> ChatResult:
        failures: list[UpstreamError] = []
        for deployment in ctx.deployments:
            ctx.deployment = deployment
            try:
                return await self._next(request, ctx)
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                failures.append(exc)
                ctx.tried.append(f"{deployment}: {exc.message}")
        raise exhausted(failures, ctx)


def exhausted(failures: list[UpstreamError], ctx: RequestContext) -> GatewayError:
    """The error for a request no deployment could answer, naming each one tried and why."""
    detail = "; ".join(ctx.tried) or "no deployment to try"
    message = f"All backends for '{ctx.route}' failed: {detail}"
    if failures and all(isinstance(f, UpstreamTimeoutError) for f in failures):
        return UpstreamTimeoutError(message)
    return UpstreamError(message)
