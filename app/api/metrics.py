"""``GET /metrics``: Prometheus text format, merged across worker processes in multiprocess mode."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.responses import Response

router = APIRouter()

#: the classic text format: every scraper reads it, and our names need nothing newer
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    """Set (by ``serve --workers N``) when every worker writes its samples to files in one directory."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _merged() -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    if multiprocess_dir():
        # reads one file per worker: off the event loop
        data = await asyncio.to_thread(_merged)
    else:
        services = request.app.state.services
        if services.telemetry is not None and "application/openmetrics-text" in request.headers.get("accept", ""):
            # what Prometheus asks for, and the one format with exemplars: a slow request's trace id on its bucket
            return Response(openmetrics.generate_latest(services.metrics.registry), media_type=openmetrics.CONTENT_TYPE_LATEST)
        data = generate_latest(services.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE)


def mark_worker_dead() -> None:
    """Drop this worker's live gauges (in-flight) from the merged view when it exits."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
