"""Liveness, readiness (200 while requests can be served, degraded or not); the model list is in :mod:`app.api.models`."""

from __future__ import annotations

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
    # A check that failed but says "degraded" has a fallback that still serves requests (Redis down:
    # this replica's own memory). Taking the replica out of rotation for it would not help a client,
    # and with a shared Redis every replica would leave at once: 200, the state said in the body.
    if all(c["ok"] for c in checks.values()):
        return json_response({"status": "ready", "checks": checks})
    if all(c["ok"] or c.get("degraded") for c in checks.values()):
        return json_response({"status": "degraded", "checks": checks})
    return json_response({"status": "not_ready", "checks": checks}, 503)
