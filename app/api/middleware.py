"""HTTP concerns as pure ASGI middleware: request ids and the body size limit.

The chat completions lane (:class:`app.api.chat.ChatCompletions`) runs before this middleware and
uses the same pieces: :class:`RequestIds`, :func:`declared_too_large` and :func:`too_large`.
"""

from __future__ import annotations

import itertools
import os
import re

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLargeError

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIds:
    """Takes a sane ``x-request-id`` from the client or makes one."""

    def __init__(self) -> None:
        # a made id is 32 hex digits: this process's random half, then a counter (no system call per request)
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def of(self, header: bytes | None) -> str:
        """The client's ``x-request-id`` value when it is sane, else a new id."""
        if header is not None:
            candidate = header.decode("latin-1")
            if _VALID_ID.match(candidate):
                return candidate
        return f"{self._prefix}{next(self._counter):016x}"


class RequestIdMiddleware:
    """Gives every request an id (see :class:`RequestIds`) and echoes it on the response."""

    def __init__(self, app: ASGIApp, ids: RequestIds) -> None:
        self.app = app
        self.ids = ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.ids.of(first_header(scope, b"x-request-id"))
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def first_header(scope: Scope, name: bytes) -> bytes | None:
    """The value of the first ``name`` header (lower-case, as ASGI gives names), or None."""
    return next((value for key, value in scope["headers"] if key == name), None)


def too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Request body exceeds the gateway's limit of {max_bytes} bytes.")


def declared_too_large(content_length: bytes | None, max_bytes: int) -> bool:
    """Whether a Content-Length value is over ``max_bytes`` (a malformed one is left to the server)."""
    if content_length is None:
        return False
    try:
        return int(content_length) > max_bytes
    except ValueError:
        return False


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length or by counting as it reads."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if declared_too_large(first_header(scope, b"content-length"), self.max_bytes):
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": orjson.dumps(too_large(self.max_bytes).body())})
            return
        seen = 0

        async def counting_receive() -> Message:
            # raised inside the route, so the app's GatewayError handler answers 413
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
