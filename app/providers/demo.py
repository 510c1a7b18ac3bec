"""A deterministic local responder, so the gateway does something useful with zero keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

from app.config import ProviderConfig
from app.providers.base import UpstreamRequest


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


class DemoProvider:
    """Answers every request with a fixed function of its messages, with token usage."""

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
        words, finish, usage, ident = self._answer(request)
        base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": request.model}
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        for i, word in enumerate(words):
            yield {**base, "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}, "logprobs": None, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}
        yield {**base, "choices": [], "usage": usage}
