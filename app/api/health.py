"""Liveness, readiness and the model list."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.responses import json_response

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return json_response({"status": "ok"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    services = request.app.state.services
    checks = await services.readiness()
    ok = all(c["ok"] for c in checks.values())
    return json_response({"status": "ready" if ok else "not_ready", "checks": checks}, 200 if ok else 503)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    services = request.app.state.services
    services.authenticator.identify(request.headers.get("authorization"))
    created = int(services.started_at or time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "admiral-optimizer"} for name in services.router.public_models()]
    return json_response({"object": "list", "data": data})
