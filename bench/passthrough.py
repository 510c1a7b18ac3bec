"""The floor of any Python gateway: FastAPI + one shared aiohttp session, bytes in, bytes out.

Run: ``BENCH_UPSTREAM_URL=http://127.0.0.1:PORT/v1/chat/completions uvicorn passthrough:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request, Response


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.upstream = os.environ["BENCH_UPSTREAM_URL"]
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


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
