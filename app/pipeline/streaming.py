"""Conversions between a complete ``chat.completion`` and a stream of ``chat.completion.chunk``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


async def chunks_from_completion(body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Replay a complete answer as chunks: role, content, finish (with tool calls), usage."""
    base = {"id": body.get("id", ""), "object": "chat.completion.chunk", "created": body.get("created", 0), "model": body.get("model", "")}
    if body.get("system_fingerprint"):
        base["system_fingerprint"] = body["system_fingerprint"]
    choices = body.get("choices") or []
    yield {**base, "choices": [{"index": c.get("index", i), "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i, c in enumerate(choices)]}
    for i, choice in enumerate(choices):
        message = choice.get("message") or {}
        delta: dict[str, Any] = {}
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{**tc, "index": n} for n, tc in enumerate(message["tool_calls"])]
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        if delta:
            yield {**base, "choices": [{"index": choice.get("index", i), "delta": delta, "logprobs": None, "finish_reason": None}]}
    yield {**base, "choices": [{"index": c.get("index", i), "delta": {}, "logprobs": None, "finish_reason": c.get("finish_reason") or "stop"} for i, c in enumerate(choices)]}
    if body.get("usage"):
        yield {**base, "choices": [], "usage": body["usage"]}


class ChunkAssembler:
    """Folds chunks back into one ``chat.completion``; ``finished`` once every choice has a finish_reason."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint") if chunk.get(k) is not None}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            state = self._choices.setdefault(choice.get("index", 0), {"content": [], "tool_calls": {}, "finish_reason": None, "role": "assistant"})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                state["content"].append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = state["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]

    @property
    def finished(self) -> bool:
        return bool(self._choices) and all(c["finish_reason"] for c in self._choices.values())

    def result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state["content"]) or None}
            if state["tool_calls"]:
                message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
            elif message["content"] is None:
                message["content"] = ""
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": state["finish_reason"]})
        body = {**self._head, "object": "chat.completion", "choices": choices}
        if self.usage:
            body["usage"] = self.usage
        return body
