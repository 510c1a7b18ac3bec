"""Where a call goes: the gateway while it answers, else the fallbacks in order.

The gateway counts as down only when it could not be reached: the connection was refused or
reset, no byte of an answer came within ``first_byte_timeout``, or a proxy in front of it (nginx,
a cloud load balancer) answered 502/503/504 on its behalf — told from the gateway's own errors by
the ``x-request-id`` every gateway answer carries. Any answer the gateway gave, a 4xx, a 429 or a
5xx included, is its decision and reaches the caller as the SDK's usual error. After a failure
the gateway is skipped for ``down_base_s``, doubling with each failure in a row up to
``down_max_s``; the first call after that tries it again, and an answer ends the outage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

log = logging.getLogger("admiral_client")

#: the httpx the installed SDK is built on (``httpx2`` for openai 3, ``httpx`` before): the
#: transports and requests here must be that module's own
httpx: Any = sys.modules[openai.DefaultHttpxClient.__mro__[1].__module__.partition(".")[0]]

#: errors that mean the gateway gave no answer at all (a pool timeout is local: not among them)
UNREACHABLE: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)

FALLBACK_HEADER = "x-admiral-fallback"
#: statuses a proxy in front of the gateway answers when it cannot reach it
PROXY_STATUSES = frozenset({502, 503, 504})


class ProxyAnswered(Exception):
    """A proxy in front of the gateway answered 502/503/504 itself: the gateway was not reached."""


def unreachable_behind_proxy(response: Any) -> bool:
    """A 502/503/504 without ``x-request-id``: every answer of the gateway carries one, a proxy's does not."""
    return response.status_code in PROXY_STATUSES and "x-request-id" not in response.headers


@dataclass(frozen=True)
class Fallback:
    """A provider to call directly while the gateway is down; ``models`` maps public names to its ids.

    Without ``models`` every call goes there with its model unchanged; with it, only calls for one
    of its public names do, under the provider's id for it.
    """

    base_url: str
    api_key: str = field(repr=False)
    models: Mapping[str, str] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"fallback base_url must be http(s)://...: {self.base_url!r}")
        if not self.name:
            object.__setattr__(self, "name", httpx.URL(self.base_url).host)

    @classmethod
    def of(cls, value: Fallback | Mapping[str, Any]) -> Fallback:
        if isinstance(value, Fallback):
            return value
        unknown = set(value) - {"base_url", "api_key", "models", "name"}
        if unknown:
            raise ValueError(f"unknown fallback keys: {', '.join(sorted(unknown))}")
        if "base_url" not in value or "api_key" not in value:
            raise ValueError("a fallback needs base_url and api_key")
        models = value.get("models")
        return cls(str(value["base_url"]), str(value["api_key"]), dict(models) if models is not None else None, str(value.get("name") or ""))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_fallbacks(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> list[Fallback]:
    """Fallbacks from a YAML (needs PyYAML) or JSON file: ``fallbacks: [{base_url, api_key, models}]``.

    ``${NAME}`` in the file is replaced by the environment variable, so keys stay out of the file.
    """
    env = os.environ if env is None else env
    text = Path(path).read_text(encoding="utf-8")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ValueError(f"{path}: ${{{name}}} is not set in the environment")
        return env[name]

    text = _ENV_REF.sub(substitute, text)
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise ImportError("reading a YAML fallbacks file needs PyYAML: pip install 'admiral-optimizer-client[yaml]' (or use a .json file)") from None
        data = yaml.safe_load(text)
    items = data.get("fallbacks") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise TypeError(f"{path}: expected a list under 'fallbacks'")
    return [Fallback.of(item) for item in items]


def fallbacks_from(value: Iterable[Fallback | Mapping[str, Any]] | str | os.PathLike[str] | None) -> list[Fallback]:
    """The ``fallbacks=`` argument (a list or a file), else the file named by ``ADMIRAL_FALLBACKS``."""
    if value is None:
        path = os.environ.get("ADMIRAL_FALLBACKS")
        return load_fallbacks(path) if path else []
    if isinstance(value, (str, os.PathLike)):
        return load_fallbacks(value)
    return [Fallback.of(item) for item in value]


class Outage:
    """Whether to skip the gateway now; the skip grows with each failure in a row."""

    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0
        self._until = -math.inf

    def gateway_usable(self) -> bool:
        return self._clock() >= self._until

    def failed(self, where: str, exc: BaseException) -> float:
        """Record a failure to reach the gateway; returns for how long it is skipped now."""
        with self._lock:
            self.failures += 1
            skip = min(self.max_s, self.base_s * 2 ** min(self.failures - 1, 30))
            self._until = self._clock() + skip
        log.warning("admiral gateway at %s unreachable (%s): calling the fallbacks, gateway again in %.1f s", where, type(exc).__name__, skip)
        return skip

    def answered(self, where: str) -> None:
        if self.failures:
            with self._lock:
                failures, self.failures, self._until = self.failures, 0, -math.inf
            log.warning("admiral gateway at %s answers again after %d failed attempt(s)", where, failures)


class Route:
    """The gateway, its outage state and the fallbacks; turns a gateway request into a fallback one."""

    def __init__(self, gateway: str, fallbacks: list[Fallback], outage: Outage, connect_timeout: float, first_byte_timeout: float) -> None:
        base = httpx.URL(gateway)
        self.gateway = str(base)
        self._scheme, self._host, self._port = base.scheme, base.host, base.port
        self._path = base.raw_path.split(b"?", 1)[0].rstrip(b"/") + b"/"
        self.fallbacks = fallbacks
        self.outage = outage
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout

    def suffix(self, request: Any) -> bytes | None:
        """The request's path (and query) below the gateway's base URL; None for another host."""
        url = request.url
        if (url.scheme, url.host, url.port) != (self._scheme, self._host, self._port) or not url.raw_path.startswith(self._path):
            return None
        return url.raw_path[len(self._path) :]

    def for_gateway(self, request: Any) -> dict[str, Any]:
        """Give the request the gateway's connect and first-byte timeouts; returns its own extensions."""
        extensions: dict[str, Any] = request.extensions
        timeout = dict(extensions.get("timeout") or {})
        timeout["connect"] = _shorter(timeout.get("connect"), self.connect_timeout)
        timeout["read"] = _shorter(timeout.get("read"), self.first_byte_timeout)
        request.extensions = {**extensions, "timeout": timeout}
        return extensions

    def alternatives(self, request: Any, suffix: bytes, extensions: dict[str, Any]) -> list[tuple[Fallback, Any]]:
        """The request as each fallback that takes its model would get it, in order."""
        body: Any = None
        content = request.content
        if content and request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(content)
            except ValueError:
                body = None
        out = []
        for fallback in self.fallbacks:
            new_content = content
            if fallback.models is not None:
                model = body.get("model") if isinstance(body, dict) else None
                if not isinstance(model, str) or model not in fallback.models:
                    continue
                new_content = json.dumps({**body, "model": fallback.models[model]}).encode()
            headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length", b"authorization", b"api-key")]
            headers.append((b"authorization", b"Bearer " + fallback.api_key.encode()))
            url = fallback.base_url.rstrip("/") + "/" + suffix.decode("ascii")
            out.append((fallback, httpx.Request(request.method, url, headers=headers, content=new_content, extensions=extensions)))
        return out


def _shorter(current: float | None, limit: float) -> float:
    return limit if current is None else min(current, limit)


def mark(response: Any, fallback: Fallback) -> Any:
    """Say on the response which fallback answered (``x-admiral-fallback``)."""
    response.headers[FALLBACK_HEADER] = fallback.name
    return response
