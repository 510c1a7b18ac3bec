"""The bodies every server in the benchmark sends or answers: one fixed completion, one SSE stream."""

from __future__ import annotations

import json

MODEL = "bench-model"
ANSWER = "A fixed answer from the static upstream, long enough to look like a short real reply."
PROMPT_PAD = "Summarise the following ticket and propose the next step for the on-call agent. " * 3

_USAGE = {"prompt_tokens": 64, "completion_tokens": 18, "total_tokens": 82}


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def completion() -> str:
    """A non-streamed OpenAI ``chat.completion`` object as compact JSON."""
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": _USAGE,
        }
    )


def sse_stream() -> str:
    """The same answer as an SSE body: role chunk, content chunks, stop chunk, usage chunk, [DONE]."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}
    deltas: list[tuple[dict[str, str], str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": word + " "}, None) for word in ANSWER.split()]
    deltas.append(({}, "stop"))
    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in deltas]
    events.append({**head, "choices": [], "usage": _USAGE})
    return "".join(f"data: {_dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def request_body(model: str, prompt: str, *, stream: bool = False) -> bytes:
    """A chat completion request for ``model`` with one user message."""
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    return _dumps(body).encode()
