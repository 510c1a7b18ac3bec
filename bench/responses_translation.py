"""The CPU the Responses API's translation adds to a request, in-process (no HTTP, no provider).

    python bench/responses_translation.py [--rounds 5]

Per request: a small Responses request read and translated to chat (both validations included),
a chat completion told back as a response object and encoded; per stream: a chat stream of N
content chunks written as Responses events, beside the same chunks written as chat SSE
(:class:`~app.api.sse.OpenAIEvents`) for scale. Medians of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.responses_input import chat_body, parse_responses_body
from app.api.responses_output import ResponsesEvents, from_completion
from app.api.sse import OpenAIEvents

REQUEST = orjson.dumps(
    {"model": "fast", "instructions": "Be brief.", "input": "Write a haiku about the sea, please.", "max_output_tokens": 100, "temperature": 0.7}
)
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Waves fold into foam, salt wind carries gull voices, the tide keeps its time."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 18, "total_tokens": 38},
}


def _chunks(n: int) -> list[dict]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body = [{**head, "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None, "finish_reason": None}]} for _ in range(n)]
    return [
        *body,
        {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": ANSWER["usage"]},
    ]


def _per_call(work: Callable[[], None], repeat: int, rounds: int) -> float:
    """Median seconds per call of ``work`` over ``rounds`` rounds of ``repeat`` calls."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            work()
        times.append((time.perf_counter() - started) / repeat)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    origin = parse_responses_body(REQUEST)

    def request() -> None:
        chat_body(parse_responses_body(REQUEST), [])

    def answer() -> None:
        orjson.dumps(from_completion(ANSWER, origin, "resp_1", 1)[0])

    print(f"request read and translated: {_per_call(request, 5000, args.rounds) * 1e6:.1f} µs")
    print(f"answer told back and encoded: {_per_call(answer, 5000, args.rounds) * 1e6:.1f} µs")
    for n in (10, 100, 1000):
        chunks = _chunks(n)

        def responses(chunks: list[dict] = chunks) -> None:
            writer = ResponsesEvents(origin, "resp_1", 1)
            for chunk in chunks:
                writer.chunk(chunk)
            writer.end()

        def chat(chunks: list[dict] = chunks) -> None:
            writer = OpenAIEvents(True)
            for chunk in chunks:
                writer.chunk(chunk)
            writer.end()

        repeat = max(1, 20000 // n)
        ours, theirs = _per_call(responses, repeat, args.rounds), _per_call(chat, repeat, args.rounds)
        print(f"stream of {n} chunks: Responses events {ours * 1e6:.0f} µs, chat SSE {theirs * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
