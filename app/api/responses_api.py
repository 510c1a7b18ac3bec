"""``POST /v1/responses`` (+ ``GET``/``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``):
the OpenAI Responses API on chat completions providers, and forwarded to providers that have it.

A Responses request is translated to the chat completion request it means
(:mod:`app.api.responses_input`), served by the same pipeline as a chat request (routing, limits,
cache, dedupe, failover), and its answer told back as a response object or as the Responses
event stream (:mod:`app.api.responses_output`). The request as it came goes along: on a model with
a deployment that has the Responses API natively it is forwarded instead (:mod:`app.pipeline.forward`),
and the provider's own response or events are relayed, with the gateway's response id. With ``store`` (on unless the request says
``false``) the response and the conversation it ends are kept per agent, for ``GET`` and for a
later request's ``previous_response_id``; another agent's id is answered 404, as an unknown one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from app.api.lane import Dialect
from app.api.responses_input import ResponsesRequest, as_items, chat_body, estimate_body, forward_body, given_items, parse_responses_body, resolved
from app.api.responses_output import (
    EitherEvents,
    RelayedEvents,
    ResponsesEvents,
    as_gateways,
    assistant_turn,
    from_completion,
    new_response_id,
    now,
    plain_items,
)
from app.api.sse import StreamWriter
from app.errors import BadRequestError, GatewayError, NotFoundError
from app.pipeline.answer import Answer
from app.pipeline.base import CHAT, Forwardable, ModelRequest, RequestContext
from app.providers.openai_responses import chat_items
from app.storage.stored_responses import ResponseStore, StoredRecord

if TYPE_CHECKING:
    from app.services import Services

PATH = "/v1/responses"
#: the operation as the request log and metrics name it
RESPONSES = "responses"


@dataclass(slots=True)
class ResponsesCall(Forwardable):
    """The chat request a Responses request became (``forward``: the request itself, for a
    provider with the Responses API natively), with what telling the answer back needs."""

    #: the Responses request body as the client sent it
    origin: dict[str, Any] = field(default_factory=dict)
    #: the chat messages this response continues and adds to (no instructions)
    conversation: list[dict[str, Any]] = field(default_factory=list)
    #: the same as Responses items: the stored conversation's, then this input
    items: list[Any] = field(default_factory=list)
    response_id: str = ""
    created_at: int = 0


class ResponsesDialect(Dialect):
    """The Responses API on its lane: requests read into chat (and kept as they came, for a provider
    that has the API natively), answers written back as responses — or relayed, when a provider
    with the API answered the request itself."""

    def __init__(self, services: Callable[[], Services]) -> None:
        super().__init__(PATH, _unused, RESPONSES)
        self._services = services

    def _store(self) -> ResponseStore | None:
        return self._services().responses

    async def read(self, raw: bytes, ctx: RequestContext) -> ModelRequest:
        body = parse_responses_body(raw)
        history: list[dict[str, Any]] = []
        history_items: list[Any] | None = None
        previous = body.get("previous_response_id")
        if previous:
            store = self._store()
            record = await store.get(previous, ctx.agent) if store is not None else None
            if record is None:
                raise NotFoundError(f"Previous response with id '{previous}' not found.", param="previous_response_id", code="previous_response_not_found")
            history = record.conversation
            history_items = record.items if record.items is not None else chat_items(history)
        refusal: BadRequestError | None = None
        try:
            chat, conversation = chat_body(body, history)
        except BadRequestError as exc:
            # said only in the Responses API: forwarded where the route has a provider that speaks it
            if not self._services().settings.native_responses():
                raise  # no provider here could take it as it is
            refusal = exc
            chat, conversation = estimate_body(body, history)
        items = [*(history_items or ()), *resolved(given_items(body.get("input")), history_items or [])]
        # raw stays empty: the cache key is computed from the translated body, never remembered by the Responses bytes
        return ResponsesCall(
            chat,
            b"",
            CHAT,
            forward=forward_body(body, history_items),
            refusal=refusal,
            origin=body,
            conversation=conversation,
            items=items,
            response_id=new_response_id(),
            created_at=now(),
        )

    def body(self, answer: Answer, request: ModelRequest, ctx: RequestContext) -> bytes:
        assert isinstance(request, ResponsesCall)
        answered = cast(dict[str, Any], answer.body)
        if answered.get("object") == "response":
            # a provider with the Responses API answered the request itself
            response = as_gateways(answered, request.origin, request.response_id)
            self._keep(request, ctx, response, assistant_turn(response.get("output") or []), native=True)
            return orjson.dumps(response)
        response, turn = from_completion(answered, request.origin, request.response_id, request.created_at)
        self._keep(request, ctx, response, turn, native=False)
        return orjson.dumps(response)

    def writer(self, request: ModelRequest, ctx: RequestContext) -> StreamWriter:
        assert isinstance(request, ResponsesCall)

        def relayed(response: dict[str, Any], turn: dict[str, Any]) -> None:
            self._keep(request, ctx, response, turn, native=True)

        def translated(response: dict[str, Any], turn: dict[str, Any]) -> None:
            self._keep(request, ctx, response, turn, native=False)

        rid, created_at = request.response_id, request.created_at
        return EitherEvents(RelayedEvents(request.origin, rid, created_at, relayed), ResponsesEvents(request.origin, rid, created_at, translated))  # type: ignore[return-value]

    def _keep(self, request: ResponsesCall, ctx: RequestContext, response: dict[str, Any], turn: dict[str, Any], *, native: bool) -> None:
        """Store the response (unless the request said ``store: false``) with the conversation it
        ends, as chat messages and as items (a provider's own output items as it sent them, the
        translation's as plain text and calls)."""
        if request.origin.get("store") is False:
            return
        store = self._store()
        if store is not None:
            inputs = as_items(request.origin.get("input"), request.response_id)
            output = response.get("output") or []
            items = [*request.items, *(output if native else plain_items(output))]
            store.put(StoredRecord(request.response_id, ctx.agent, time.time(), [*request.conversation, turn], response, inputs, items))


def _unused(raw: bytes) -> ModelRequest:
    raise AssertionError("ResponsesDialect reads requests itself")


def document(app: FastAPI) -> None:
    """Put ``POST /v1/responses`` in the app's OpenAPI document (the lane is not one of FastAPI's routes)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if "post" not in schema["paths"].get(PATH, {}):
            body = {"required": True, "content": {"application/json": {"schema": ResponsesRequest.model_json_schema()}}}
            operation = {
                "summary": "Create a response",
                "operationId": "create_response_v1_responses_post",
                "requestBody": body,
                "responses": {
                    "200": {
                        "description": "A response object, or with stream: true an SSE stream of Responses events",
                        "content": {"application/json": {"schema": {}}},
                    }
                },
            }
            schema["paths"] = {PATH: {"post": operation}, **schema["paths"]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# -- GET / DELETE /v1/responses/{id} -----------------------------------------------------------

router = APIRouter()


def _caller(request: Request) -> tuple[str, ResponseStore]:
    services = request.app.state.services
    headers = request.headers
    authorization = headers.get("authorization")
    if authorization is None and headers.get("x-api-key"):
        authorization = "Bearer " + headers["x-api-key"]
    key = services.authenticator.identify(authorization)
    store = services.responses
    if store is None:
        raise GatewayError("The gateway's response store is not running.")
    return (key.agent if key is not None else "anonymous"), store


def _not_found(response_id: str) -> NotFoundError:
    shown = response_id if len(response_id) <= 100 else response_id[:100] + "..."
    return NotFoundError(f"Response with id '{shown}' not found.", param="response_id")


@router.get(PATH + "/{response_id}")
async def get_response(response_id: str, request: Request) -> Response:
    agent, store = _caller(request)
    if request.query_params.get("stream", "false").lower() not in ("false", "0"):
        raise BadRequestError("Streaming a stored response again is not supported by the gateway.", param="stream")
    record = await store.get(response_id, agent)
    if record is None:
        raise _not_found(response_id)
    return Response(orjson.dumps(record.response), media_type="application/json")


@router.get(PATH + "/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc", after: str | None = None) -> Response:
    """The request's input items, ``order`` by position (``desc``: the last first), ``limit`` at a
    time, after the item ``after`` (the previous page's ``last_id``)."""
    agent, store = _caller(request)
    if not 1 <= limit <= 100:
        raise BadRequestError("Invalid 'limit': expected an integer from 1 to 100.", param="limit")
    if order not in ("asc", "desc"):
        raise BadRequestError("Invalid 'order': expected asc or desc.", param="order")
    record = await store.get(response_id, agent)
    if record is None:
        raise _not_found(response_id)
    items = record.input_items if order == "asc" else record.input_items[::-1]
    if after is not None:
        at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
        if at is None:
            raise BadRequestError(f"Invalid 'after': no input item '{after[:100]}' in this response.", param="after")
        items = items[at + 1 :]
    page = items[:limit]
    body = {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.delete(PATH + "/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    agent, store = _caller(request)
    if not await store.delete(response_id, agent):
        raise _not_found(response_id)
    return Response(orjson.dumps({"id": response_id, "object": "response", "deleted": True}), media_type="application/json")
