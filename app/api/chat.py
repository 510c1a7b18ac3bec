"""``POST /v1/chat/completions``: the request's validation and its place in the OpenAPI document.

The HTTP work is the lane's (:mod:`app.api.lane`), the answer the serving step's (:mod:`app.serving`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from app.api.errors import validation_error
from app.api.schemas import ChatCompletionRequest, request_body_schema
from app.errors import BadRequestError
from app.memo import BODY_MAX_BYTES, Recent
from app.pipeline.base import ModelRequest

#: nesting orjson can write back (it reads deeper)
_MAX_DEPTH = 254


#: bodies that passed validation lately: validation depends on the bytes alone, so a repeat skips it
_valid_recently: Recent[bytes, bool] = Recent()


def parse_body(raw: bytes) -> dict[str, Any]:
    return checked_body(raw, ChatCompletionRequest, _valid_recently)


def checked_body(
    raw: bytes, schema: type[BaseModel], recent: Recent[bytes, bool], refusal: Callable[[list[dict[str, Any]]], Exception] = validation_error
) -> dict[str, Any]:
    """The JSON object in ``raw`` once ``schema`` and the stream options accept it (``refusal``
    makes the error of what the schema refused); bodies ``recent`` accepted are only decoded."""
    if recent.get(raw):
        return orjson.loads(raw)  # type: ignore[no-any-return]
    body = json_object(raw)
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        raise refusal([dict(e) for e in exc.errors()]) from None
    check_stream_options(body)
    if len(raw) <= BODY_MAX_BYTES:
        recent.put(raw, True)
    return body


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why it is none (empty, not JSON, too deep)."""
    if not raw.strip():
        raise BadRequestError("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc.msg} (at position {exc.pos}).") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    # fail here, not when calling the provider; a body with fewer brackets cannot nest that deep
    # and costs no second encoding
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise BadRequestError("The request body nests too deeply (over 254 levels).") from None
    return body


def check_stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise BadRequestError("The 'stream_options' parameter is only allowed when 'stream' is true.", param="stream_options")


PATH = "/v1/chat/completions"


def parse_request(raw: bytes) -> ModelRequest:
    return ModelRequest(parse_body(raw), raw)


def document(app: FastAPI) -> None:
    """Put the route's operation in the app's OpenAPI document (the route is not one of FastAPI's)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if PATH not in schema["paths"]:
            body = {"required": True, "content": {"application/json": {"schema": request_body_schema()}}}
            schema["paths"] = {PATH: {"post": {**_OPERATION, "requestBody": body}}, **schema["paths"]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_OPERATION: dict[str, Any] = {
    "summary": "Chat Completions",
    "operationId": "chat_completions_v1_chat_completions_post",
    "responses": {
        "200": {
            "description": "A chat.completion, or with stream: true an SSE stream of chat.completion.chunk events",
            "content": {"application/json": {"schema": {}}},
        }
    },
}
