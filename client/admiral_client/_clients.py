"""The SDK's clients, pointed at the gateway, with fallbacks for when it cannot be reached."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import openai

from admiral_client._routing import Fallback, Outage, Route, fallbacks_from, httpx
from admiral_client._transport import AsyncFallbackTransport, FallbackTransport

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
#: the SDK's own pool size (a transport given to httpx does not take the client's limits)
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)

FallbacksArg = Iterable[Fallback | Mapping[str, Any]] | str | os.PathLike[str] | None


def _sdk_args(
    client: openai.OpenAI | openai.AsyncOpenAI,
    base_url: str | None,
    api_key: str | None,
    route_args: tuple[FallbacksArg, Outage | None, float, float],
    transport: Any,
    http_client: Any,
) -> dict[str, Any]:
    """The SDK constructor's ``base_url``, ``api_key`` and ``http_client`` for ``client``, whose
    calls go through a fallback transport (sync or async, as ``client`` is)."""
    sync = isinstance(client, openai.OpenAI)
    ours = FallbackTransport if sync else AsyncFallbackTransport
    transport_in_use = getattr(http_client, "_transport", None)  # with_options() passes ours back
    if http_client is not None and not isinstance(transport_in_use, ours):
        raise TypeError(f"admiral_client.{type(client).__name__} builds its own http_client; pass transport= for proxy or TLS settings")
    if transport_in_use is not None:
        route = transport_in_use.route
    else:
        fallbacks, outage, connect_timeout, first_byte_timeout = route_args
        gateway = base_url or os.environ.get("ADMIRAL_BASE_URL") or DEFAULT_BASE_URL
        route = Route(gateway, fallbacks_from(fallbacks), outage or Outage(), connect_timeout, first_byte_timeout)
        if sync:
            http_client = openai.DefaultHttpxClient(transport=FallbackTransport(route, transport or httpx.HTTPTransport(limits=LIMITS)))
        else:
            http_client = openai.DefaultAsyncHttpxClient(transport=AsyncFallbackTransport(route, transport or httpx.AsyncHTTPTransport(limits=LIMITS)))
    client.admiral_route = route  # type: ignore[union-attr]
    return {"base_url": base_url or route.gateway, "api_key": api_key or os.environ.get("ADMIRAL_API_KEY"), "http_client": http_client}


class _Routed:
    """The constructor both clients share: the SDK's, with its arguments from :func:`_sdk_args`."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        fallbacks: FallbacksArg = None,
        outage: Outage | None = None,
        connect_timeout: float = 3.0,
        first_byte_timeout: float = 60.0,
        transport: Any = None,
        http_client: Any = None,
        **kwargs: Any,
    ) -> None:
        route_args = (fallbacks, outage, connect_timeout, first_byte_timeout)
        super().__init__(**_sdk_args(self, base_url, api_key, route_args, transport, http_client), **kwargs)  # type: ignore[arg-type,call-arg]


class OpenAI(_Routed, openai.OpenAI):
    """``openai.OpenAI`` for the gateway at ``base_url`` that calls ``fallbacks`` while it is unreachable.

    ``fallbacks``: a list of ``{"base_url", "api_key", "models": {public name: provider model id}}``
    (or :class:`Fallback`), or the path of a YAML/JSON file holding one; default: the file named by
    ``ADMIRAL_FALLBACKS``, else none. ``base_url`` defaults to ``ADMIRAL_BASE_URL``, then
    ``http://127.0.0.1:8000/v1``; ``api_key`` to ``ADMIRAL_API_KEY``, then the SDK's own default.
    The gateway counts as unreachable when connecting fails or takes ``connect_timeout`` seconds,
    or when no byte of its answer comes within ``first_byte_timeout``; ``outage`` decides how long
    it is then skipped (share one between clients of the same gateway). ``transport``: the httpx
    transport the calls go through (proxy, TLS settings); the SDK's own ``http_client`` is not taken.
    """


class AsyncOpenAI(_Routed, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with the gateway fallbacks of :class:`OpenAI` (same arguments)."""
