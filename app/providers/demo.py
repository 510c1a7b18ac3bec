"""A deterministic local responder, so the gateway does something useful with zero keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt

from app.config import ProviderConfig
from app.providers.base import UpstreamRequest
from app.vectors import floats_to_base64


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


class DemoProvider:
    """Answers every request (chat, and legacy text completions) with a fixed function of its messages or prompt, with token usage."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self._latency = config.latency_s

    async def start(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def _answer(self, request: UpstreamRequest) -> tuple[list[str], str, dict[str, int], str]:
        messages = request.payload["messages"]
        text = _last_user_text(messages)
        words = f"Admiral demo answer. You said: {text}".split()
        limit = request.payload.get("max_completion_tokens") or request.payload.get("max_tokens")
        finish = "stop"
        if limit is not None and len(words) > int(limit):
            words, finish = words[: int(limit)], "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 3 for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}
        digest = hashlib.sha256(repr(messages).encode()).hexdigest()[:24]
        return words, finish, usage, f"chatcmpl-demo-{digest}"

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]:
        if self._latency:
            await asyncio.sleep(self._latency)
        if request.endpoint == "completions":
            return _text_completion(request)
        if request.endpoint == "embeddings":
            return _embeddings(request)
        words, finish, usage, ident = self._answer(request)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]:
        if self._latency:
            await asyncio.sleep(self._latency)
        if request.endpoint == "completions":
            for event in _text_events(_text_completion(request)):
                yield event
            return
        words, finish, usage, ident = self._answer(request)
        base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": request.model}
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        for i, word in enumerate(words):
            yield {**base, "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "logprobs": None, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}
        yield {**base, "choices": [], "usage": usage}


# legacy text completions


def _prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a text, texts, a token array or several."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt) if isinstance(prompt, list) else [str(prompt)]


def _text_choice(index: int, prompt: str | list[int], payload: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    """One choice answering ``prompt``, with its prompt and completion token counts."""
    shown = prompt if isinstance(prompt, str) else f"<{len(prompt)} tokens>"
    words = f"Admiral demo answer. You said: {shown}".split()
    limit = payload.get("max_tokens")
    limit = 16 if limit is None else int(limit)
    finish = "stop"
    if len(words) > limit:
        words, finish = words[:limit], "length"
    echoed = prompt if payload.get("echo") and isinstance(prompt, str) else ""
    # after an echoed prompt the answer starts a new word
    pieces = [w if i == 0 and not echoed else " " + w for i, w in enumerate(words)]
    text = echoed + "".join(pieces)
    logprobs = None
    if payload.get("logprobs") is not None:
        # a deterministic stand-in: every token is certain
        offsets, at = [], len(echoed)
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        top = int(payload["logprobs"])
        logprobs = {"tokens": pieces, "token_logprobs": [0.0] * len(pieces), "top_logprobs": [{p: 0.0} if top else {} for p in pieces], "text_offset": offsets}
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split()) + 1
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}, prompt_tokens, len(words)


def _text_completion(request: UpstreamRequest) -> dict[str, Any]:
    payload = request.payload
    n = int(payload.get("n") or 1)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, prompt in enumerate(_prompts(payload.get("prompt"))):
        for j in range(n):
            choice, p, c = _text_choice(i * n + j, prompt, payload)
            choices.append(choice)
            completion_tokens += c
        prompt_tokens += p
    digest = hashlib.sha256(repr(payload.get("prompt")).encode()).hexdigest()[:24]
    return {
        "id": f"cmpl-demo-{digest}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


def _text_events(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A text completion streamed as OpenAI does: its text a token at a time, the finish, the usage."""
    base = {k: answer[k] for k in ("id", "object", "created", "model")}
    events = []
    for choice in answer["choices"]:
        logprobs = choice["logprobs"]
        text = choice["text"]
        pieces = logprobs["tokens"] if logprobs else text.split(" ")
        if not logprobs:
            pieces = [p if i == 0 else " " + p for i, p in enumerate(pieces)]
        echoed = text[: len(text) - len("".join(pieces))]
        if echoed:
            events.append({**base, "choices": [{"index": choice["index"], "text": echoed, "logprobs": None, "finish_reason": None}]})
        for k, piece in enumerate(pieces):
            entry = None
            if logprobs:
                entry = {key: [values[k]] for key, values in logprobs.items()}
            events.append({**base, "choices": [{"index": choice["index"], "text": piece, "logprobs": entry, "finish_reason": None}]})
        events.append({**base, "choices": [{"index": choice["index"], "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}]})
    events.append({**base, "choices": [], "usage": answer["usage"]})
    return events


# embeddings

#: a demo vector's length when the request names no ``dimensions``
DEMO_DIMENSIONS = 256


def demo_vector(item: str | list[int], dimensions: int) -> npt.NDArray[np.float32]:
    """A float32 unit vector that is a fixed function of the input (its SHA-3 stream), ``dimensions`` long."""
    seed = item.encode() if isinstance(item, str) else b"tokens:" + ",".join(map(str, item)).encode()
    values = np.frombuffer(hashlib.shake_256(seed).digest(2 * dimensions), dtype="<i2").astype(np.float64) + 0.5
    return (values / np.linalg.norm(values)).astype(np.float32)


def _embeddings(request: UpstreamRequest) -> dict[str, Any]:
    """An embeddings list: a deterministic vector per input, ``dimensions`` and ``encoding_format`` honoured."""
    payload = request.payload
    value = payload["input"]
    items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
    dimensions = int(payload.get("dimensions") or DEMO_DIMENSIONS)
    data = []
    tokens = 0
    for index, item in enumerate(items):
        vector = demo_vector(item, dimensions)
        tokens += (len(item.split()) or 1) if isinstance(item, str) else len(item)
        data.append({"object": "embedding", "index": index, "embedding": floats_to_base64(vector) if payload.get("encoding_format") == "base64" else vector.tolist()})
    return {"object": "list", "data": data, "model": request.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
