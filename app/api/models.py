"""``GET /v1/models`` and ``GET /v1/models/{id}``: the public model names the calling key may use."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.responses import json_response
from app.config import KeyConfig
from app.errors import NotFoundError

router = APIRouter()


def _caller(request: Request) -> KeyConfig | None:
    """The calling key: from ``Authorization``, else ``x-api-key`` (as the model endpoints take it)."""
    authorization = request.headers.get("authorization")
    if authorization is None:
        api_key = request.headers.get("x-api-key")
        if api_key is not None:
            authorization = "Bearer " + api_key
    key: KeyConfig | None = request.app.state.services.authenticator.identify(authorization)
    return key


def _entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "admiral-optimizer"}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    services = request.app.state.services
    key = _caller(request)
    created = int(services.started_at or time.time())
    return json_response({"object": "list", "data": [_entry(name, created) for name in services.router.public_models(key)]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> Response:
    services = request.app.state.services
    key = _caller(request)
    # a model the key may not use is as unknown to it as one that does not exist
    if model_id not in services.router.public_models(key):
        shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
        raise NotFoundError(f"The model '{shown}' does not exist or this key may not use it.", param="model", code="model_not_found")
    return json_response(_entry(model_id, int(services.started_at or time.time())))
