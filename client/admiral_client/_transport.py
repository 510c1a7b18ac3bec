"""httpx transports that try the gateway, then the fallbacks (sync and async, one logic)."""

from __future__ import annotations

from typing import Any

from admiral_client._routing import UNREACHABLE, ProxyAnswered, Route, httpx, mark, unreachable_behind_proxy


class FallbackTransport(httpx.BaseTransport):  # type: ignore[misc]
    """Sends to the gateway through ``inner``; while it cannot be reached, to the fallbacks."""

    def __init__(self, route: Route, inner: Any) -> None:
        self.route = route
        self.inner = inner

    def handle_request(self, request: Any) -> Any:
        route = self.route
        suffix = route.suffix(request)
        if suffix is None or not route.fallbacks:
            return self.inner.handle_request(request)
        request.read()
        extensions = route.for_gateway(request)
        failure: BaseException | None = None
        proxied = None  # a proxy's 502/503/504 for the gateway: the answer if no fallback takes the call
        if route.outage.gateway_usable():
            try:
                response = self.inner.handle_request(request)
            except UNREACHABLE as exc:
                route.outage.failed(route.gateway, exc)
                failure = exc
            else:
                if not unreachable_behind_proxy(response):
                    route.outage.answered(route.gateway)
                    return response
                route.outage.failed(route.gateway, ProxyAnswered(f"HTTP {response.status_code} from a proxy in front of it"))
                proxied = response
        alternatives = route.alternatives(request, suffix, extensions)
        if proxied is not None:
            if not alternatives:
                return proxied
            proxied.close()
        if not alternatives:
            if failure is not None:
                raise failure
            # skipped while down, yet no fallback takes this model: the gateway is the only chance
            try:
                response = self.inner.handle_request(request)
            except UNREACHABLE as exc:
                route.outage.failed(route.gateway, exc)
                raise
            if unreachable_behind_proxy(response):
                route.outage.failed(route.gateway, ProxyAnswered(f"HTTP {response.status_code} from a proxy in front of it"))
            else:
                route.outage.answered(route.gateway)
            return response
        for fallback, alternative in alternatives:
            try:
                return mark(self.inner.handle_request(alternative), fallback)
            except UNREACHABLE as exc:
                failure = exc
        raise failure  # type: ignore[misc]  # set: every alternative failed

    def close(self) -> None:
        self.inner.close()


class AsyncFallbackTransport(httpx.AsyncBaseTransport):  # type: ignore[misc]
    """:class:`FallbackTransport` for the async client."""

    def __init__(self, route: Route, inner: Any) -> None:
        self.route = route
        self.inner = inner

    async def handle_async_request(self, request: Any) -> Any:
        route = self.route
        suffix = route.suffix(request)
        if suffix is None or not route.fallbacks:
            return await self.inner.handle_async_request(request)
        await request.aread()
        extensions = route.for_gateway(request)
        failure: BaseException | None = None
        proxied = None  # a proxy's 502/503/504 for the gateway: the answer if no fallback takes the call
        if route.outage.gateway_usable():
            try:
                response = await self.inner.handle_async_request(request)
            except UNREACHABLE as exc:
                route.outage.failed(route.gateway, exc)
                failure = exc
            else:
                if not unreachable_behind_proxy(response):
                    route.outage.answered(route.gateway)
                    return response
                route.outage.failed(route.gateway, ProxyAnswered(f"HTTP {response.status_code} from a proxy in front of it"))
                proxied = response
        alternatives = route.alternatives(request, suffix, extensions)
        if proxied is not None:
            if not alternatives:
                return proxied
            await proxied.aclose()
        if not alternatives:
            if failure is not None:
                raise failure
            try:
                response = await self.inner.handle_async_request(request)
            except UNREACHABLE as exc:
                route.outage.failed(route.gateway, exc)
                raise
            if unreachable_behind_proxy(response):
                route.outage.failed(route.gateway, ProxyAnswered(f"HTTP {response.status_code} from a proxy in front of it"))
            else:
                route.outage.answered(route.gateway)
            return response
        for fallback, alternative in alternatives:
            try:
                return mark(await self.inner.handle_async_request(alternative), fallback)
            except UNREACHABLE as exc:
                failure = exc
        raise failure  # type: ignore[misc]  # set: every alternative failed

    async def aclose(self) -> None:
        await self.inner.aclose()
