"""Every error leaves the gateway in OpenAI's shape (Anthropic's under ``/v1/messages``) with the status the SDK maps to a type."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.api.responses import json_response
from app.errors import UNAVAILABLE, BadRequestError, GatewayError, MethodNotAllowedError, NotFoundError, database_unavailable, speaks_anthropic

log = logging.getLogger("admiral.api")

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error"}


def error_response(exc: GatewayError, path: str = "") -> Response:
    """``exc`` in OpenAI's shape, or in Anthropic's under ``/v1/messages``."""
    return json_response(exc.anthropic_body() if speaks_anthropic(path) else exc.body(), exc.status, exc.headers())


#: how pydantic names the member of a union in an error's location (``str``, ``list[ContentPart]``)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|dict|list)$|^[a-z][a-z-]*\[.*\]$")
_INSTANCE_OF = re.compile(r" or instance of \w+")


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and _UNION_TAG.match(part) is not None


def _first_error(errors: list[dict]) -> tuple[list[Any], str]:
    """The first error's location without union tags, and its message.

    When a value fits no member of a union, pydantic reports one error per member: the one that
    got furthest is the useful one, and when none got past the type check they are joined
    (``Input should be a valid string or a valid list``).
    """
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid request"))
    tag_at = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
    if tag_at is not None:
        prefix = tuple(loc[:tag_at])
        branches = [e for e in errors if tuple(p for p in e.get("loc", ()) if p != "body")[:tag_at] == prefix]
        # the member whose type matched and failed deeper inside (or on a constraint) says most
        best = max(branches, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
        if len(best.get("loc", ())) > len(first.get("loc", ())) or not str(best.get("type", "")).endswith("_type"):
            loc = [p for p in best["loc"] if p != "body"]
            message = str(best.get("msg", message))
        else:
            msgs = [str(e.get("msg", "")) for e in branches]
            message = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
        loc = [p for p in loc if not _is_tag(p)]
    return loc, _INSTANCE_OF.sub("", message.removeprefix("Value error, "))


def validation_error(errors: list[dict]) -> BadRequestError:
    """The first pydantic error as a 400 naming the parameter (``messages[0].role``)."""
    loc, message = _first_error(errors)
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return BadRequestError(f"Invalid request: {param or 'body'}: {message}", param=param or None)


def _shown(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def method_not_allowed(method: str, path: str, allow: str) -> MethodNotAllowedError:
    return MethodNotAllowedError(f"Method not allowed: {method} {_shown(path)}; this path takes {allow}.", allow=allow)


def install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc, request.url.path)

    async def request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(list(exc.errors())), request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        where = f"{request.method} {_shown(path)}"
        if exc.status_code == 404:
            return error_response(NotFoundError(f"Unknown path: {where}."), path)
        if exc.status_code == 405:
            return error_response(method_not_allowed(request.method, path, (exc.headers or {}).get("Allow", "another method")), path)
        err = GatewayError(str(exc.detail))
        err.status = exc.status_code
        err.error_type = _HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error")
        response = error_response(err, path)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: the database is unavailable: %s: %s", request.method, request.url.path, type(exc).__name__, str(exc)[:200])
        return error_response(database_unavailable(), request.url.path)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(GatewayError("The gateway hit an internal error."), request.url.path)

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(HTTPException, http_error)
    for unreachable in UNAVAILABLE:
        app.add_exception_handler(unreachable, unavailable)
    app.add_exception_handler(Exception, unexpected)
