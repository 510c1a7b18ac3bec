"""Helpers shared by the hostile-input, fault, secrets and lifecycle tests."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, free_port

AGENT_KEY = "sk-agent-hostile-0001"
PROVIDER_KEY = "sk-provider-hostile-secret-7777"
AUTH = {"Authorization": f"Bearer {AGENT_KEY}"}
HELLO = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}

#: the statuses the OpenAI SDK maps to its typed exceptions, plus the ones it retries
OPENAI_STATUSES = frozenset({400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504})


def config(up: FakeUpstream, *, extra: str = "", provider: str = "", fast: str = "[up/fake-model]") -> str:
    """A gateway with one key, the fake upstream as ``up`` (and ``fast``), and the demo provider."""
    return f"""
keys:
  - {{key: {AGENT_KEY}, agent: hostile}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 10{provider}}}
  demo: {{kind: demo}}
models:
  fast: {fast}
  demo: [demo/echo]
routing: {{default: fast}}
{extra}
"""


def assert_openai_error(r: httpx.Response, status: int | None = None, *, param: str | None | type[Any] = Any, contains: str = "") -> dict[str, Any]:
    """The response is an error in OpenAI's shape (with ``status`` when given); returns ``error``."""
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    assert 400 <= r.status_code < 600, r.status_code
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not Any:
        assert err["param"] == param, err
    if contains:
        assert contains in err["message"], err
    return err


def metric_sum(gw: GatewayServer, name: str, **labels: str) -> float:
    """Sum of a sample of the gateway's own registry over the series matching ``labels``."""
    total = 0.0
    for family in gw.services.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def server_errors(gw: GatewayServer) -> float:
    """Chat requests the gateway answered with a 5xx of its own making (not upstream's)."""
    return metric_sum(gw, "admiral_requests_total", status="500")


def inflight(gw: GatewayServer) -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_inflight_requests") or 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until ``condition()`` holds; fail after ``timeout`` seconds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_http(port: int, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (headers httpx would refuse) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def free_port_url() -> str:
    """``127.0.0.1:PORT`` where nothing listens: connecting there is refused."""
    return f"127.0.0.1:{free_port()}"


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


class HostileUpstream(FakeUpstream):
    """The fake upstream plus answers a careless or broken provider gives (``hostile`` wins when set).

    ``echo-json:CODE``  HTTP CODE, an OpenAI error whose message repeats the request's credentials
    ``echo-text:CODE``  HTTP CODE, a text body repeating them across the 200th byte
    ``echo-stream``     a stream whose second event is an error repeating them
    ``odd-error:CODE``  HTTP CODE with ``{"error": {"message": <not a string>}}``
    ``odd-stream``      a stream whose second event is ``{"error": {"message": 42}}``
    ``gated``           answers as usual once the test sets ``gate`` (a threading.Event)
    """

    hostile: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    @staticmethod
    def _credentials(request: Any) -> str:
        return " ".join(f"{k}={v}" for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key"))

    async def _answer(self, request: Any, body: Any, rid: str) -> Any:
        from aiohttp import web

        spec = self.hostile
        if not spec:
            return await super()._answer(request, body, rid)
        name, _, arg = spec.partition(":")
        if name == "gated":
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            return await super()._answer(request, body, rid)
        status = int(arg or 200)
        creds = self._credentials(request)
        if name == "echo-json":
            return web.json_response({"error": {"message": f"bad request from {creds}", "type": "x", "param": None, "code": None}}, status=status)
        if name == "echo-text":
            pad = "x" * (200 - len("denied: ") - 12)
            return web.Response(text=f"denied: {pad}{creds} and more", status=status)
        if name == "odd-error":
            return web.json_response({"error": {"message": {"nested": [1, 2]}, "type": None}}, status=status)
        if name in ("echo-stream", "odd-stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            first = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "x"}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(first)}\n\n".encode())
            message: Any = f"stream broke for {creds}" if name == "echo-stream" else 42
            await resp.write(f"data: {json.dumps({'error': {'message': message}})}\n\n".encode())
            await resp.write_eof()
            return resp
        raise ValueError(f"unknown hostile behaviour {spec!r}")
