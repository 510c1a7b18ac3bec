"""The ceiling for cache hits: a bare FastAPI endpoint that reads the body and answers a constant."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fixtures import completion

BODY = completion().encode()

app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
