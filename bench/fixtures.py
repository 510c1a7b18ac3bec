"""The bodies every server in the benchmark sends or answers: one fixed completion, one SSE stream."""

from __future__ import annotations

import json

MODEL = "bench-model"
ANSWER = "A fixed answer from the static upstream, long enough to look like a short real reply."
PROMPT_PAD = "Summarise the following ticket and propose the next step for the on-call agent. " * 3
#: ``data:`` events in the streamed answer, ``[DONE]`` not counted: role, content chunks, stop, usage
STREAM_CHUNKS = 40

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
    """A streamed answer as an SSE body of ``STREAM_CHUNKS`` events, then ``data: [DONE]``.

    A role chunk, one content chunk per word (the words of ``ANSWER`` over and over, a token-sized
    delta each, as a model streams them), a stop chunk and a usage chunk.
    """
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}
    words = ANSWER.split()
    deltas: list[tuple[dict[str, str], str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": words[i % len(words)] + " "}, None) for i in range(STREAM_CHUNKS - 3)]
    deltas.append(({}, "stop"))
    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}]} for d, f in deltas]
    events.append({**head, "choices": [], "usage": _USAGE})
    return "".join(f"data: {_dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def count_chunks(body: bytes) -> tuple[int, bool]:
    """The ``data:`` events of an SSE body other than ``[DONE]``, and whether it ends with ``data: [DONE]``."""
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    done = bool(events) and events[-1] == b"data: [DONE]"
    return len(events) - done, done


def request_body(model: str, prompt: str, *, stream: bool = False) -> bytes:
    """A chat completion request for ``model`` with one user message.

    A streamed one asks for the usage chunk too (``stream_options.include_usage``), so a server
    that honours the option relays every event of the upstream's stream.
    """
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _dumps(body).encode()
