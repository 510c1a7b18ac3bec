"""``POST /v1/completions`` (legacy text completions): the request's validation and its OpenAPI entry.

The lane does the HTTP work and the serving step the rest, as for chat: the request goes through
the same layers (routing, limits, cache, dedupe, failover) as a ``completions`` request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from app.api.chat import checked_body
from app.api.errors import validation_error
from app.api.schemas import StreamOptions, request_body_schema
from app.errors import BadRequestError
from app.memo import Recent
from app.pipeline.base import COMPLETIONS, ModelRequest

PATH = "/v1/completions"

#: token ids are never negative
_TokenId = Annotated[int, Field(ge=0)]
#: a prompt: text, texts, one token array or several (each non-empty where it is a list)
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[_TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(BaseModel):
    """Validation only: the body travels on unchanged, vLLM extras included. Fields in the OpenAI docs' order."""

    # strict: ``"n": "2"`` must not pass as the number 2
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=512)
    prompt: Prompt
    best_of: int | None = Field(None, ge=1, le=20)
    echo: StrictBool | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _printable(cls, v: str) -> str:
        # it is echoed in errors, logs and the x-admiral-route header
        if not v.isprintable():
            raise ValueError("must be printable text, without control characters")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None:
            if self.best_of < (self.n or 1):
                raise ValueError("'best_of' must be at least 'n'")
            if self.stream and self.best_of > 1:
                raise ValueError("'best_of' cannot be used with 'stream': only the best of the candidates is returned, once all are done")
        return self


#: bodies that passed validation lately (apart from chat's: equal bytes are another request there)
_valid_recently: Recent[bytes, bool] = Recent()


def parse_body(raw: bytes) -> dict[str, Any]:
    return checked_body(raw, CompletionRequest, _valid_recently, _refusal)


def _refusal(errors: list[dict[str, Any]]) -> BadRequestError:
    if errors and not errors[0].get("loc"):
        # a model-level rule (best_of): name the field it is about
        return BadRequestError(str(errors[0].get("msg", "")).removeprefix("Value error, "), param="best_of")
    return validation_error(errors)


def parse_request(raw: bytes) -> ModelRequest:
    return ModelRequest(parse_body(raw), raw, COMPLETIONS)


def document(app: FastAPI) -> None:
    """Put the route's operation in the app's OpenAPI document (the route is not one of FastAPI's)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if PATH not in schema["paths"]:
            body = {"required": True, "content": {"application/json": {"schema": request_body_schema(CompletionRequest)}}}
            schema["paths"] = {**schema["paths"], PATH: {"post": {**_OPERATION, "requestBody": body}}}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_OPERATION: dict[str, Any] = {
    "summary": "Completions (legacy)",
    "operationId": "completions_v1_completions_post",
    "responses": {
        "200": {
            "description": "A text_completion, or with stream: true an SSE stream of text_completion events",
            "content": {"application/json": {"schema": {}}},
        }
    },
}
