"""``POST /v1/embeddings``: the request's validation and the answer in the encoding the client asked for.

The HTTP work is the lane's (:mod:`app.api.lane`), the answer the serving step's; the per-item
cache is a pipeline layer (:mod:`app.pipeline.embedding_cache`).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.chat import json_object
from app.api.errors import validation_error
from app.api.lane import Dialect
from app.api.schemas import request_body_schema
from app.errors import BadRequestError
from app.pipeline.answer import Answer
from app.pipeline.base import EMBEDDINGS, ModelRequest, RequestContext
from app.vectors import BASE64, FLOAT, in_format

PATH = "/v1/embeddings"
#: OpenAI's limit on the inputs of one request
MAX_INPUTS = 2048


_TOKENS: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
#: what ``input`` may be, for the OpenAPI document (:func:`check_input` checks it, naming the item at fault)
_INPUT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "string", "minLength": 1}},
        _TOKENS,
        {"type": "array", "minItems": 1, "maxItems": 2048, "items": _TOKENS},
    ]
}


class EmbeddingRequest(BaseModel):
    """Validation of the fields besides ``input`` (its shape is :func:`check_input`'s); others travel on unchanged."""

    model_config = ConfigDict(extra="allow", strict=True)

    input: Any = Field(None, json_schema_extra=_INPUT_SCHEMA)
    model: str = Field(min_length=1, max_length=512)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = None


_INPUT_SHAPES = "a string, an array of strings, an array of token ids or an array of token id arrays"


def _token_ids(value: list[Any], param: str) -> None:
    for i, token in enumerate(value):
        if type(token) is not int or token < 0:
            raise BadRequestError(f"Invalid request: {param}[{i}]: a token id must be an integer of 0 or more.", param=f"{param}[{i}]")


def check_input(value: Any) -> None:
    """Raise a 400 naming the item when ``input`` is not one of the shapes OpenAI takes, or holds an empty item."""
    if value is None:
        raise BadRequestError("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        if not value:
            raise BadRequestError("Invalid request: input: the input must not be an empty string.", param="input")
        return
    if not isinstance(value, list):
        raise BadRequestError(f"Invalid request: input: must be {_INPUT_SHAPES}.", param="input")
    if not value:
        raise BadRequestError("Invalid request: input: the input must not be an empty array.", param="input")
    if len(value) > MAX_INPUTS:
        raise BadRequestError(f"Invalid request: input: at most {MAX_INPUTS} inputs per request, got {len(value)}.", param="input")
    first = value[0]
    if type(first) is int:
        _token_ids(value, "input")
        return
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise BadRequestError(f"Invalid request: {param}: an input must not be an empty string.", param=param)
        elif isinstance(item, list):
            if not item:
                raise BadRequestError(f"Invalid request: {param}: a token id array must not be empty.", param=param)
            _token_ids(item, param)
        else:
            raise BadRequestError(f"Invalid request: {param}: must be a string or an array of token ids (the input is {_INPUT_SHAPES}).", param=param)
        if isinstance(item, str) != isinstance(first, str):
            raise BadRequestError(f"Invalid request: {param}: strings and token id arrays cannot be mixed in one input.", param=param)


def parse_body(raw: bytes) -> dict[str, Any]:
    body = json_object(raw)
    try:
        EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error([dict(e) for e in exc.errors()]) from None
    check_input(body.get("input"))
    if body.get("stream") not in (None, False):
        raise BadRequestError("Embeddings are not streamed: 'stream' must be false or absent.", param="stream")
    body.pop("stream", None)
    body.pop("stream_options", None)
    return body


def parse_request(raw: bytes) -> ModelRequest:
    return ModelRequest(parse_body(raw), raw, EMBEDDINGS)


def document(app: FastAPI) -> None:
    """Put the route's operation in the app's OpenAPI document (the route is not one of FastAPI's)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if PATH not in schema["paths"]:
            body_schema = request_body_schema(EmbeddingRequest)
            body_schema["required"] = ["input", "model"]
            body_schema["properties"]["input"].pop("default", None)
            body = {"required": True, "content": {"application/json": {"schema": body_schema}}}
            schema["paths"] = {**schema["paths"], PATH: {"post": {**_OPERATION, "requestBody": body}}}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_OPERATION: dict[str, Any] = {
    "summary": "Embeddings",
    "operationId": "embeddings_v1_embeddings_post",
    "responses": {"200": {"description": "An embeddings list: one vector per input, in order", "content": {"application/json": {"schema": {}}}}},
}


def encoded_as_asked(answer: Answer, encoding_format: str) -> bytes:
    """The embeddings list's JSON with each vector in ``encoding_format``: the answer's own bytes when every vector is in it already."""
    body = answer.body
    data = body.get("data")
    if not isinstance(data, list):
        return answer.encoded
    want = str if encoding_format == BASE64 else list
    if all(isinstance(item, dict) and isinstance(item.get("embedding"), want) for item in data):
        return answer.encoded
    items = [{**item, "embedding": in_format(item["embedding"], encoding_format)} if isinstance(item, dict) and "embedding" in item else item for item in data]
    return orjson.dumps({**body, "data": items}, option=orjson.OPT_SERIALIZE_NUMPY)


class EmbeddingsDialect(Dialect):
    """OpenAI's embeddings endpoint: vectors as floats unless the client asked for base64."""

    def __init__(self) -> None:
        super().__init__(PATH, parse_request, EMBEDDINGS)

    def body(self, answer: Answer, request: ModelRequest, ctx: RequestContext) -> bytes:
        return encoded_as_asked(answer, request.body.get("encoding_format") or FLOAT)
