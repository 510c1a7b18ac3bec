"""``/admin/*``: usage stats from the request log, the state of each backend, the loaded config, the process; admin key only."""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.responses import json_response
from app.auth import bearer_token
from app.errors import AuthenticationError, BadRequestError, PermissionDeniedError
from app.storage.stats import backend_recent, request_stats

router = APIRouter(prefix="/admin")

MAX_HOURS = 24 * 365
CIRCUIT_STATES = {0: "closed", 1: "half_open", 2: "open"}


def require_admin(request: Request) -> None:
    """401 without a key or with an unknown one, 403 for an agent key or when no admin key is configured."""
    services = request.app.state.services
    admin_key = services.settings.admin_key
    if admin_key is None or not admin_key.get_secret_value():
        raise PermissionDeniedError("The admin API is disabled: no admin_key is configured for this gateway.", code="admin_disabled")
    authorization = request.headers.get("authorization")
    token = bearer_token(authorization, "admin key")
    if hmac.compare_digest(token.encode(), admin_key.get_secret_value().encode()):
        return
    try:
        agent_key = services.authenticator.identify(authorization)
    except AuthenticationError:
        agent_key = None
    if agent_key is not None:
        raise PermissionDeniedError("This is a gateway key for an agent; /admin/* needs the admin key.", code="admin_key_required")
    raise AuthenticationError("Incorrect admin key provided.")


def _hours(request: Request) -> int:
    raw = request.query_params.get("hours", "24")
    try:
        hours = int(raw)
    except ValueError:
        hours = 0
    if not 1 <= hours <= MAX_HOURS:
        raise BadRequestError(f"hours must be a whole number from 1 to {MAX_HOURS}, not {raw[:20]!r}.", param="hours")
    return hours


@router.get("/stats")
async def stats(request: Request) -> Response:
    require_admin(request)
    hours = _hours(request)
    services = request.app.state.services
    return json_response(await request_stats(services.db, hours))


@router.get("/backends")
async def backends(request: Request) -> Response:
    require_admin(request)
    services = request.app.state.services
    registry = services.metrics.registry
    recent = await backend_recent(services.db, minutes=15)
    report: dict[str, dict[str, Any]] = {}
    for name, provider in services.providers.items():
        config = services.settings.providers[name]
        circuit = registry.get_sample_value("admiral_circuit_state", {"backend": name})
        entry: dict[str, Any] = {
            "kind": config.kind,
            "ready": provider.ready(),
            # the breaker mirrors its state into this gauge; absent until it has seen the backend
            "circuit": CIRCUIT_STATES.get(int(circuit), "unknown") if circuit is not None else "closed",
            "budget": {"rpm": config.rpm, "tpm": config.tpm},
            "recent": recent.get(name, {"requests": 0, "errors": 0, "upstream_ms_avg": None, "last_seen": None, "last_error": None}),
        }
        # the resilience layers add what only they know (breaker detail, budget use, latency estimate)
        if services.backend_status is not None:
            entry.update(await services.backend_status(name))
        report[name] = entry
    return json_response({"backends": report, "window_minutes": 15})


@router.get("/config")
async def config(request: Request) -> Response:
    """The loaded config (secrets masked): its version, when and from where it was loaded, and the last reload's outcome."""
    require_admin(request)
    return json_response(request.app.state.reloader.status())


@router.get("/runtime")
async def runtime(request: Request) -> Response:
    """This worker's process: resident memory, open file descriptors, asyncio tasks, threads (what a long run watches)."""
    require_admin(request)
    tasks = len(asyncio.all_tasks())
    rss, fds = await asyncio.to_thread(_process_figures)
    return json_response({"pid": os.getpid(), "rss_bytes": rss, "open_fds": fds, "asyncio_tasks": tasks, "threads": threading.active_count()})


def _process_figures() -> tuple[int | None, int | None]:
    """VmRSS and the open descriptors from /proc (None where there is no /proc)."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return rss, fds
