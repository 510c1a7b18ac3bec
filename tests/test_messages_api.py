"""``POST /v1/messages`` (Anthropic Messages) onto a provider that speaks only chat completions.

The official ``anthropic`` SDK drives the gateway; the fake upstream's recorder shows what the
provider was asked, its call counter what the cache and dedupe saved.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.messages import AnthropicEvents, error_response
from app.errors import BackendUnavailableError, GatewayError, RateLimitError, UpstreamClientError, UpstreamTimeoutError
from app.translate.anthropic import IMAGE_TOKENS, estimate_input_tokens, to_chat, to_message
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

KEY = "sk-messages-agent-0001"
OTHER_KEY = "sk-messages-agent-0002"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def config(up: FakeUpstream, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: alpha}}
  - {{key: {OTHER_KEY}, agent: bravo, models: [m]}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-secret, timeout_s: 10}}
models:
  m: [up/fake-model]
  tools: [up/tool-model]
  think: [up/think-model]
  stopper: [up/stop-model]
  long: [up/long-model]
retry: {{attempts: 1}}
circuit_breaker: {{failure_threshold: 1000}}
{extra}
"""


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def fresh(up: FakeUpstream) -> FakeUpstream:
    up.reset()
    return up


@pytest.fixture
def client(gw: GatewayServer, fresh: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c:
        yield c


def post(gw: GatewayServer, body: Any, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    sent = {"x-api-key": KEY, "anthropic-version": "2023-06-01", **headers}
    if isinstance(body, bytes):
        return httpx.post(gw.url + path, headers=sent, content=body, timeout=10)
    return httpx.post(gw.url + path, headers=sent, json=body, timeout=10)


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The SSE stream as (event name, data) pairs; every event must carry both lines, as Anthropic's do."""
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def text(message: Any, at: int = 0) -> str:
    """The text of a Message's content block ``at``."""
    return str(message.content[at].text)


def error_type(exc: anthropic.APIStatusError) -> str:
    body: Any = exc.body
    return str(body["error"]["type"])


def completion(model: str, message: dict[str, Any], finish: str, usage: dict[str, Any] | None = None, **choice: Any) -> dict[str, Any]:
    body = {
        "id": f"chatcmpl-{model}",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None, "finish_reason": finish, **choice}],
    }
    body["usage"] = usage or {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}
    return body


def chunks(model: str, deltas: list[dict[str, Any]], finish: str, usage: dict[str, Any] | None = None, **choice: Any) -> list[dict[str, Any]]:
    head = {"id": f"chatcmpl-{model}", "object": "chat.completion.chunk", "created": 1, "model": model}
    out = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]}]
    out += [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish, **choice}]})
    out.append({**head, "choices": [], "usage": usage or {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}})
    return out


WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ANSWER = (
    completion("tool-model", {"content": "Let me look.", "tool_calls": [CALL]}, "tool_calls"),
    chunks(
        "tool-model",
        [
            {"content": "Let me look."},
            {"tool_calls": [{"index": 0, "id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        ],
        "tool_calls",
    ),
)
THINK_ANSWER = (
    completion("think-model", {"reasoning_content": "Six times seven.", "content": "42"}, "stop"),
    chunks("think-model", [{"reasoning_content": "Six times "}, {"reasoning_content": "seven."}, {"content": "4"}, {"content": "2"}], "stop"),
)


# -- the SDK, plain and streamed -------------------------------------------------------------


def test_plain_message_with_a_system_prompt(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    raw = client.messages.with_raw_response.create(
        model="m",
        max_tokens=64,
        system="You are terse.",
        messages=[{"role": "user", "content": "hello plain"}],
        # this SDK no longer names the sampling parameters; the API still takes them
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "m"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "echo: hello plain")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.id.startswith("msg_")
    # the fake counts words: "You are terse." + "hello plain" in, "echo: hello plain" out
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)
    assert raw.headers["x-admiral-backend"] == "up" and raw.headers["x-admiral-route"] == "m"
    assert raw.headers["x-admiral-cache"] == "miss" and raw.headers["x-request-id"]
    sent = fresh.chat_requests[0]
    assert sent.body == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello plain"}],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stream": False,
    }
    # the gateway key never reaches the provider; the provider's own key does
    assert sent.headers["authorization"] == "Bearer sk-provider-secret"
    assert KEY not in json.dumps(sent.headers)


def test_system_blocks_and_content_blocks(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    message = client.messages.create(
        model="m",
        max_tokens=32,
        system=[{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second blocks"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "noted"}]},
            {"role": "user", "content": "and third blocks"},
        ],
        metadata={"user_id": "user-77"},
        stop_sequences=["STOP"],
    )
    assert text(message) == "echo: and third blocks"
    body = fresh.chat_requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "Rule one.\nRule two."},
        {"role": "user", "content": "first\nsecond blocks"},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": "and third blocks"},
    ]
    assert body["user"] == "user-77" and body["stop"] == ["STOP"]


def test_streamed_message(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    with client.messages.stream(model="m", max_tokens=64, messages=[{"role": "user", "content": "hello streamed world"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [k for k in kinds if k not in ("text",)] == ["message_start", "content_block_start"] + ["content_block_delta"] * 4 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert text(final) == "echo: hello streamed world"
    assert final.stop_reason == "end_turn"
    # message_delta carries the provider's counts, which replace message_start's estimate
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    body = fresh.chat_requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_event_sequence_on_the_wire(gw: GatewayServer, fresh: FakeUpstream) -> None:
    r = post(gw, {"model": "m", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "wire check"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    seq = events(r)
    names = [n for n, _ in seq]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = seq[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "m"
    # the gateway's estimate of the input: "wire check" is 10 characters
    assert start["usage"]["input_tokens"] == estimate_input_tokens({"messages": [{"role": "user", "content": "wire check"}]}) == 3
    assert seq[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for n, d in seq if n == "content_block_delta") == "echo: wire check"
    assert seq[7][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert seq[7][1]["usage"]["output_tokens"] == 3


def test_max_tokens_stop_reason_plain_and_streamed(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    fresh.answers = {"long-model": (completion("long-model", {"content": "cut sh"}, "length"), chunks("long-model", [{"content": "cut sh"}], "length"))}
    plain = client.messages.create(model="long", max_tokens=2, messages=[{"role": "user", "content": "go on"}])
    assert plain.stop_reason == "max_tokens"
    with client.messages.stream(model="long", max_tokens=2, messages=[{"role": "user", "content": "go on streamed"}]) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"


def test_stop_sequence_when_the_provider_names_it(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    # vLLM says which stop string ended the text (choice.stop_reason); chat completions otherwise do not
    fresh.answers = {
        "stop-model": (
            completion("stop-model", {"content": "one two"}, "stop", stop_reason="END"),
            chunks("stop-model", [{"content": "one two"}], "stop", stop_reason="END"),
        )
    }
    plain = client.messages.create(model="stopper", max_tokens=20, stop_sequences=["END"], messages=[{"role": "user", "content": "count"}])
    assert (plain.stop_reason, plain.stop_sequence) == ("stop_sequence", "END")
    with client.messages.stream(model="stopper", max_tokens=20, stop_sequences=["END"], messages=[{"role": "user", "content": "count again"}]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


def test_reasoning_becomes_a_thinking_block(client: anthropic.Anthropic, fresh: FakeUpstream, gw: GatewayServer) -> None:
    fresh.answers = {"think-model": THINK_ANSWER}
    plain = client.messages.create(model="think", max_tokens=50, messages=[{"role": "user", "content": "six times seven?"}])
    assert [b.type for b in plain.content] == ["thinking", "text"]
    thinking: Any = plain.content[0]
    assert thinking.thinking == "Six times seven."
    assert text(plain, 1) == "42"
    r = post(gw, {"model": "think", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "six times seven, streamed?"}]})
    seq = events(r)
    starts = [d["content_block"] for n, d in seq if n == "content_block_start"]
    assert starts == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""}]
    deltas = [d["delta"] for n, d in seq if n == "content_block_delta"]
    assert deltas == [
        {"type": "thinking_delta", "thinking": "Six times "},
        {"type": "thinking_delta", "thinking": "seven."},
        {"type": "text_delta", "text": "4"},
        {"type": "text_delta", "text": "2"},
    ]
    assert [d["index"] for n, d in seq if n == "content_block_stop"] == [0, 1]


# -- tools -------------------------------------------------------------------------------------


def test_tool_use_round_trip(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    fresh.answers = {"tool-model": TOOL_ANSWER}
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model="tools", max_tokens=100, tools=[WEATHER_TOOL], tool_choice={"type": "auto"}, messages=[question])
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    use: Any = first.content[1]
    assert (use.id, use.name, use.input) == ("call_w1", "get_weather", {"city": "Paris"})
    sent = fresh.chat_requests[0].body
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_TOOL["input_schema"]}}
    ]
    assert sent["tool_choice"] == "auto"

    fresh.answers = {}  # now the provider answers in words
    said: Any = [b.model_dump(exclude_none=True) for b in first.content]
    second = client.messages.create(
        model="tools",
        max_tokens=100,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": said},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_w1", "content": "18 C and sunny"}, {"type": "text", "text": "Summarise it"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert text(second) == "echo: Summarise it"
    messages = fresh.chat_requests[1].body["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
    }
    assert messages[2] == {"role": "tool", "tool_call_id": "call_w1", "content": "18 C and sunny"}
    assert messages[3] == {"role": "user", "content": "Summarise it"}


def test_streamed_tool_use(client: anthropic.Anthropic, fresh: FakeUpstream, gw: GatewayServer) -> None:
    fresh.answers = {"tool-model": TOOL_ANSWER}
    with client.messages.stream(model="tools", max_tokens=100, tools=[WEATHER_TOOL], messages=[{"role": "user", "content": "weather, streamed"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    called: Any = final.content[1]
    assert called.input == {"city": "Paris"}
    fresh.answers = {}
    history: Any = [
        {"role": "user", "content": "weather, streamed"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_w1", "content": [{"type": "text", "text": "18 C"}]}, {"type": "text", "text": "and now?"}],
        },
    ]
    with client.messages.stream(model="tools", max_tokens=100, tools=[WEATHER_TOOL], messages=history) as stream:
        answer = stream.get_final_message()
    assert (answer.stop_reason, text(answer)) == ("end_turn", "echo: and now?")
    assert fresh.chat_requests[1].body["messages"][1:3] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "18 C"},
    ]
    fresh.answers = {"tool-model": TOOL_ANSWER}
    r = post(
        gw, {"model": "tools", "max_tokens": 100, "stream": True, "tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": "weather, on the wire"}]}
    )
    seq = events(r)
    starts = [(d["index"], d["content_block"]) for n, d in seq if n == "content_block_start"]
    assert starts == [(0, {"type": "text", "text": ""}), (1, {"type": "tool_use", "id": "call_w1", "name": "get_weather", "input": {}})]
    json_deltas = [d["delta"]["partial_json"] for n, d in seq if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert json_deltas == ['{"city": ', '"Paris"}']
    assert [d["index"] for n, d in seq if n == "content_block_stop"] == [0, 1]
    assert seq[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("choice", "sent", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ],
)
def test_tool_choice(client: anthropic.Anthropic, fresh: FakeUpstream, choice: Any, sent: Any, parallel: bool | None) -> None:
    client.messages.create(model="m", max_tokens=10, tools=[WEATHER_TOOL], tool_choice=choice, messages=[{"role": "user", "content": f"choose {choice}"}])
    body = fresh.chat_requests[0].body
    assert body["tool_choice"] == sent
    assert body.get("parallel_tool_calls") == parallel


def test_tool_result_blocks_with_images_and_errors(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    client.messages.create(
        model="m",
        max_tokens=10,
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "show me"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}},
                    {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": "city missing"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [
                            {"type": "text", "text": "a chart"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                        ],
                    },
                ],
            },
        ],
    )
    messages = fresh.chat_requests[0].body["messages"]
    assert messages[1]["content"] is None and [c["id"] for c in messages[1]["tool_calls"]] == ["t1", "t2"]
    assert messages[2] == {"role": "tool", "tool_call_id": "t1", "content": "Error: city missing"}
    assert messages[3] == {"role": "tool", "tool_call_id": "t2", "content": "a chart"}
    # a tool message holds text only: the image follows as the user's
    assert messages[4] == {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}


def test_structured_output_becomes_a_response_format(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}
    client.messages.create(
        model="m",
        max_tokens=10,
        output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "high"},
        messages=[{"role": "user", "content": "as json"}],
    )
    body = fresh.chat_requests[0].body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert "reasoning_effort" not in body


# -- images --------------------------------------------------------------------------------


def test_image_blocks_base64_and_url(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    message = client.messages.create(
        model="m",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                    {"type": "text", "text": "what are these"},
                ],
            }
        ],
    )
    # the fake echoes the text of every part, an image's being empty
    assert text(message) == "echo:   what are these"
    assert fresh.chat_requests[0].body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "text", "text": "what are these"},
            ],
        }
    ]


def test_the_demo_provider_answers_messages_too() -> None:
    with (
        gateway({"providers": {"demo": {"kind": "demo"}}, "models": {"demo": ["demo/echo"]}}) as gw,
        anthropic.Anthropic(base_url=gw.url, api_key="any", max_retries=0) as c,
    ):
        plain = c.messages.create(model="demo", max_tokens=50, messages=[{"role": "user", "content": "hello demo"}])
        with c.messages.stream(model="demo", max_tokens=3, messages=[{"role": "user", "content": "hello demo"}]) as stream:
            streamed = stream.get_final_message()
    assert text(plain) == "Admiral demo answer. You said: hello demo"
    assert plain.stop_reason == "end_turn" and plain.usage.output_tokens == 7
    assert text(streamed) == "Admiral demo answer."
    assert streamed.stop_reason == "max_tokens" and streamed.usage.output_tokens == 3


# -- what Claude Code sends --------------------------------------------------------------------


def test_claude_code_style_request(gw: GatewayServer, fresh: FakeUpstream) -> None:
    """A query string, beta headers, ``thinking``, ``cache_control`` and earlier thinking blocks are accepted."""
    body = {
        "model": "m",
        "max_tokens": 100,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "step one", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "done"}]},
            {"role": "user", "content": "claude code step two"},
        ],
        "metadata": {"user_id": "session-1"},
    }
    r = post(gw, body, "/v1/messages?beta=true", **{"anthropic-beta": "interleaved-thinking-2025-05-14", "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == [{"type": "text", "text": "echo: claude code step two"}]
    sent = fresh.chat_requests[0].body
    assert sent["messages"][2] == {"role": "assistant", "content": "done"}
    assert "thinking" not in sent


# -- cache, dedupe, limits, failover -----------------------------------------------------------


def test_cache_hit_plain_and_replayed_as_a_stream(client: anthropic.Anthropic, fresh: FakeUpstream, gw: GatewayServer) -> None:
    ask: dict[str, Any] = {"model": "m", "max_tokens": 30, "messages": [{"role": "user", "content": "cache me please"}]}
    first = client.messages.with_raw_response.create(**ask)
    second = client.messages.with_raw_response.create(**ask)
    assert (first.headers["x-admiral-cache"], second.headers["x-admiral-cache"]) == ("miss", "hit")
    assert second.parse() == first.parse()
    r = post(gw, {**ask, "stream": True})
    assert r.headers["x-admiral-cache"] == "hit"
    seq = events(r)
    assert [n for n, _ in seq][0:2] == ["message_start", "ping"] and seq[-1][0] == "message_stop"
    assert "".join(d["delta"]["text"] for n, d in seq if n == "content_block_delta") == "echo: cache me please"
    assert seq[-2][1]["usage"]["output_tokens"] == first.parse().usage.output_tokens
    assert fresh.calls == 1


def test_cache_is_shared_with_the_equivalent_chat_request(client: anthropic.Anthropic, fresh: FakeUpstream, gw: GatewayServer) -> None:
    """The cache keys on the translated request: the same question asked through chat completions is a hit."""
    client.messages.create(model="m", max_tokens=30, system="Be brief.", messages=[{"role": "user", "content": "shared entry"}])
    chat = {"model": "m", "max_tokens": 30, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "shared entry"}]}
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=chat, timeout=10)
    assert r.status_code == 200 and r.headers["x-admiral-cache"] == "hit"
    assert r.json()["choices"][0]["message"]["content"] == "echo: shared entry"
    assert fresh.calls == 1


def test_cache_control_no_cache_skips_the_read(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    ask: dict[str, Any] = {"model": "m", "max_tokens": 30, "messages": [{"role": "user", "content": "fresh answer only"}]}
    client.messages.create(**ask)
    again = client.messages.with_raw_response.create(**ask, extra_headers={"cache-control": "no-cache"})
    assert again.headers["x-admiral-cache"] == "bypass"
    assert fresh.calls == 2


def test_dedupe_followers_share_the_leaders_call(gw: GatewayServer, fresh: FakeUpstream) -> None:
    body = {"model": "m", "max_tokens": 30, "messages": [{"role": "user", "content": "coalesce these"}]}
    registry = gw.services.metrics.registry
    before = registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0

    async def run() -> list[httpx.Response]:
        fresh.hold()
        async with httpx.AsyncClient(timeout=20) as http:
            headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "cache-control": "no-store"}
            leader = asyncio.create_task(http.post(gw.url + "/v1/messages", headers=headers, json=body))
            while fresh.held < 1:
                await asyncio.sleep(0.01)
            plain = asyncio.create_task(http.post(gw.url + "/v1/messages", headers=headers, json=body))
            streamed = asyncio.create_task(http.post(gw.url + "/v1/messages", headers=headers, json={**body, "stream": True}))
            deadline = time.monotonic() + 10
            while (registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0) < before + 2:
                assert time.monotonic() < deadline, "the followers never joined"
                await asyncio.sleep(0.01)
            fresh.release()
            return list(await asyncio.gather(leader, plain, streamed))

    leader, plain, streamed = asyncio.run(run())
    assert fresh.calls == 1
    assert [r.status_code for r in (leader, plain, streamed)] == [200, 200, 200]
    assert (leader.headers["x-admiral-dedupe"], plain.headers["x-admiral-dedupe"], streamed.headers["x-admiral-dedupe"]) == ("leader", "follower", "follower")
    assert plain.json() == leader.json()
    seq = events(streamed)
    assert "".join(d["delta"]["text"] for n, d in seq if n == "content_block_delta") == "echo: coalesce these"
    assert seq[-1][0] == "message_stop"


def test_agent_rate_limit_is_an_anthropic_429(up: FakeUpstream) -> None:
    up.reset()
    with gateway(config(up).replace(f"{{key: {KEY}, agent: alpha}}", f"{{key: {KEY}, agent: alpha, rpm: 1}}")) as gw:
        assert post(gw, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "one"}]}).status_code == 200
        r = post(gw, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "two"}]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
        with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c, pytest.raises(anthropic.RateLimitError):
            c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "three"}])
    assert up.calls == 1


def test_failover_to_the_next_deployment(up: FakeUpstream) -> None:
    up.reset()
    up.by_model = {"broken-model": "500"}
    with (
        gateway(config(up).replace("  m: [up/fake-model]", "  m: [up/broken-model, up/fake-model]")) as gw,
        anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c,
    ):
        message = c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "survive"}])
        with c.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "survive streamed"}]) as stream:
            final = stream.get_final_message()
    assert text(message) == "echo: survive"
    assert text(final) == "echo: survive streamed"
    assert [r.body["model"] for r in up.chat_requests] == ["broken-model", "fake-model", "broken-model", "fake-model"]


def test_request_log_names_the_endpoint(up: FakeUpstream, tmp_path: Path) -> None:
    up.reset()
    path = tmp_path / "log.db"
    with gateway(config(up, f"database: {{url: 'sqlite+aiosqlite:///{path}'}}")) as gw:
        post(gw, {**GOOD, "messages": [{"role": "user", "content": "log me"}]}, **{"x-request-id": "msg-log-1"})
        post(gw, {**GOOD, "stream": True, "messages": [{"role": "user", "content": "log me streamed"}]}, **{"x-request-id": "msg-log-2"})
        post(gw, {**GOOD, "max_tokens": None}, **{"x-request-id": "msg-log-3"})
        deadline = time.monotonic() + 15
        while True:
            with sqlite3.connect(path) as db:
                rows = db.execute("SELECT request_id, endpoint, status, stream, prompt_tokens, completion_tokens FROM request_log ORDER BY id").fetchall()
            if len(rows) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert rows == [("msg-log-1", "messages", 200, 0, 2, 3), ("msg-log-2", "messages", 200, 1, 3, 4), ("msg-log-3", "messages", 400, 0, 0, 0)]


# -- errors in Anthropic's shape ---------------------------------------------------------------


GOOD: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in GOOD.items() if k != "max_tokens"}, "max_tokens"),
        ({**GOOD, "max_tokens": 0}, "max_tokens"),
        ({**GOOD, "max_tokens": "10"}, "max_tokens"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "model"),
        ({**GOOD, "messages": []}, "messages"),
        ({**GOOD, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({**GOOD, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
        ({**GOOD, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages.0.content.0.type"),
        (
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "x"}}]}]},
            "messages.0.content.0.source.media_type",
        ),
        (
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
            "messages.0.content.0.source.type",
        ),
        ({**GOOD, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "messages.0.content.0.tool_use_id"),
        ({**GOOD, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}, "messages.0.content.0.input"),
        ({**GOOD, "system": 3}, "system"),
        ({**GOOD, "system": [{"type": "image"}]}, "system.0.type"),
        ({**GOOD, "temperature": 1.5}, "temperature"),
        ({**GOOD, "top_p": True}, "top_p"),
        ({**GOOD, "top_k": -1}, "top_k"),
        ({**GOOD, "stop_sequences": "END"}, "stop_sequences"),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({**GOOD, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({**GOOD, "tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({**GOOD, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({**GOOD, "tools": [WEATHER_TOOL], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({**GOOD, "tool_choice": {"type": "any"}}, "tool_choice"),
        ({**GOOD, "metadata": {"user_id": 7}}, "metadata.user_id"),
        ({**GOOD, "output_config": {"format": {"type": "regex"}}}, "output_config.format.type"),
        ({**GOOD, "output_config": {"format": {"type": "json_schema", "schema": "x"}}}, "output_config.format.schema"),
    ],
)
def test_malformed_bodies_are_anthropic_400s_naming_the_field(gw: GatewayServer, fresh: FakeUpstream, body: dict[str, Any], field: str) -> None:
    r = post(gw, body)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(field + ": ")
    assert fresh.calls == 0


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"null", b"[" * 300 + b"]" * 300])
def test_malformed_json_is_an_anthropic_400(gw: GatewayServer, raw: bytes) -> None:
    r = post(gw, raw, **{"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_under_messages_are_anthropic_errors(gw: GatewayServer) -> None:
    # what the gateway does not serve (message batches, say) is refused in the shape the client reads
    r = httpx.post(gw.url + "/v1/messages/batches", headers={"x-api-key": KEY}, json={"requests": []}, timeout=10)
    assert r.status_code == 404
    assert r.json() == {"type": "error", "error": {"type": "not_found_error", "message": "Unknown path: POST /v1/messages/batches."}}
    r = httpx.get(gw.url + "/v1/messages/count_tokens", headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 405 and r.json()["type"] == "error"
    # elsewhere, OpenAI's shape as before
    assert httpx.post(gw.url + "/v1/nothing", json={}, timeout=10).json()["error"]["type"] == "not_found_error"


def test_sdk_raises_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "x", "media_type": "text/plain"}}]}],
        )
    assert error_type(caught.value) == "invalid_request_error"


def test_keys_from_x_api_key_or_authorization(gw: GatewayServer, fresh: FakeUpstream) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "who am I"}]}
    assert post(gw, body).status_code == 200
    assert httpx.post(gw.url + "/v1/messages", headers={"Authorization": f"Bearer {OTHER_KEY}"}, json=body, timeout=10).status_code == 200
    for headers in ({}, {"x-api-key": "sk-wrong-key"}, {"Authorization": "Bearer sk-wrong-key"}):
        r = httpx.post(gw.url + "/v1/messages", headers=headers, json=body, timeout=10)
        assert r.status_code == 401
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
        assert "sk-wrong-key" not in r.text
    with anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong-key", max_retries=0) as bad, pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_unknown_model_method_and_size(up: FakeUpstream) -> None:
    up.reset()
    with gateway(config(up, "server: {max_body_bytes: 2048}")) as gw:
        r = post(gw, {**GOOD, "model": "claude-nonexistent"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert "claude-nonexistent" in r.json()["error"]["message"]
        r = httpx.get(gw.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
        big = {**GOOD, "messages": [{"role": "user", "content": "x" * 4000}]}
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = post(gw, big, path)
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
            # the body arriving in pieces, without a Content-Length up front
            r = httpx.post(
                gw.url + path, headers={"x-api-key": KEY}, content=iter([json.dumps(big).encode()[:1500], json.dumps(big).encode()[1500:]]), timeout=10
            )
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert up.calls == 0


@pytest.mark.parametrize(
    ("behaviour", "status", "kind", "exception"),
    [
        ("429:7", 429, "rate_limit_error", anthropic.RateLimitError),
        ("status:400", 400, "invalid_request_error", anthropic.BadRequestError),
        ("status:503", 502, "api_error", anthropic.InternalServerError),
        ("badjson", 502, "api_error", anthropic.InternalServerError),
    ],
)
def test_upstream_errors_in_anthropic_shape(up: FakeUpstream, behaviour: str, status: int, kind: str, exception: type[Exception]) -> None:
    up.reset()
    up.behaviour = behaviour
    with gateway(config(up)) as gw:
        r = post(gw, GOOD)
        assert r.status_code == status
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind
        if status == 429:
            assert r.headers["retry-after"] == "7"
        if behaviour == "status:400":
            # Anthropic's clients (Claude Code) compact a conversation on these words
            assert r.json()["error"]["message"].startswith("prompt is too long: ")
        with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c, pytest.raises(exception):
            c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "fail"}])


def test_a_failure_mid_stream_is_an_error_event(up: FakeUpstream) -> None:
    up.reset()
    up.behaviour = "cut"
    with gateway(config(up)) as gw:
        r = post(gw, {**GOOD, "stream": True})
        assert r.status_code == 200
        seq = events(r)
        assert seq[0][0] == "message_start"
        assert seq[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": seq[-1][1]["error"]["message"]}})
        assert "message_stop" not in [n for n, _ in seq]
        with (
            anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c,
            pytest.raises(anthropic.APIStatusError) as caught,
            c.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "cut me"}]) as stream,
        ):
            stream.get_final_message()
        assert error_type(caught.value) == "api_error"


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (GatewayError("boom"), 500, "api_error"),
        (RateLimitError("slow down", retry_after=3), 429, "rate_limit_error"),
        (BackendUnavailableError("circuit open"), 503, "overloaded_error"),
        (UpstreamTimeoutError("slow"), 504, "timeout_error"),
        (UpstreamClientError("too long", status=400, code="context_length_exceeded"), 400, "invalid_request_error"),
        (UpstreamClientError("gone", status=404), 404, "not_found_error"),
    ],
)
def test_error_types_follow_the_status(error: GatewayError, status: int, kind: str) -> None:
    response = error_response(error)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    if error.retry_after:
        assert response.headers["retry-after"] == "3"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=12,
)
FIELDS = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "stream",
    "output_config",
    "thinking",
]
BLOCKS = ["text", "image", "tool_use", "tool_result", "thinking", "document"]
BLOCK_FIELDS = ["type", "text", "source", "id", "name", "input", "tool_use_id", "content", "is_error"]
FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_answered(r: httpx.Response) -> None:
    """Below 500; an error in Anthropic's shape."""
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}


@FUZZ
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_fuzzed_fields_never_fail_the_gateway(gw: GatewayServer, fresh: FakeUpstream, field: str, value: Any) -> None:
    assert_answered(post(gw, {**GOOD, "tools": [WEATHER_TOOL], field: value}))


@FUZZ
@given(role=st.sampled_from(["user", "assistant"]), kind=st.sampled_from(BLOCKS), field=st.sampled_from(BLOCK_FIELDS), value=JSON)
def test_fuzzed_blocks_never_fail_the_gateway(gw: GatewayServer, fresh: FakeUpstream, role: str, kind: str, field: str, value: Any) -> None:
    block = {
        "type": kind,
        "text": "t",
        "id": "i",
        "name": "n",
        "input": {},
        "tool_use_id": "i",
        "source": {"type": "url", "url": "https://x.test/a.png"},
        field: value,
    }
    messages = [{"role": role, "content": [block]}]
    assert_answered(post(gw, {**GOOD, "messages": messages}))
    assert_answered(post(gw, {"model": "m", "messages": messages}, "/v1/messages/count_tokens"))


# -- count_tokens ------------------------------------------------------------------------------


def test_count_tokens(client: anthropic.Anthropic, fresh: FakeUpstream) -> None:
    messages: Any = [{"role": "user", "content": "x" * 400}]
    assert client.messages.count_tokens(model="m", messages=messages).input_tokens == 101
    with_system = client.messages.count_tokens(model="m", system="y" * 40, messages=messages)
    assert with_system.input_tokens == 111
    with_tools = client.messages.count_tokens(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > 101
    image: Any = [
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}, {"type": "text", "text": "x" * 400}]}
    ]
    assert client.messages.count_tokens(model="m", messages=image).input_tokens == 101 + IMAGE_TOKENS
    assert fresh.calls == 0


def test_count_tokens_errors(gw: GatewayServer) -> None:
    path = "/v1/messages/count_tokens"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(gw.url + path, json=body, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["x-request-id"]
    r = post(gw, {**body, "model": "nope"}, path)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    for where in (path, "/v1/messages"):
        r = post(gw, {**body, "model": "tools", "max_tokens": 5}, where, **{"x-api-key": OTHER_KEY})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = post(gw, {**body, "messages": [{"role": "robot", "content": "x"}]}, path)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages.0.role: ")
    r = post(gw, b"{oops", path)
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = post(gw, body, path, **{"content-type": "application/xml"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(gw.url + path, headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# -- the translation itself --------------------------------------------------------------------


def test_chat_answer_details_are_translated() -> None:
    answer = completion(
        "x",
        {"content": None, "refusal": "I can't help with that."},
        "stop",
        {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105, "prompt_tokens_details": {"cached_tokens": 60}},
    )
    message = to_message(answer, "public", None)
    assert message["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert message["stop_reason"] == "refusal"
    assert message["usage"] == {"input_tokens": 40, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 60}
    assert message["model"] == "public" and message["id"] == "msg_x"
    broken = completion("x", {"content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}, "tool_calls")
    assert to_message(broken, "public", None)["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {"_arguments": "{oops"}}]


def test_stream_writer_opens_one_block_per_tool_call() -> None:
    writer: Any = AnthropicEvents("m", None, 7)
    head: Any = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "x"}
    calls = [
        {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}},
        {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    data = writer.chunk({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": calls}, "finish_reason": None}]})
    data += writer.chunk({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    data += writer.chunk({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    data += writer.end()
    seq = [(n, d) for n, d in events(httpx.Response(200, content=data))]
    assert [n for n, _ in seq] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert seq[0][1]["message"]["usage"]["input_tokens"] == 7
    assert [d["content_block"]["id"] for n, d in seq if n == "content_block_start"] == ["a", "b"]
    assert seq[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 3, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def test_stream_writer_tells_calls_without_an_index_apart_by_id() -> None:
    writer: Any = AnthropicEvents("m", None, 1)
    head: Any = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "x"}
    data = b""
    for call_id in ("first", "second"):
        call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        data += writer.chunk({**head, "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]})
    data += writer.end()
    starts = [d["content_block"]["id"] for n, d in events(httpx.Response(200, content=data)) if n == "content_block_start"]
    assert starts == ["first", "second"]


def test_translated_request_is_what_the_cache_keys_on() -> None:
    """Fields that only Anthropic's service reads do not change the translated request."""
    plain = to_chat(GOOD)
    decorated = to_chat({**GOOD, "thinking": {"type": "enabled", "budget_tokens": 2048}, "service_tier": "auto", "metadata": {}})
    assert plain == decorated == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
