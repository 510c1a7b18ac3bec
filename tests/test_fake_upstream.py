"""Self-test of the fake upstream the gateway tests rely on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello big world"}]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def up(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


@pytest.fixture
def client(up: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.base_url, timeout=2) as c:
        yield c


def _sse(text: str) -> list[Any]:
    return [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def test_ok_plain(up: FakeUpstream, client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=BODY, headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m"
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": "echo: hello big world",
    }
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert up.calls == 1
    assert up.requests[0].headers["authorization"] == "Bearer k"
    assert up.requests[0].body == BODY


def test_ok_stream_with_usage(client: httpx.Client) -> None:
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hello big world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 7


def test_429_has_retry_after(up: FakeUpstream, client: httpx.Client) -> None:
    up.behaviour = "429:3"
    r = client.post("/chat/completions", json=BODY)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"
    up.behaviour = "429-noretry"
    assert "retry-after" not in client.post("/chat/completions", json=BODY).headers


def test_script_order_then_global_and_by_model(up: FakeUpstream, client: httpx.Client) -> None:
    up.script(["500", "status:503", "ok"])
    up.behaviour = "status:404"
    up.by_model = {"special": "wrongshape"}
    assert client.post("/chat/completions", json={**BODY, "model": "special"}).json() == {"foo": 1}
    codes = [client.post("/chat/completions", json=BODY).status_code for _ in range(4)]
    assert codes == [500, 503, 200, 404]
    assert up.calls == 5


def test_hang_times_out_on_client(up: FakeUpstream, client: httpx.Client) -> None:
    up.behaviour = "hang"
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json=BODY, timeout=0.2)
    assert up.calls == 1


def test_unknown_behaviour_rejected(up: FakeUpstream) -> None:
    with pytest.raises(ValueError):
        up.script(["ok", "explode"])


# -- provider answers and holding ------------------------------------------------------------

ANSWER: Any = (
    {
        "id": "chatcmpl-p1",
        "object": "chat.completion",
        "created": 7,
        "model": "provider-model-2025",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "reasoning_content": "r"}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "x_extra": {"a": 1},
    },
    [
        {"id": "chatcmpl-p1", "object": "chat.completion.chunk", "created": 7, "model": "provider-model-2025", "usage": None, "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "r"}, "finish_reason": None}]},
        {"id": "chatcmpl-p1", "object": "chat.completion.chunk", "created": 7, "model": "provider-model-2025", "usage": None, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
        {"id": "chatcmpl-p1", "object": "chat.completion.chunk", "created": 7, "model": "provider-model-2025", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
    ],
)


def test_provider_answer_plain_and_streamed(up: FakeUpstream, client: httpx.Client) -> None:
    completion, chunks = ANSWER
    up.answers = {"m": ANSWER}
    assert client.post("/chat/completions", json=BODY).json() == completion  # its own id and model
    with_usage = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/chat/completions", json=with_usage)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert _sse(r.text) == [*chunks, "[DONE]"]
    # as OpenAI does: without include_usage no usage chunk and no usage key
    events = _sse(client.post("/chat/completions", json={**BODY, "stream": True}).text)
    assert events == [{k: v for k, v in c.items() if k != "usage"} for c in chunks[:2]] + ["[DONE]"]
    # other models still get the echo; behaviours still apply
    assert client.post("/chat/completions", json={**BODY, "model": "other"}).json()["choices"][0]["message"]["content"] == "echo: hello big world"
    up.behaviour = "status:503"
    assert client.post("/chat/completions", json=BODY).status_code == 503
    assert up.calls == 5
    up.reset()
    assert up.answers == {}


def test_hold_keeps_requests_until_released(up: FakeUpstream, client: httpx.Client) -> None:
    up.hold()
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(client.post, "/chat/completions", json=BODY) for _ in range(2)]
        deadline = time.monotonic() + 5
        while up.held < 2:
            assert time.monotonic() < deadline, "the requests never reached the hold"
            time.sleep(0.01)
        assert up.calls == 2
        assert not any(f.done() for f in pending)
        up.release()
        assert [f.result(timeout=5).status_code for f in pending] == [200, 200]
    assert up.held == 0
    # released: new requests pass at once
    assert client.post("/chat/completions", json=BODY).status_code == 200
