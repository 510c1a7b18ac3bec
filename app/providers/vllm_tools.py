"""Tool calls read out of what the in-process vLLM engine generated, plain and streamed.

``auto``: the configured vLLM tool parser (``hermes``, ...) finds calls in the model's own format.
``named`` / ``required``: structured outputs made the whole answer JSON (the arguments for a named
function; a list of ``{"name", "parameters"}`` for ``required``), read here without a parser.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from app.providers.vllm_params import RequestPlan

log = logging.getLogger(__name__)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {"id": call_id or _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _required_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls of a complete ``required`` answer; None when it is cut short or not the forced shape."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return None
    return [_call(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]


def _delta_call(delta: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"index": delta.index}
    if delta.id:
        out["id"] = delta.id
    if delta.type:
        out["type"] = delta.type
    function = delta.function
    if function is not None:
        out["function"] = {k: v for k in ("name", "arguments") if (v := getattr(function, k, None)) is not None}
    return out


class ToolCallReader:
    """Reads one choice's tool calls; make one per choice (vLLM's parsers keep per-answer state)."""

    def __init__(self, plan: RequestPlan, parser_class: Any, tokenizer: Any) -> None:
        self._plan = plan
        self._parser = parser_class(tokenizer, plan.vllm_request.tools) if plan.mode == "auto" else None
        self.called = False
        # streaming state
        self._text = ""
        self._token_ids: list[int] = []
        self._sent_content = ""
        self._named_started = False

    def finish_reason(self, reason: str) -> str:
        # OpenAI: "tool_calls" when the model chose to call (auto, required); a named call ends with "stop"
        if self.called and reason == "stop" and self._plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    # a whole answer

    def message(self, text: str) -> dict[str, Any]:
        """The assistant message for a complete answer."""
        plan = self._plan
        calls: list[dict[str, Any]] | None = None
        content: str | None = text
        if plan.mode == "named":
            # cut short by max_tokens the arguments are incomplete, as OpenAI returns them then too
            calls, content = [_call(plan.function or "", text)], None
        elif plan.mode == "required":
            calls = _required_calls(text)
            if calls is not None:
                content = None
        elif plan.mode == "auto":
            info = self._extract(text)
            if info is not None and info.tools_called:
                calls = [_call(c.function.name, c.function.arguments, c.id) for c in info.tool_calls]
                content = info.content if info.content and info.content.strip() else None
        if not calls:
            return {"role": "assistant", "content": content}
        if plan.single_call:
            calls = calls[:1]
        self.called = True
        return {"role": "assistant", "content": content, "tool_calls": calls}

    def _extract(self, text: str) -> Any:
        try:
            return self._parser.extract_tool_calls(text, request=self._plan.vllm_request)  # type: ignore[union-attr]
        except Exception:  # a parser failing on odd output leaves the text as content, as vLLM's parsers do
            log.exception("vLLM tool parser failed; answering the text as content")
            return None

    # a streamed answer

    def feed(self, delta_text: str, delta_ids: list[int], finished: bool) -> dict[str, Any] | None:
        """The chunk delta for the next piece of one choice's answer, or None when nothing is to be sent yet."""
        previous_text, previous_ids = self._text, self._token_ids
        self._text, self._token_ids = previous_text + delta_text, previous_ids + list(delta_ids)
        mode = self._plan.mode
        if mode == "off":
            return {"content": delta_text} if delta_text else None
        if mode == "named":
            return self._feed_named(delta_text, finished)
        if mode == "required":
            # the forced list is sent once complete: its calls are only known then
            if not finished:
                return None
            message = self.message(self._text)
            if "tool_calls" in message:
                return {"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
            return {"content": self._text} if self._text else None
        return self._feed_auto(previous_text, previous_ids, delta_text, delta_ids, finished)

    def _feed_named(self, delta_text: str, finished: bool) -> dict[str, Any] | None:
        if self._named_started:
            return {"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]} if delta_text else None
        if not delta_text and not finished:
            return None
        self._named_started = self.called = True
        return {"tool_calls": [{"index": 0, **_call(self._plan.function or "", delta_text)}]}

    def _feed_auto(self, previous_text: str, previous_ids: list[int], delta_text: str, delta_ids: list[int], finished: bool) -> dict[str, Any] | None:
        parser = self._parser
        try:
            message = parser.extract_tool_calls_streaming(  # type: ignore[union-attr]
                previous_text, self._text, delta_text, previous_ids, self._token_ids, list(delta_ids), self._plan.vllm_request
            )
        except Exception:  # as for a whole answer: the text goes out as content
            log.exception("vLLM tool parser failed while streaming; sending the text as content")
            message = None
        delta: dict[str, Any] = {}
        calls = [_delta_call(c) for c in (message.tool_calls if message is not None else ())]
        if message is not None and message.content:
            delta["content"] = message.content
            self._sent_content += message.content
        if finished and (self.called or calls):
            # arguments the parser has read but not yet sent (its last piece arrives with the end)
            rest = parser.get_remaining_unstreamed_args()  # type: ignore[union-attr]
            if rest:
                if calls and "function" in calls[-1]:
                    calls[-1]["function"]["arguments"] = calls[-1]["function"].get("arguments", "") + rest
                else:
                    calls.append({"index": len(parser.prev_tool_call_arr) - 1, "function": {"arguments": rest}})  # type: ignore[union-attr]
        elif finished and self._text.startswith(self._sent_content) and len(self._text) > len(self._sent_content):
            # text the parser held back in case it began a tool call that never came
            delta["content"] = delta.get("content", "") + self._text[len(self._sent_content) :]
        if self._plan.single_call:
            calls = [c for c in calls if c["index"] == 0]
        if calls:
            self.called = True
            delta["tool_calls"] = calls
        return delta or None
