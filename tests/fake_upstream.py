"""A fake OpenAI-compatible provider: a real aiohttp server on loopback, in its own thread.

    with FakeUpstream() as up:          # or up.start() / up.stop()
        up.base_url                      # "http://127.0.0.1:PORT/v1"
        up.behaviour = "500"             # global behaviour (validated on assignment)
        up.script(["429:2", "ok"])       # per-call queue, popped by each chat request
        up.by_model = {"bad": "hang"}    # wins over script and global for that request model
        up.latency = 0.05                # slept on every request, before the behaviour
        up.answers = {"m": (P, C)}       # a request for model "m" is answered with P / chunks C
        up.hold(); ...; up.release()     # chat requests wait (counted in up.held) until released
        up.calls, up.requests, up.inflight, up.peak_inflight, up.cancelled, up.held, up.reset()

Behaviour syntax is ``name`` or ``name:arg`` (or a ``Behaviour`` instance):

    ok               200; chat.completion echoing "echo: <last user text>", or SSE if stream=true
    slow:S           like ok, after S seconds of silence (before headers / the first chunk)
    dribble:S        like ok, S seconds between stream chunks (plain: one S wait)
    500              HTTP 500 with an OpenAI error body
    status:CODE      HTTP CODE with an OpenAI error body (400, 401, 403, 404, 503, ...); 400 is
                     OpenAI's refusal of a prompt too long (``context_length_exceeded``)
    refuse           HTTP 400 ``invalid_request_error`` naming ``temperature``: a plain client mistake
    429[:S]          HTTP 429 with ``Retry-After: S`` (default 1; fractions sent as given, e.g. 0.2)
    429-noretry      HTTP 429 without Retry-After
    hang             never answers; ends only when the client leaves or the server stops
    badjson          200, content-type application/json, body that is not JSON
    wrongshape       200 with valid JSON that is not a chat completion: {"foo": 1}
    cut              stream: role chunk + one content chunk, then the socket is closed;
                     plain: headers with the full content-length, half the body, then closed
    nodone           stream with everything (finish_reason, usage) except ``data: [DONE]``

What an answer says: by default the echo above; for a request whose ``model`` is a key of
``up.answers``, that provider answer instead: a pair ``(P, C)`` (or an object with ``completion``
and ``chunks``) of a whole ``chat.completion`` P, sent as it is (its own id and model) to a plain
request, and the ``chat.completion.chunk`` list C the provider streams for it with
``stream_options.include_usage`` (the last chunk has ``choices: []`` and the usage). A streamed
request gets C as ``data:`` lines and ``data: [DONE]``, without the usage chunk and the chunks'
``usage`` keys unless it asked ``stream_options.include_usage`` (:func:`streamed_as`), as OpenAI
does. The behaviour still decides how the answer is given: ``slow``, ``dribble``, ``cut`` and
``nodone`` apply to provider answers too, and the error behaviours replace them.

``up.hold()`` makes every chat request arriving afterwards wait, once counted in ``up.calls`` and
after ``latency``, until ``up.release()``; ``up.held`` is how many wait now. Tests use it to make
requests overlap without depending on timing.

A plain ``ok`` answer sets a cookie (``upstream-session``), as providers behind a CDN do.
``GET /v1/models`` always answers ``up.models`` (latency applies). Every answer carries the
headers in ``up.response_headers`` (a provider's ``x-ratelimit-*`` announcements, say). Every request is recorded in
``up.requests`` (header names lower-cased); ``up.calls`` counts model requests (chat and those below).
``up.cancelled`` counts chat requests whose client went away before the response was complete.
A request without a ``messages`` list gets a 400 whatever the behaviour.

``POST /v1/completions`` (legacy text completions) takes the same behaviours, ``up.answers``, hold
and counters (``up.calls`` counts it too; ``up.completion_requests`` lists it): its own answer is
a ``text_completion`` with the text ``"echo: <prompt>"`` (a token array's JSON), streamed a word
an event; a request without a ``prompt`` gets a 400.

``POST /v1/embeddings`` takes the same behaviours, hold and counters (``up.calls`` counts it;
``up.embedding_requests`` lists it): each input (a string or a token array) gets a unit vector
that is a fixed function of it (:func:`fake_vector`, ``dimensions`` long, default 8), as floats
or, with ``encoding_format: base64``, as base64 float32; usage counts words (token arrays: ids).
A request without an ``input`` gets a 400.

Provider quirks, checked before the behaviour: ``up.refuse_params = {"logprobs", ...}`` answers
400 ``unsupported_parameter`` naming the first such body field a request carries (``n`` only when
above 1, ``messages[].name`` in any message), as Groq, Cerebras or Mistral refuse what they do not
take; ``up.context_limit = N`` answers a request whose messages (or prompt) hold more than N words
with the context-length 400 ``up.context_error`` gives as ``(message, code)`` (OpenAI's wording
by default; ``{limit}`` and ``{words}`` in the message are filled in). ``up.error_shape = "top"``
gives these refusals (and ``refuse``'s) in Mistral's shape, the fields at the top of the body
(``{"object": "error", "message": ..., "type": ..., "param": ..., "code": ...}``) instead of
under ``error``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web

from tests.fake_responses import answer_responses

_NAMES = frozenset(
    {"ok", "slow", "dribble", "status", "429", "429-noretry", "refuse"}
    | {"hang", "badjson", "wrongshape", "cut", "nodone"}
)
_NEEDS_ARG = frozenset({"slow", "dribble", "status"})
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


@dataclass(frozen=True)
class Behaviour:
    """One scripted way of answering a chat request."""

    name: str
    arg: float = 0.0

    @classmethod
    def parse(cls, spec: str | Behaviour) -> Behaviour:
        if isinstance(spec, Behaviour):
            return spec
        name, _, arg = spec.partition(":")
        if name == "500":
            return cls("status", 500)
        if name not in _NAMES or (name in _NEEDS_ARG and not arg):
            raise ValueError(f"unknown fake upstream behaviour: {spec!r}")
        return cls(name, float(arg) if arg else 1.0 if name == "429" else 0.0)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _error(status: int, headers: dict[str, str] | None = None) -> web.Response:
    kind = _ERROR_TYPES.get(status, "server_error")
    error = {"message": f"fake upstream error {status}", "type": kind, "param": None, "code": None}
    if status == 400:
        # as OpenAI refuses a prompt longer than the model's context
        error.update(type="invalid_request_error", param="messages", code="context_length_exceeded")
    return web.json_response({"error": error}, status=status, headers=headers)


_CONTEXT_ERROR = ("This model's maximum context length is {limit} tokens. However, your messages resulted in {words} tokens.", "context_length_exceeded")


def _client_error(message: str, code: str | None, param: str | None, shape: str = "nested") -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.json_response({"object": "error", **error} if shape == "top" else {"error": error}, status=400)


def _refused(body: dict[str, Any], refuse: set[str]) -> str | None:
    for name in sorted(refuse):
        field = name.removeprefix("messages[].")
        if field != name:
            if any(isinstance(m, dict) and field in m for m in body.get("messages") or ()):
                return name
        elif name == "n":
            if isinstance(body.get("n"), int) and body["n"] > 1:
                return name
        elif name in body:
            return name
    return None


def streamed_as(chunks: Iterable[dict[str, Any]], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks a provider streams to a request that asked ``include_usage`` or not.

    ``chunks`` is the stream with ``include_usage``; without it, as OpenAI does, the usage-only
    chunk (``choices: []``) is left out and no other chunk carries a ``usage`` key.
    """
    if include_usage:
        return [dict(c) for c in chunks]
    return [{k: v for k, v in c.items() if k != "usage"} for c in chunks if c.get("choices") or c.get("usage") is None]


def _pair(answer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if isinstance(answer, tuple):
        completion, chunks = answer
    else:
        completion, chunks = answer.completion, answer.chunks
    return completion, list(chunks)


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> Any:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


class FakeUpstream:
    """An OpenAI-compatible HTTP server on 127.0.0.1 with scripted behaviours and a recorder."""

    def __init__(self, behaviour: str | Behaviour = "ok", *, latency: float = 0.0) -> None:
        self.behaviour = behaviour
        self.by_model: dict[str, str | Behaviour] = {}
        self.latency = latency
        self.answers: dict[str, Any] = {}
        self.models: list[str] = ["fake-model"]
        #: headers added to every answer (e.g. the ``x-ratelimit-*`` limits a provider announces)
        self.response_headers: dict[str, str] = {}
        self.refuse_params: set[str] = set()
        self.context_limit: int | None = None
        self.context_error: tuple[str, str | None] = _CONTEXT_ERROR
        #: "nested" (OpenAI's ``{"error": {...}}``) or "top" (Mistral's fields at the top) for client errors
        self.error_shape = "nested"
        # counters are written under the lock by the server thread; reading them needs none
        self.calls = self.inflight = self.peak_inflight = self.cancelled = self.held = 0
        self._gate: asyncio.Event | None = None  # closed while set and not yet set(); loop thread only
        self.port = 0
        self._lock = threading.Lock()
        self._script: deque[str | Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)  # never reset: equal ids must mean the same answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def behaviour(self) -> str | Behaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, spec: str | Behaviour) -> None:
        Behaviour.parse(spec)  # a typo must fail in the test, not as a puzzling HTTP 500
        self._behaviour = spec

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def completion_requests(self) -> list[RecordedRequest]:
        """Requests to the legacy ``/v1/completions``."""
        return [r for r in self.requests if r.path == "/v1/completions"]

    @property
    def embedding_requests(self) -> list[RecordedRequest]:
        """Requests to ``/v1/embeddings``."""
        return [r for r in self.requests if r.path == "/v1/embeddings"]

    def script(self, behaviours: Iterable[str | Behaviour]) -> None:
        """Replace the per-call queue (validated now, so typos fail in the test)."""
        items = list(behaviours)
        for b in items:
            Behaviour.parse(b)
        with self._lock:
            self._script = deque(items)

    def reset(self, *, behaviours: bool = True) -> None:
        """Clear recordings and counters; with ``behaviours`` also script, overrides, latency,
        provider answers and a hold (requests held are let go)."""
        with self._lock:
            self._requests.clear()
            self.calls = self.cancelled = 0
            self.peak_inflight = self.inflight
            if behaviours:
                self._script.clear()
                self.behaviour, self.by_model, self.latency, self.answers = "ok", {}, 0.0, {}
                self.refuse_params, self.context_limit, self.context_error = set(), None, _CONTEXT_ERROR
                self.error_shape = "nested"
        if behaviours:
            self.release()

    def hold(self) -> None:
        """Chat requests arriving from now on wait (counted in ``held``) until :meth:`release`."""
        self._on_loop(self._close_gate)

    def release(self) -> None:
        """Let every held request go on, and stop holding new ones."""
        if self._loop is not None:
            self._on_loop(self._open_gate)

    def _close_gate(self) -> None:
        if self._gate is None:
            self._gate = asyncio.Event()

    def _open_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def _on_loop(self, action: Any) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake upstream is not running")

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=5)

    async def _pass_gate(self) -> None:
        gate = self._gate
        if gate is None:
            return
        with self._lock:
            self.held += 1
        try:
            await gate.wait()
        finally:
            with self._lock:
                self.held -= 1

    def _choose(self, body: Any) -> Behaviour:
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            if isinstance(model, str) and model in self.by_model:
                spec = self.by_model[model]
            elif self._script:
                spec = self._script.popleft()
            else:
                spec = self._behaviour
        return Behaviour.parse(spec)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        self._stopping = False
        self._loop = loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=10)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)  # legacy text completions
        app.router.add_post("/v1/embeddings", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.on_response_prepare.append(self._announce)
        # the Responses API, for providers with responses: native (tests/fake_responses.py)
        app.router.add_post("/v1/responses", self._responses)
        # handler_cancellation: a client disconnect must cancel the handler, so it is counted
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        # a deep backlog: load tests open hundreds of connections at once
        await web.TCPSite(self._runner, "127.0.0.1", 0, backlog=2048).start()
        self.port = self._runner.addresses[0][1]

    async def _announce(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self.response_headers)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
            self._loop = self._thread = None

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- handlers ---------------------------------------------------------------------------

    def _record(self, request: web.Request, body: Any) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        entry = RecordedRequest(request.method, request.path, headers, body, time.monotonic())
        with self._lock:
            self._requests.append(entry)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await answer_responses(self, request)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        if self.latency:
            await asyncio.sleep(self.latency)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        self._record(request, body)
        with self._lock:
            self.calls += 1
            seq = next(self._ids)
            self.inflight += 1
            self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            return await self._answer(request, body, f"chatcmpl-fake-{seq}")
        except (asyncio.CancelledError, ConnectionError):
            if not self._stopping:
                with self._lock:
                    self.cancelled += 1
            raise
        finally:
            with self._lock:
                self.inflight -= 1
            self._tasks.discard(task)

    async def _answer(self, request: web.Request, body: Any, rid: str) -> web.StreamResponse:
        behaviour = self._choose(body)
        name, arg = behaviour.name, behaviour.arg
        if self.latency:
            await asyncio.sleep(self.latency)
        await self._pass_gate()
        text = request.path == "/v1/completions"
        embed = request.path == "/v1/embeddings"
        if embed and not (isinstance(body, dict) and isinstance(body.get("input"), (str, list))):
            return _error(400)
        if not embed and (not isinstance(body, dict) or not isinstance(body.get("prompt" if text else "messages"), (str, list) if text else list)):
            return _error(400)
        refused = _refused(body, self.refuse_params)
        if refused is not None:
            return _client_error(f"{refused} is not supported by this model", "unsupported_parameter", refused, self.error_shape)
        if self.context_limit is not None:
            said = [m.get("content") for m in body.get("messages") or () if isinstance(m, dict)] or [body.get("prompt") or body.get("input")]
            words = sum(len(_text(c).split()) for c in said)
            if words > self.context_limit:
                message, code = self.context_error
                return _client_error(message.format(limit=self.context_limit, words=words), code, "messages" if code else None, self.error_shape)
        if name == "refuse":
            return _client_error("temperature must be at most 2", "invalid_value", "temperature", self.error_shape)
        if name == "status":
            return _error(int(arg))
        if name == "429":
            return _error(429, {"Retry-After": f"{arg:g}"})
        if name == "429-noretry":
            return _error(429)
        if name == "hang":
            await asyncio.Event().wait()
        if name == "badjson":
            return web.Response(body=b'{"id": "chatcmpl-', content_type="application/json")
        if name == "wrongshape":
            return web.json_response({"foo": 1})
        if name == "slow":
            await asyncio.sleep(arg)
        if embed:
            return await self._send_plain(request, behaviour, _embeddings(body), rid)

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        model = body.get("model")
        answer = self.answers.get(model) if isinstance(model, str) else None
        if answer is not None:
            completion, chunks = _pair(answer)
            if body.get("stream"):
                return await self._send_events(request, behaviour, streamed_as(chunks, include_usage))
            return await self._send_plain(request, behaviour, completion, rid)

        if text:
            return await self._text_completion(request, behaviour, body, rid.replace("chatcmpl", "cmpl"), include_usage)
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        user = [m for m in messages if m.get("role") == "user"]
        content = "echo: " + (_text(user[-1].get("content")) if user else "")
        prompt = sum(len(_text(m.get("content")).split()) for m in messages)
        completion_tokens = len(content.split())
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
        head = {"id": rid, "created": int(time.time()), "model": body.get("model", "")}
        if body.get("stream"):
            return await self._send_events(request, behaviour, _echo_events(head, content, usage, include_usage))
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        payload = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        return await self._send_plain(request, behaviour, payload, rid)

    async def _text_completion(
        self, request: web.Request, behaviour: Behaviour, body: Any, rid: str, include_usage: bool
    ) -> web.StreamResponse:
        prompt = body["prompt"]
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt)
        text = "echo: " + shown
        prompt_tokens = len(shown.split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()), "total_tokens": prompt_tokens + len(text.split())}
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.get("model", "")}
        if body.get("stream"):
            if include_usage:
                head = {**head, "usage": None}
            words = text.split(" ")
            events = [{**head, "choices": [{"index": 0, "text": w if i == 0 else " " + w, "logprobs": None, "finish_reason": None}]} for i, w in enumerate(words)]
            events.append({**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
            if include_usage:
                events.append({**head, "choices": [], "usage": usage})
            return await self._send_events(request, behaviour, events)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        return await self._send_plain(request, behaviour, {**head, "choices": [choice], "usage": usage}, rid)

    async def _send_plain(
        self, request: web.Request, behaviour: Behaviour, payload: Any, rid: str
    ) -> web.StreamResponse:
        if behaviour.name == "dribble":
            await asyncio.sleep(behaviour.arg)
        if behaviour.name != "cut":
            # as providers behind a CDN do: a client that keeps cookies sends this one back
            return web.json_response(payload, headers={"Set-Cookie": f"upstream-session={rid}; Path=/"})
        raw = json.dumps(payload).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(raw)
        await resp.prepare(request)
        await resp.write(raw[: len(raw) // 2])
        return _abort(request, resp)

    async def _send_events(
        self, request: web.Request, behaviour: Behaviour, events: list[Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        delay = behaviour.arg if behaviour.name == "dribble" else 0.0
        for i, event in enumerate(events):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            if behaviour.name == "cut" and i == 1:
                return _abort(request, resp)
        if behaviour.name != "nodone":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _echo_events(
    head: dict[str, Any], content: str, usage: dict[str, int], include_usage: bool
) -> list[Any]:
    if include_usage:  # as OpenAI does: every chunk carries usage, null until the last
        head = {**head, "usage": None}
    words = content.split(" ")
    events = [_chunk(head, {"role": "assistant", "content": ""})]
    events += [_chunk(head, {"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    events.append(_chunk(head, {}, "stop"))
    if include_usage:
        events.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    return events


def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    # close() still flushes what was written, so the client sees a body cut mid-way
    if request.transport is not None:
        request.transport.close()
    resp.force_close()
    return resp


def fake_vector(item: str | list[int], dimensions: int = 8) -> list[float]:
    """The unit vector the fake answers for an input: a fixed function of it (exact in float32)."""
    seed = hashlib.sha256(json.dumps(item).encode()).digest()
    values = [float(seed[i % len(seed)] - 128) or 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values))
    return list(array("f", [v / norm for v in values]))


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    value = body["input"]
    items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
    dimensions = int(body.get("dimensions") or 8)
    data = []
    for index, item in enumerate(items):
        vector = fake_vector(item, dimensions)
        encoded: Any = base64.b64encode(array("f", vector).tobytes()).decode() if body.get("encoding_format") == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in items)
    return {"object": "list", "data": data, "model": body.get("model", ""), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
