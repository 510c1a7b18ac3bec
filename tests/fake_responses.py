"""The fake upstream's ``POST /v1/responses``: OpenAI's Responses API, for providers with ``responses: native``.

Counted in ``up.calls`` and recorded in ``up.requests`` like a chat request; latency, hold and the
behaviours ``ok``, ``status:CODE``, ``429[:S]``, ``hang`` and ``cut`` (the stream stops after its
first delta, the socket closed) apply. The answer echoes the last user input, ``"echo: <text>"``,
as a ``response`` object or, with ``stream: true``, as the event sequence OpenAI sends (``event:``
and ``data:`` lines, numbered). ``up.responses_answers = {model: response}`` answers a request for
that model with the given response object instead (streamed as its items' events);
``up.responses_failures = {model: error}`` fails it with ``error`` (``{"code", "message"}``): a
plain request gets a ``failed`` response, a stream an ``error`` event after its first delta (a
``response.failed`` event when the error's code is ``"response.failed"``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def echo_response(body: dict[str, Any], rid: str) -> dict[str, Any]:
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else [i for i in items or () if isinstance(i, dict)]
    users = [i for i in items if i.get("role") == "user"]
    text = "echo: " + (_text(users[-1].get("content")) if users else "")
    prompt = sum(len(_text(i.get("content")).split()) for i in items)
    message = {
        "id": f"msg_{rid}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body.get("model"),
        "output": [message],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(text.split()),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + len(text.split()),
        },
    }


def events_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The events OpenAI streams for ``response``: its text a word a delta, a reasoning summary and a
    function call's arguments in one each, any other item added and done whole."""
    shell = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": shell}, {"type": "response.in_progress", "response": shell}]
    for n, item in enumerate(response["output"]):
        if item["type"] == "message":
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "status": "in_progress", "content": []}})
            for c, part in enumerate(item["content"]):
                where = {"item_id": item["id"], "output_index": n, "content_index": c}
                events.append({"type": "response.content_part.added", **where, "part": {**part, "text": ""}})
                words = part["text"].split(" ")
                events += [{"type": "response.output_text.delta", **where, "delta": w if i == 0 else " " + w, "logprobs": []} for i, w in enumerate(words)]
                events.append({"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []})
                events.append({"type": "response.content_part.done", **where, "part": part})
        elif item["type"] == "reasoning":
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "summary": []}})
            for c, part in enumerate(item.get("summary") or ()):
                where = {"item_id": item["id"], "output_index": n, "summary_index": c}
                events.append({"type": "response.reasoning_summary_text.delta", **where, "delta": part["text"]})
                events.append({"type": "response.reasoning_summary_text.done", **where, "text": part["text"]})
        elif item["type"] == "function_call":
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "status": "in_progress", "arguments": ""}})
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": n, "delta": item["arguments"]})
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": n, "arguments": item["arguments"]})
        else:
            # a built-in tool's call (web_search_call, ...): added in progress, done as it is
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "status": "in_progress"}})
        events.append({"type": "response.output_item.done", "output_index": n, "item": item})
    events.append({"type": "response.completed" if response.get("status", "completed") == "completed" else "response.incomplete", "response": response})
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


async def answer_responses(fake: Any, request: web.Request) -> web.StreamResponse:
    """The handler behind the fake's ``/v1/responses`` (``fake`` is the :class:`tests.fake_upstream.FakeUpstream`)."""
    from tests.fake_upstream import _error

    try:
        body: Any = await request.json()
    except ValueError:
        body = None
    fake._record(request, body)
    with fake._lock:
        fake.calls += 1
        rid = f"resp_fake_{next(fake._ids)}"
    behaviour = fake._choose(body)
    if fake.latency:
        await asyncio.sleep(fake.latency)
    await fake._pass_gate()
    if not isinstance(body, dict) or not isinstance(body.get("input"), (str, list)):
        return _error(400)
    if behaviour.name == "status":
        return _error(int(behaviour.arg))
    if behaviour.name == "429":
        return _error(429, {"Retry-After": f"{behaviour.arg:g}"})
    if behaviour.name == "hang":
        await asyncio.Event().wait()
    scripted = getattr(fake, "responses_answers", {}).get(body.get("model"))
    response = dict(scripted) if scripted is not None else echo_response(body, rid)
    failure = getattr(fake, "responses_failures", {}).get(body.get("model"))
    if failure is not None and not body.get("stream"):
        return web.json_response({**response, "status": "failed", "error": failure, "output": []})
    if not body.get("stream"):
        return web.json_response(response)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in events_of(response):
        line = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
        if failure is not None and event["type"].endswith(".delta"):
            # in the same write: the gateway reads the delta and the failure together
            seq = event["sequence_number"] + 1
            error = {"type": "error", **failure, "param": None, "sequence_number": seq}
            if failure.get("code") == "response.failed":
                # told the other way OpenAI tells it: the response, failed
                error = {"type": "response.failed", "response": {**response, "status": "failed", "error": failure}, "sequence_number": seq}
            await resp.write((line + f"event: {error['type']}\ndata: {json.dumps(error)}\n\n").encode())
            break
        await resp.write(line.encode())
        if behaviour.name == "cut" and event["type"].endswith(".delta"):
            if request.transport is not None:
                request.transport.close()
            resp.force_close()
            return resp
    await resp.write_eof()
    return resp
