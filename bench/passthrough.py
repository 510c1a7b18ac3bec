"""The floor of any Python gateway: FastAPI + one shared aiohttp session, bytes in, bytes out.

``POST /v1/chat/completions`` forwards the body and answers the upstream's bytes.
``POST /stream/v1/chat/completions`` forwards the body to the upstream's streaming path and relays
its SSE answer as it arrives, each read from the upstream sent on at once without looking into it:
the least any streaming relay does. (A model's stream comes an event or a few per read; the static
upstream's arrives in one or two reads, and the gateway, which writes the chunks of one read in one
go, relays it with as few socket writes. Splitting it into events and writing each alone would
cost the baseline some 40 writes a stream the gateway does not pay.)

Run: ``BENCH_UPSTREAM_URL=http://127.0.0.1:PORT/v1/chat/completions
BENCH_UPSTREAM_STREAM_URL=http://127.0.0.1:PORT/stream/v1/chat/completions uvicorn passthrough:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.upstream = os.environ["BENCH_UPSTREAM_URL"]
    app.state.stream_upstream = os.environ.get("BENCH_UPSTREAM_STREAM_URL", "")
    app.state.session = aiohttp.ClientSession(headers={"Content-Type": "application/json"})
    yield
    await app.state.session.close()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    async with request.app.state.session.post(request.app.state.upstream, data=body) as resp:
        data = await resp.read()
        return Response(data, status_code=resp.status, media_type="application/json")


@app.post("/stream/v1/chat/completions")
async def chat_stream(request: Request) -> Response:
    body = await request.body()
    resp = await request.app.state.session.post(request.app.state.stream_upstream, data=body)
    return StreamingResponse(_relay(resp), status_code=resp.status, media_type="text/event-stream")


async def _relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async with resp:
        async for data in resp.content.iter_any():
            yield data


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
