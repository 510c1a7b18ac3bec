"""``/v1/responses`` through the official OpenAI SDK onto a provider that speaks only chat completions.

The fake upstream records every chat request it gets: what the translation sent is read there,
and its call counter proves what the cache and dedupe saved.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from sqlalchemy import select

from app.api.responses_input import chat_body, parse_responses_body
from app.errors import BadRequestError
from app.storage.db import create_engine
from app.storage.migrate import upgrade_to_head
from app.storage.models import RequestLog, StoredResponse
from app.storage.stored_responses import ResponseStore, StoredRecord
from tests.fake_upstream import FakeUpstream
from tests.provider_answers import DEEPSEEK_REASONER, OPENAI_LOGPROBS, OPENAI_REFUSAL
from tests.serve import NewDatabase
from tests.support import GatewayServer, gateway

KEY_A = "sk-agent-alpha-0001"
KEY_B = "sk-agent-bravo-0002"


def config(up: FakeUpstream, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY_A}, agent: alpha}}
  - {{key: {KEY_B}, agent: bravo}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key, timeout_s: 10}}
models:
  fast: [up/fake-model]
  tools: [up/tooly]
  reasoner: [up/deepseek-reasoner]
  jsony: [up/jsony]
  cutoff: [up/cutoff]
  lp: [up/gpt-4o-2024-08-06]
  refuser: [up/refuser]
routing: {{default: fast}}
retry: {{attempts: 1}}
{extra}
"""


# -- provider answers -----------------------------------------------------------------------------

_T_HEAD = {"id": "chatcmpl-tools-1", "object": "chat.completion.chunk", "created": 1755000000, "model": "tooly"}
_T_USAGE = {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}
_T_CALLS = [
    {"id": "call_weather_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_time_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}},
]


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


TOOL_ANSWER = (
    {
        "id": "chatcmpl-tools-1",
        "object": "chat.completion",
        "created": 1755000000,
        "model": "tooly",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": _T_CALLS}, "logprobs": None, "finish_reason": "tool_calls"}],
        "usage": _T_USAGE,
    },
    [
        _chunk(
            _T_HEAD,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"index": 0, "id": "call_weather_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
            },
        ),
        _chunk(_T_HEAD, {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        _chunk(_T_HEAD, {"tool_calls": [{"index": 1, "id": "call_time_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]}),
        _chunk(_T_HEAD, {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}),
        _chunk(_T_HEAD, {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "Europe/Paris"}'}}]}),
        _chunk(_T_HEAD, {}, "tool_calls"),
        {**_T_HEAD, "choices": [], "usage": _T_USAGE},
    ],
)

_J_HEAD = {"id": "chatcmpl-json-1", "object": "chat.completion.chunk", "created": 1755000001, "model": "jsony"}
_J_TEXT = '{"city": "Paris", "population": 2102650}'
JSON_ANSWER = (
    {
        "id": "chatcmpl-json-1",
        "object": "chat.completion",
        "created": 1755000001,
        "model": "jsony",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _J_TEXT}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    },
    [
        _chunk(_J_HEAD, {"role": "assistant", "content": ""}),
        _chunk(_J_HEAD, {"content": _J_TEXT}),
        _chunk(_J_HEAD, {}, "stop"),
        {**_J_HEAD, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}},
    ],
)

_C_HEAD = {"id": "chatcmpl-cut-1", "object": "chat.completion.chunk", "created": 1755000002, "model": "cutoff"}
CUT_ANSWER = (
    {
        "id": "chatcmpl-cut-1",
        "object": "chat.completion",
        "created": 1755000002,
        "model": "cutoff",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Once upon a"}, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    },
    [
        _chunk(_C_HEAD, {"role": "assistant", "content": "Once upon"}),
        _chunk(_C_HEAD, {"content": " a"}, "length"),
        {**_C_HEAD, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
    ],
)


def answers(up: FakeUpstream) -> None:
    up.answers = {
        "tooly": TOOL_ANSWER,
        "deepseek-reasoner": DEEPSEEK_REASONER,
        "jsony": JSON_ANSWER,
        "cutoff": CUT_ANSWER,
        "gpt-4o-2024-08-06": OPENAI_LOGPROBS,
        "refuser": OPENAI_REFUSAL,
    }


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def upstream(up: FakeUpstream) -> FakeUpstream:
    up.reset()
    answers(up)
    return up


def client(gw: GatewayServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def unique(text: str = "hello") -> str:
    # the gateway is shared by this module's tests: a fresh prompt never meets another test's cache entry
    return f"{text} {uuid.uuid4().hex[:8]}"


def last_chat(up: FakeUpstream) -> dict[str, Any]:
    body = up.chat_requests[-1].body
    assert isinstance(body, dict)
    return body


def events_of(stream: Any) -> list[Any]:
    return list(stream)


# -- plain and streamed ---------------------------------------------------------------------------


def test_plain_create_is_translated_both_ways(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("hello there")
    raw = client(gw).responses.with_raw_response.create(
        model="fast",
        input=prompt,
        instructions="Answer briefly.",
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        reasoning={"effort": "low"},
        metadata={"run": "7"},
        user="u-1",
    )
    response = raw.parse()
    assert raw.headers["x-admiral-cache"] == "miss"
    assert raw.headers["x-admiral-backend"] == "up"
    assert raw.headers["x-admiral-route"] == "fast"
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None and response.incomplete_details is None
    assert response.output_text == f"echo: {prompt}"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (5, 4, 9)
    assert response.usage.input_tokens_details.cached_tokens == 0 and response.usage.output_tokens_details.reasoning_tokens == 0
    # the request's settings come back as OpenAI echoes them
    assert (response.instructions, response.max_output_tokens, response.temperature, response.top_p) == ("Answer briefly.", 64, 0.2, 0.9)
    assert response.metadata == {"run": "7"} and response.store is True and response.user == "u-1"
    assert response.reasoning is not None and response.reasoning.effort == "low"
    sent = last_chat(upstream)
    assert sent["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
    assert (sent["max_completion_tokens"], sent["temperature"], sent["top_p"], sent["reasoning_effort"], sent["user"]) == (64, 0.2, 0.9, "low", "u-1")
    # gateway-only fields never reach the provider
    assert not {"input", "instructions", "store", "metadata", "max_output_tokens", "reasoning"} & set(sent)


EXPECTED_TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_streamed_create_speaks_the_responses_event_sequence(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("streamed")  # "echo: streamed <hex>": three deltas from the fake
    events = events_of(client(gw).responses.create(model="fast", input=prompt, stream=True))
    assert [e.type for e in events] == EXPECTED_TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, in_progress = events[0].response, events[1].response
    assert created.status == in_progress.status == "in_progress" and created.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == f"echo: {prompt}"
    assert events[-4].text == deltas
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[2].item.id}
    final = events[-1].response
    assert final.id == created.id and final.status == "completed" and final.output_text == deltas
    assert final.usage is not None and final.usage.total_tokens > 0
    # the provider was asked for the usage the last event carries
    assert last_chat(upstream)["stream"] is True and last_chat(upstream)["stream_options"] == {"include_usage": True}
    # stored as completed, the same object GET gives back
    assert client(gw).responses.retrieve(final.id).model_dump() == final.model_dump()


def test_sse_lines_name_each_event(gw: GatewayServer, upstream: FakeUpstream) -> None:
    with httpx.stream(
        "POST", f"{gw.base_url}/responses", headers={"Authorization": f"Bearer {KEY_A}"}, json={"model": "fast", "input": unique(), "stream": True}, timeout=10
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b]
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert "[DONE]" not in text  # the Responses API ends with response.completed, not a [DONE] marker


def test_stream_helper_accumulates_the_final_response(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("helper")
    with client(gw).responses.stream(model="fast", input=prompt) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == f"echo: {prompt}"


# -- tools ----------------------------------------------------------------------------------------

WEATHER_TOOLS: Any = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}, "strict": False},
]


def test_function_tool_round_trip(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    question = unique("weather and time in Paris?")
    first = sdk.responses.create(model="tools", input=question, tools=WEATHER_TOOLS, tool_choice="auto", parallel_tool_calls=True, store=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_weather_1", "get_weather", {"city": "Paris"}),
        ("call_time_2", "get_time", {"tz": "Europe/Paris"}),
    ]
    assert first.status == "completed" and len(first.output) == 2
    sent = last_chat(upstream)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_TOOLS[0]["parameters"], "strict": True},
        },
        {"type": "function", "function": {"name": "get_time", "parameters": WEATHER_TOOLS[1]["parameters"], "strict": False}},
    ]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("auto", True)
    # the caller runs the tools and sends everything back, as the Agents SDK does without store
    history: list[Any] = [{"role": "user", "content": question}, *[c.model_dump(exclude_none=True) for c in calls]]
    history += [
        {"type": "function_call_output", "call_id": "call_weather_1", "output": "18C, sunny"},
        {"type": "function_call_output", "call_id": "call_time_2", "output": "14:05"},
    ]
    second = sdk.responses.create(model="fast", input=history, tools=WEATHER_TOOLS, tool_choice={"type": "function", "name": "get_weather"})
    assert second.status == "completed" and second.output_text == f"echo: {question}"
    sent = last_chat(upstream)
    assert sent["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": _T_CALLS},
        {"role": "tool", "tool_call_id": "call_weather_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_time_2", "content": "14:05"},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_streamed_function_calls(gw: GatewayServer, upstream: FakeUpstream) -> None:
    events = events_of(client(gw).responses.create(model="tools", input=unique("weather?"), tools=WEATHER_TOOLS, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds.count("response.output_item.added") == 2 and kinds.count("response.function_call_arguments.done") == 2
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.call_id, i.name) for i in added] == [("function_call", "call_weather_1", "get_weather"), ("function_call", "call_time_2", "get_time")]
    # arguments arrive interleaved; each delta names its own item
    by_item: dict[str, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            by_item[e.item_id] = by_item.get(e.item_id, "") + e.delta
    done = {e.item_id: e.arguments for e in events if e.type == "response.function_call_arguments.done"}
    assert by_item == done == {added[0].id: '{"city": "Paris"}', added[1].id: '{"tz": "Europe/Paris"}'}
    final = events[-1].response
    assert [(o.type, o.arguments, o.status) for o in final.output] == [
        ("function_call", '{"city": "Paris"}', "completed"),
        ("function_call", '{"tz": "Europe/Paris"}', "completed"),
    ]


# -- stored responses -----------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    first_prompt = unique("my name is Ada")
    first = sdk.responses.create(model="fast", input=first_prompt, instructions="Be terse.")
    second = sdk.responses.create(model="fast", input="what is my name?", previous_response_id=first.id, instructions="Be kind.")
    assert second.previous_response_id == first.id
    # the earlier turn's messages, then the new input; only this request's instructions
    assert last_chat(upstream)["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": first_prompt},
        {"role": "assistant", "content": f"echo: {first_prompt}"},
        {"role": "user", "content": "what is my name?"},
    ]
    # and a chain goes on (streamed this time)
    events = events_of(sdk.responses.create(model="fast", input="and again?", previous_response_id=second.id, stream=True))
    third = events[-1].response
    assert [m["content"] for m in last_chat(upstream)["messages"]] == [
        first_prompt,
        f"echo: {first_prompt}",
        "what is my name?",
        "echo: what is my name?",
        "and again?",
    ]
    fourth = sdk.responses.create(model="fast", input="last", previous_response_id=third.id)
    assert last_chat(upstream)["messages"][-2:] == [{"role": "assistant", "content": "echo: and again?"}, {"role": "user", "content": "last"}]
    assert fourth.status == "completed"


def test_previous_tool_calls_continue_with_function_call_output(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    question = unique("weather?")
    first = sdk.responses.create(model="tools", input=question, tools=WEATHER_TOOLS)
    outputs: Any = [{"type": "function_call_output", "call_id": c.call_id, "output": "ok"} for c in first.output if c.type == "function_call"]
    sdk.responses.create(model="fast", input=outputs, previous_response_id=first.id, tools=WEATHER_TOOLS)
    assert last_chat(upstream)["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": _T_CALLS},
        {"role": "tool", "tool_call_id": "call_weather_1", "content": "ok"},
        {"role": "tool", "tool_call_id": "call_time_2", "content": "ok"},
    ]


def test_stored_responses_belong_to_their_agent(gw: GatewayServer, upstream: FakeUpstream) -> None:
    alpha, bravo = client(gw, KEY_A), client(gw, KEY_B)
    mine = alpha.responses.create(model="fast", input=unique())
    assert alpha.responses.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.NotFoundError):
        bravo.responses.retrieve(mine.id)
    calls = upstream.calls
    with pytest.raises(openai.NotFoundError) as caught:
        bravo.responses.create(model="fast", input="go on", previous_response_id=mine.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert upstream.calls == calls  # refused before any upstream call
    with pytest.raises(openai.NotFoundError):
        bravo.responses.delete(mine.id)
    alpha.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        alpha.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        alpha.responses.create(model="fast", input="go on", previous_response_id=mine.id)


def test_input_items_are_listed_page_by_page(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    question = unique("weather?")
    given: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": question}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}", "id": "fc_given"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]
    response = sdk.responses.create(model="fast", input=given, tools=WEATHER_TOOLS)
    listed = sdk.responses.input_items.list(response.id, order="asc")
    assert [i.type for i in listed.data] == ["message", "message", "function_call", "function_call_output"]
    first = listed.data[0]
    assert first.type == "message" and first.role == "developer" and [(c.type, c.text) for c in first.content] == [("input_text", "Be brief.")]  # type: ignore[union-attr]
    assert listed.data[2].id == "fc_given" and len({i.id for i in listed.data}) == 4
    # the last first, two at a time: the SDK follows the pages itself
    pages = sdk.responses.input_items.list(response.id, limit=2)
    assert [i.id for i in pages] == [i.id for i in reversed(listed.data)]
    assert pages.has_more is True
    plain = sdk.responses.create(model="fast", input="just text")
    [item] = sdk.responses.input_items.list(plain.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "just text"  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        client(gw, KEY_B).responses.input_items.list(response.id)
    with pytest.raises(openai.BadRequestError):
        sdk.responses.input_items.list(response.id, limit=500)


def test_store_false_keeps_nothing(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    plain = sdk.responses.create(model="fast", input=unique(), store=False)
    streamed = events_of(sdk.responses.create(model="fast", input=unique(), store=False, stream=True))[-1].response
    assert plain.store is False and streamed.store is False
    for rid in (plain.id, streamed.id):
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(rid)


def test_stored_responses_reach_the_database_and_survive_a_restart(upstream: FakeUpstream, tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/admiral.db"
    cfg = config(upstream, f'database: {{url: "{url}"}}')
    with gateway(cfg) as server:
        first = client(server).responses.create(model="fast", input=unique())
    with gateway(cfg) as server:
        assert client(server).responses.retrieve(first.id).output_text == first.output_text
        client(server).responses.create(model="fast", input="next", previous_response_id=first.id)
        rows = server.call(_rows(server))
    assert first.id in rows


async def _rows(server: GatewayServer) -> set[str]:
    async with server.services.db.connect() as conn:
        return {r.id for r in await conn.execute(select(StoredResponse.__table__.c.id))}


# -- text formats, reasoning, incomplete answers ---------------------------------------------------


class City(BaseModel):
    city: str
    population: int


def test_json_schema_output(gw: GatewayServer, upstream: FakeUpstream) -> None:
    parsed = client(gw).responses.parse(model="jsony", input=unique("largest French city?"), text_format=City)
    assert parsed.output_parsed == City(city="Paris", population=2102650)
    fmt = last_chat(upstream)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"].keys() == {"city", "population"}
    assert parsed.text is not None and parsed.text.format.type == "json_schema"
    client(gw).responses.create(model="jsony", input=unique(), text={"format": {"type": "json_object"}, "verbosity": "low"})
    assert last_chat(upstream)["response_format"] == {"type": "json_object"} and last_chat(upstream)["verbosity"] == "low"


def test_reasoning_becomes_a_reasoning_item(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    response = sdk.responses.create(model="reasoner", input=unique("9.11 or 9.9?"))
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Compare the tenths: 1 is less than 9, so 9.11 < 9.9."
    assert message.type == "message" and response.output_text == "9.11 is smaller than 9.9."
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 33
    events = events_of(sdk.responses.create(model="reasoner", input=unique("9.11 or 9.9?"), stream=True))
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning.content[0].text
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == response.output_text
    # the reasoning is not sent back: chat providers take none (DeepSeek refuses it)
    sdk.responses.create(model="fast", input="thanks", previous_response_id=final.id)
    assert last_chat(upstream)["messages"][-2] == {"role": "assistant", "content": "9.11 is smaller than 9.9."}


def test_cut_by_the_token_limit_is_incomplete(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    response = sdk.responses.create(model="cutoff", input=unique(), max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.output[0].status == "incomplete"
    events = events_of(sdk.responses.create(model="cutoff", input=unique(), max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_logprobs_and_refusals_reach_the_response(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    tokens = OPENAI_LOGPROBS.completion["choices"][0]["logprobs"]["content"]
    response = sdk.responses.create(model="lp", input=unique(), top_logprobs=2, include=["message.output_text.logprobs"])
    assert (last_chat(upstream)["logprobs"], last_chat(upstream)["top_logprobs"]) == (True, 2)
    part = response.output[0].content[0]
    assert part.type == "output_text" and part.text == "Hello there, friend!"
    assert [lp.model_dump() for lp in part.logprobs or ()] == tokens
    events = events_of(sdk.responses.create(model="lp", input=unique(), top_logprobs=2, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [lp.model_dump() for e in deltas for lp in e.logprobs] == tokens
    assert [lp.model_dump() for lp in next(e for e in events if e.type == "response.output_text.done").logprobs or ()] == tokens
    refused = sdk.responses.create(model="refuser", input=unique())
    assert [(p.type, p.refusal) for p in refused.output[0].content] == [("refusal", "I'm sorry, I can't help with that.")]
    events = events_of(sdk.responses.create(model="refuser", input=unique(), stream=True))
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == "I'm sorry, I can't help with that."
    assert events[-1].response.output[0].content[0].type == "refusal"


# -- the layers: cache, dedupe, limits, failover ---------------------------------------------------


def test_cache_is_shared_with_the_equivalent_chat_request(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("cache me")
    sdk = client(gw)
    first = sdk.responses.with_raw_response.create(model="fast", input=prompt, instructions="Be brief.", max_output_tokens=20)
    assert first.headers["x-admiral-cache"] == "miss" and upstream.calls == 1
    # the same request again: a hit, told as a new response of its own
    again = sdk.responses.with_raw_response.create(model="fast", input=prompt, instructions="Be brief.", max_output_tokens=20)
    assert again.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    assert again.parse().id != first.parse().id and again.parse().output_text == first.parse().output_text
    # streamed: the stored answer replayed as Responses events
    events = events_of(sdk.responses.create(model="fast", input=prompt, instructions="Be brief.", max_output_tokens=20, stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == f"echo: {prompt}" and upstream.calls == 1
    # the chat request the translation amounts to is the same request: it shares the entry
    chat = sdk.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}], max_completion_tokens=20
    )
    assert chat.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    assert chat.parse().choices[0].message.content == f"echo: {prompt}"
    # ... and a different one does not (max_tokens is not max_completion_tokens to a provider)
    other = sdk.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}], max_tokens=20
    )
    assert other.headers["x-admiral-cache"] == "miss" and upstream.calls == 2


def test_chat_answers_serve_a_later_responses_request(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    for stream in (False, True):
        prompt = unique(f"chat first {stream}")
        reply = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": prompt}], stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices) == f"echo: {prompt}"  # type: ignore[union-attr]
        calls = upstream.calls
        raw = sdk.responses.with_raw_response.create(model="fast", input=prompt)
        assert raw.headers["x-admiral-cache"] == "hit" and upstream.calls == calls
        assert raw.parse().output_text == f"echo: {prompt}"


def coalesced(gw: GatewayServer) -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0


def test_dedupe_joins_responses_and_chat_requests_in_flight(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("together")

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        async with httpx.AsyncClient(timeout=15) as http:
            upstream.hold()
            leader = asyncio.create_task(http.post(f"{gw.base_url}/responses", headers=headers, json={"model": "fast", "input": prompt}))
            while upstream.held < 1:
                await asyncio.sleep(0.01)
            followers = [
                asyncio.create_task(http.post(f"{gw.base_url}/responses", headers=headers, json={"model": "fast", "input": prompt, "stream": True})),
                asyncio.create_task(
                    http.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "fast", "messages": [{"role": "user", "content": prompt}]})
                ),
            ]
            # both followers are waiting on the leader's call once the gateway counts them
            while coalesced(gw) < before + 2:
                await asyncio.sleep(0.01)
            upstream.release()
            return await asyncio.gather(leader, *followers)

    before = coalesced(gw)
    leader, streamed, chat = asyncio.run(run())
    assert upstream.calls == 1
    assert [r.status_code for r in (leader, streamed, chat)] == [200, 200, 200]
    assert streamed.headers["x-admiral-dedupe"] == chat.headers["x-admiral-dedupe"] == "follower"
    assert leader.json()["output"][0]["content"][0]["text"] == f"echo: {prompt}"
    assert chat.json()["choices"][0]["message"]["content"] == f"echo: {prompt}"
    events = [json.loads(line[6:]) for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["id"] != leader.json()["id"]


def test_agent_rate_limit_applies(upstream: FakeUpstream) -> None:
    cfg = config(upstream).replace(f"{{key: {KEY_A}, agent: alpha}}", f"{{key: {KEY_A}, agent: alpha, rpm: 1}}")
    with gateway(cfg) as server:
        sdk = client(server)
        sdk.responses.create(model="fast", input=unique())
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.responses.create(model="fast", input=unique())
        assert caught.value.response.headers.get("retry-after")


def test_failover_to_the_next_deployment(upstream: FakeUpstream) -> None:
    with FakeUpstream("500") as broken:
        cfg = config(upstream).replace("fast: [up/fake-model]", "fast: [down/fake-model, up/fake-model]")
        cfg = cfg.replace("providers:\n", f'providers:\n  down: {{kind: openai, base_url: "{broken.base_url}", api_key: sk-provider-key}}\n')
        with gateway(cfg) as server:
            raw = client(server).responses.with_raw_response.create(model="fast", input=unique())
            events = events_of(client(server).responses.create(model="fast", input=unique(), stream=True))
        assert raw.headers["x-admiral-backend"] == "up" and raw.parse().status == "completed"
        assert events[-1].type == "response.completed"
        assert broken.calls == 2 and upstream.calls == 2


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fast"}, "input"),
        ({"model": "fast", "input": 5}, "input"),
        ({"model": "fast", "input": "hi", "temperature": 9}, "temperature"),
        ({"model": "fast", "input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
        ({"model": "fast", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"model": "fast", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input[0].content[0].image_url"),
        ({"model": "fast", "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "fast", "input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "fast", "input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"model": "fast", "input": "hi", "background": True}, "background"),
        ({"model": "fast", "input": "hi", "messages": []}, "messages"),
        ({"model": "fast", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "fast", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"model": "fast", "input": "hi", "n": 2}, "n"),
        ({"model": "fast", "input": "hi", "conversation": "conv_1"}, "conversation"),
    ],
)
def test_bad_requests_are_400_naming_the_field(gw: GatewayServer, upstream: FakeUpstream, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{gw.base_url}/responses", headers={"Authorization": f"Bearer {KEY_A}"}, json=body, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert upstream.calls == 0


def test_what_no_provider_here_can_serve_is_refused_before_the_limits_count_it(upstream: FakeUpstream) -> None:
    cfg = config(upstream).replace(f"{{key: {KEY_A}, agent: alpha}}", f"{{key: {KEY_A}, agent: alpha, rpm: 1}}")
    with gateway(cfg) as server:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        refused = httpx.post(f"{server.base_url}/responses", headers=headers, json={"model": "fast", "input": "hi", "tools": [{"type": "web_search"}]}, timeout=10)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools[0].type"
        # the agent's one request a minute is still there
        assert httpx.post(f"{server.base_url}/responses", headers=headers, json={"model": "fast", "input": "hi"}, timeout=10).status_code == 200


def test_malformed_bodies_in_openai_error_shape(gw: GatewayServer, upstream: FakeUpstream) -> None:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    for raw in (b"", b"{not json", b"[1, 2]"):
        r = httpx.post(f"{gw.base_url}/responses", headers=headers, content=raw, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client(gw).responses.create(model="fast", input=[{"type": "item_reference", "id": "msg_1"}])
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-not-a-key-at-all").responses.create(model="fast", input="hi")
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-not-a-key-at-all").responses.retrieve("resp_1")
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.create(model="no-such-model", input="hi")
    assert upstream.calls == 0


def test_provider_refusal_keeps_its_code(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.behaviour = "status:400"
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).responses.create(model="fast", input=unique())
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"


def test_failure_mid_stream_ends_with_error_and_response_failed(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.behaviour = "cut"
    events = events_of(client(gw).responses.create(model="fast", input=unique("a b c d"), stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.message
    assert events[-2].message == failed.error.message
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.retrieve(failed.id)  # a failed response is not kept


def test_requests_are_logged_as_responses(upstream: FakeUpstream) -> None:
    with gateway(config(upstream)) as server:
        client(server).responses.create(model="fast", input=unique())
        server.call(server.services.log_writer.close())  # type: ignore[union-attr]
        rows = server.call(_log_rows(server))
    assert [(r.endpoint, r.agent, r.status, r.route) for r in rows] == [("responses", "alpha", 200, "fast")]


async def _log_rows(server: GatewayServer) -> list[Any]:
    async with server.services.db.connect() as conn:
        return list(await conn.execute(select(RequestLog.__table__)))


# -- translation details ---------------------------------------------------------------------------


def test_input_items_translate_to_chat_messages() -> None:
    body = parse_responses_body(
        orjson.dumps(
            {
                "model": "m",
                "input": [
                    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                        ],
                    },
                    {"type": "reasoning", "id": "rs_1", "summary": []},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
                    {"type": "function_call", "call_id": "c1", "name": "zoom", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "zoomed"}]},
                ],
                "top_k": 5,
            }
        )
    )
    chat, conversation = chat_body(body, [])
    assert chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}],
        },
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "zoomed"},
    ]
    assert conversation == chat["messages"]
    assert chat["top_k"] == 5  # a provider extra travels on, as on chat


def test_unsupported_tool_types_are_refused() -> None:
    body = parse_responses_body(b'{"model": "m", "input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}')
    with pytest.raises(BadRequestError) as caught:
        chat_body(body, [])
    assert caught.value.param == "tools[0].type"


# -- the store itself ------------------------------------------------------------------------------


def _record(rid: str, agent: str = "alpha", created_at: float = 1000.0) -> StoredRecord:
    return StoredRecord(rid, agent, created_at, [{"role": "user", "content": "hi"}], {"id": rid, "object": "response"})


async def _store_checks(url: str) -> None:
    engine = create_engine(url)
    now = [1_000_000.0]
    # no retention loop here: the prune below is the only one
    store = ResponseStore(engine, retention_days=None)
    store.start()
    try:
        store.put(_record("resp_old", created_at=now[0] - 2 * 86400))
        store.put(_record("resp_new", created_at=now[0] - 3600))
        store.put(_record("resp_bravo", agent="bravo", created_at=now[0]))
        # readable at once, before the background write
        assert (await store.get("resp_new", "alpha")) is not None
        assert await store.get("resp_bravo", "alpha") is None
        while store._pending:
            await asyncio.sleep(0.01)
        record = await store.get("resp_new", "alpha")
        assert record is not None and record.conversation == [{"role": "user", "content": "hi"}] and record.response["id"] == "resp_new"
        assert await store.prune() == 0  # no retention_days: nothing is pruned
        assert await ResponseStore(engine, retention_days=1, clock=lambda: now[0]).prune() == 1
        assert await store.get("resp_old", "alpha") is None and await store.get("resp_new", "alpha") is not None
        assert not await store.delete("resp_bravo", "alpha")
        assert await store.delete("resp_bravo", "bravo")
        assert await store.get("resp_bravo", "bravo") is None
    finally:
        await store.aclose()
        await engine.dispose()


def test_store_writes_behind_prunes_and_scopes_by_agent_sqlite(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/store.db"
    upgrade_to_head(url)
    asyncio.run(_store_checks(url))


def test_store_on_postgres(new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    upgrade_to_head(url)
    asyncio.run(_store_checks(url))


def test_store_writes_what_waits_at_close(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/store.db"
    upgrade_to_head(url)

    async def run() -> None:
        engine = create_engine(url)
        store = ResponseStore(engine)
        store.put(_record("resp_late"))  # never started: only close writes it
        await store.aclose()
        again = ResponseStore(engine)
        assert await again.get("resp_late", "alpha") is not None
        await engine.dispose()

    asyncio.run(run())


def test_a_response_deleted_while_its_write_is_under_way_stays_deleted(tmp_path: Any) -> None:
    # the delete comes while the insert is on its way, and the flush's own delete of the row fails
    # once: until that delete has been tried again (after the backoff), a read must not find the
    # row the client was told is gone, and the retry must not forget it
    url = f"sqlite+aiosqlite:///{tmp_path}/store.db"
    upgrade_to_head(url)
    failures = [1]

    def slow(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # runs on the event loop (SQLAlchemy's async engine calls it there): the sleep holds the
        # insert under way while the test's delete is already waiting to run
        if statement.startswith("INSERT INTO stored_responses"):
            time.sleep(0.1)
        elif statement.startswith("DELETE FROM stored_responses") and failures[0]:
            failures[0] -= 1
            raise RuntimeError("database is locked")

    async def run() -> None:
        engine = create_engine(url)
        sqlalchemy.event.listen(engine.sync_engine, "before_cursor_execute", slow)
        store = ResponseStore(engine, retention_days=None, backoff_s=0.3)
        store.start()
        try:
            store.put(_record("resp_gone"))
            while not store._writing:
                await asyncio.sleep(0.005)
            assert await store.delete("resp_gone", "alpha")
            assert not await store.delete("resp_gone", "alpha")
            seen = []
            while store._doomed:
                seen.append(await store.get("resp_gone", "alpha"))
                await asyncio.sleep(0.02)
            assert len(seen) >= 5 and seen == [None] * len(seen)
            assert store.failures == 1  # the failed delete was tried again
        finally:
            await store.aclose()
        assert await ResponseStore(engine).get("resp_gone", "alpha") is None
        await engine.dispose()

    asyncio.run(run())


def test_stored_responses_are_pruned_after_the_request_logs_retention(up: FakeUpstream, tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/retention.db"
    upgrade_to_head(url)
    day = 86400

    async def keep(*records: StoredRecord) -> None:
        engine = create_engine(url)
        store = ResponseStore(engine)
        for record in records:
            store.put(record)
        await store.aclose()  # writes what waits
        await engine.dispose()

    now = time.time()
    asyncio.run(keep(_record("resp_last_week", created_at=now - 7 * day), _record("resp_yesterday", created_at=now - day / 2)))
    with gateway(config(up, f'database: {{url: "{url}", retention_days: 3}}')) as gw:
        alpha = client(gw)
        deadline = time.monotonic() + 30  # the retention task runs once at start, then hourly
        while time.monotonic() < deadline:
            try:
                alpha.responses.retrieve("resp_last_week")
            except openai.NotFoundError:
                break
            time.sleep(0.05)
        with pytest.raises(openai.NotFoundError):
            alpha.responses.retrieve("resp_last_week")
        assert alpha.responses.retrieve("resp_yesterday").id == "resp_yesterday"


# -- providers with responses: native ---------------------------------------------------------------


def native_config(up: FakeUpstream) -> str:
    return f"""
keys:
  - {{key: {KEY_A}, agent: alpha}}
providers:
  nat: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key, responses: native}}
models:
  native: [nat/gpt-native]
retry: {{attempts: 1}}
"""


def responses_requests(up: FakeUpstream) -> list[dict[str, Any]]:
    return [r.body for r in up.requests if r.path == "/v1/responses"]


NATIVE_CALL = {
    "id": "resp_native_tool",
    "object": "response",
    "created_at": 1755000000,
    "status": "completed",
    "model": "gpt-native",
    "output": [
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Need the weather."}]},
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_native_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    ],
    "usage": {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 10},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 42,
    },
}


def test_native_provider_gets_responses_requests(upstream: FakeUpstream) -> None:
    with gateway(native_config(upstream)) as server:
        sdk = client(server)
        prompt = unique("native hello")
        response = sdk.responses.create(
            model="native", input=prompt, instructions="Be brief.", max_output_tokens=50, reasoning={"effort": "high"}, metadata={"a": "b"}
        )
        assert response.output_text == f"echo: {prompt}" and response.status == "completed"
        assert response.usage is not None and response.usage.output_tokens == 4
        [sent] = responses_requests(upstream)
        # forwarded as the client sent it, but for the model and store
        assert sent == {
            "model": "gpt-native",
            "input": prompt,
            "instructions": "Be brief.",
            "store": False,
            "max_output_tokens": 50,
            "reasoning": {"effort": "high"},
            "metadata": {"a": "b"},
        }
        assert upstream.chat_requests == []
        # streamed, and continued from the gateway's own stored response (the provider keeps nothing)
        events = events_of(sdk.responses.create(model="native", input="more", previous_response_id=response.id, stream=True))
        assert [e.type for e in events][-1] == "response.completed" and events[-1].response.output_text == "echo: more"
        sent = responses_requests(upstream)[-1]
        assert sent["stream"] is True and "previous_response_id" not in sent
        [answered] = [item.model_dump(exclude_none=True) for item in response.output]
        assert sent["input"] == [{"role": "user", "content": prompt}, answered, {"role": "user", "content": "more"}]
        # a chat client reaches the same provider through its Responses API
        chat = sdk.chat.completions.create(model="native", messages=[{"role": "user", "content": "chat via responses"}], max_tokens=9)
        assert chat.choices[0].message.content == "echo: chat via responses" and chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and chat.usage.total_tokens > 0
        assert responses_requests(upstream)[-1]["max_output_tokens"] == 9
        chunks = list(
            sdk.chat.completions.create(
                model="native", messages=[{"role": "user", "content": "streamed chat"}], stream=True, stream_options={"include_usage": True}
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: streamed chat"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_native_tool_calls_and_reasoning(upstream: FakeUpstream) -> None:
    upstream.responses_answers = {"gpt-native": NATIVE_CALL}  # type: ignore[attr-defined]
    try:
        with gateway(native_config(upstream)) as server:
            sdk = client(server)
            tools: Any = [WEATHER_TOOLS[0]]
            response = sdk.responses.create(model="native", input=unique("weather in Oslo?"), tools=tools, tool_choice="required")
            assert [o.type for o in response.output] == ["reasoning", "function_call"]
            call = response.output[1]
            assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == ("call_native_1", "get_weather", '{"city": "Oslo"}')
            assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 10
            sent = responses_requests(upstream)[-1]
            assert sent["tools"] == [{"type": "function", **{k: v for k, v in WEATHER_TOOLS[0].items() if k != "type"}}] and sent["tool_choice"] == "required"
            events = events_of(sdk.responses.create(model="native", input=unique("weather in Oslo?"), tools=tools, stream=True))
            final = events[-1].response
            assert [o.type for o in final.output] == ["reasoning", "function_call"] and final.output[1].arguments == '{"city": "Oslo"}'
            # the tool's output goes back as a function_call_output item
            outputs: Any = [{"type": "function_call_output", "call_id": "call_native_1", "output": "cold"}]
            sdk.responses.create(model="native", input=outputs, previous_response_id=response.id, tools=tools)
            # the provider's own items (its reasoning among them) go back to it as it sent them
            assert responses_requests(upstream)[-1]["input"][-3:] == [*NATIVE_CALL["output"], outputs[0]]
            # a chat client is told the usage's details in chat's words
            chat = sdk.chat.completions.create(model="native", messages=[{"role": "user", "content": unique("weather?")}])
            assert chat.usage is not None and chat.usage.prompt_tokens_details is not None and chat.usage.completion_tokens_details is not None
            assert (chat.usage.prompt_tokens_details.cached_tokens, chat.usage.completion_tokens_details.reasoning_tokens) == (10, 4)
    finally:
        upstream.responses_answers = {}  # type: ignore[attr-defined]


def test_native_refuses_what_the_responses_api_cannot_say(upstream: FakeUpstream) -> None:
    with gateway(native_config(upstream)) as server:
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).chat.completions.create(model="native", messages=[{"role": "user", "content": "hi"}], stop=["\n"])
        assert caught.value.param == "stop" and caught.value.code == "unsupported_parameter"
        assert upstream.calls == 0
        upstream.behaviour = "status:400"
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).responses.create(model="native", input="too long")
        assert caught.value.code == "context_length_exceeded"
        upstream.behaviour = "cut"
        events = events_of(client(server).responses.create(model="native", input=unique("a b c"), stream=True))
        assert [e.type for e in events][-2:] == ["error", "response.failed"]


def test_native_applies_to_openai_providers_only() -> None:
    from app.config import ConfigError
    from tests.support import make_settings

    with pytest.raises(ConfigError, match="responses: native"):
        make_settings({"providers": {"d": {"kind": "demo", "responses": "native"}}, "models": {"m": ["d/x"]}})


# -- the OpenAI Agents SDK --------------------------------------------------------------------------


class ToolThenText:
    """A provider answer that calls get_weather until the conversation holds its result, then says the weather."""

    def __init__(self, up: FakeUpstream) -> None:
        self._up = up

    def _answered(self) -> bool:
        messages = self._up.chat_requests[-1].body["messages"]
        return any(m.get("role") == "tool" for m in messages)

    @property
    def completion(self) -> dict[str, Any]:
        if not self._answered():
            return {
                **TOOL_ANSWER[0],
                "choices": [{**TOOL_ANSWER[0]["choices"][0], "message": {"role": "assistant", "content": None, "tool_calls": _T_CALLS[:1]}}],
            }
        message = {"role": "assistant", "content": "It is 18C and sunny in Paris."}
        return {**TOOL_ANSWER[0], "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}

    @property
    def chunks(self) -> list[dict[str, Any]]:
        if not self._answered():
            return [*TOOL_ANSWER[1][:2], *TOOL_ANSWER[1][3:4], TOOL_ANSWER[1][5], TOOL_ANSWER[1][6]]
        return [
            _chunk(_T_HEAD, {"role": "assistant", "content": "It is 18C"}),
            _chunk(_T_HEAD, {"content": " and sunny in Paris."}),
            _chunk(_T_HEAD, {}, "stop"),
            {**_T_HEAD, "choices": [], "usage": _T_USAGE},
        ]


def test_agents_sdk_runs_tools_structured_output_and_streams(gw: GatewayServer, upstream: FakeUpstream) -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    upstream.answers["tooly"] = ToolThenText(upstream)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return "18C, sunny"

    def model(name: str) -> Any:
        # a client per run: each run_sync and asyncio.run has its own event loop
        return agents.OpenAIResponsesModel(model=name, openai_client=AsyncOpenAI(base_url=gw.base_url, api_key=KEY_A, max_retries=0))

    def weather() -> Any:
        return agents.Agent(name="weather", instructions="Use the tools.", model=model("tools"), tools=[get_weather])

    config = agents.RunConfig(tracing_disabled=True)
    result = agents.Runner.run_sync(weather(), unique("Weather in Paris?"), run_config=config)
    assert result.final_output == "It is 18C and sunny in Paris." and asked == ["Paris"]
    # the second call carried the tool's result back as a tool message after the assistant's call
    messages = last_chat(upstream)["messages"]
    assert messages[0] == {"role": "system", "content": "Use the tools."}
    assert messages[-2]["tool_calls"][0]["id"] == "call_weather_1" and messages[-1] == {
        "role": "tool",
        "tool_call_id": "call_weather_1",
        "content": "18C, sunny",
    }
    assert last_chat(upstream)["tools"][0]["function"]["name"] == "get_weather"

    async def streamed() -> str:
        run = agents.Runner.run_streamed(weather(), unique("Weather in Paris, streamed?"), run_config=config)
        text = ""
        async for event in run.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                text += event.data.delta
        assert run.final_output == text
        return text

    assert asyncio.run(streamed()) == "It is 18C and sunny in Paris." and asked == ["Paris", "Paris"]

    class CityFacts(BaseModel):
        city: str
        population: int

    facts = agents.Agent(name="facts", model=model("jsony"), output_type=CityFacts)
    assert agents.Runner.run_sync(facts, unique("Largest French city?"), run_config=config).final_output == CityFacts(city="Paris", population=2102650)
    assert last_chat(upstream)["response_format"]["type"] == "json_schema"


# -- fuzz -----------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
_json = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=10)
_texts = st.text(max_size=20)
_items = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]), "content": _texts}),
    st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.just("user"),
            "content": st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": _texts}), max_size=2),
        }
    ),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": _texts, "name": _texts, "arguments": _texts}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": _texts, "output": _texts}),
    st.fixed_dictionaries({"type": st.just("reasoning"), "id": _texts, "summary": st.just([])}),
)
_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["fast", "tools", "reasoner", "auto", "up/fake-model"]), "input": _texts | st.lists(_items, min_size=1, max_size=4)},
    optional={
        "stream": st.booleans(),
        "instructions": _texts,
        "max_output_tokens": st.integers(min_value=1, max_value=2**40),
        "temperature": st.floats(min_value=0, max_value=2),
        "tools": st.just(WEATHER_TOOLS),
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "get_weather"}]),
        "text": st.sampled_from([{"format": {"type": "text"}}, {"format": {"type": "json_object"}}]),
        "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["low", "high"])}),
        "store": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        "top_k": _json,
    },
)


def _places(node: Any) -> list[tuple[Any, Any]]:
    found: list[tuple[Any, Any]] = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        found.append((node, key))
        found.extend(_places(value))
    return found


@st.composite
def _mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one or two places replaced by any JSON value."""
    body = json.loads(json.dumps(draw(_valid)))  # a copy: st.just and sampled_from hand out shared objects
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        places = _places(body)
        container, key = places[draw(st.integers(min_value=0, max_value=len(places) - 1))]
        container[key] = draw(_json)
    return body


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500], r.request.content[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().split("\n")[-1].startswith("data: "), r.text[-300:]
        last = json.loads(r.text.rstrip().split("\n")[-1][6:])
        assert last["type"] in ("response.completed", "response.incomplete"), last
    else:
        assert r.json()["object"] == "response", r.text[:300]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_valid | _mutated() | _json)
def test_fuzz_never_a_server_error(gw: GatewayServer, upstream: FakeUpstream, body: Any) -> None:
    _check(httpx.post(f"{gw.base_url}/responses", headers={"Authorization": f"Bearer {KEY_A}"}, json=body, timeout=15))


def test_deep_nesting_is_a_400(gw: GatewayServer, upstream: FakeUpstream) -> None:
    deep = b'{"model": "fast", "input": "hi", "top_k": ' + b"[" * 300 + b"]" * 300 + b"}"
    r = httpx.post(f"{gw.base_url}/responses", headers={"Authorization": f"Bearer {KEY_A}"}, content=deep, timeout=10)
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"]


# -- the event writer on its own --------------------------------------------------------------------


def _written(writer: Any, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = b"".join(writer.chunk(c) for c in chunks) + writer.end()
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            event, data = block.split("\n")
            events.append(json.loads(data.removeprefix("data: ")))
            assert event == "event: " + events[-1]["type"]
    return events


def test_writer_gives_an_empty_answer_one_empty_message() -> None:
    from app.api.responses_output import ResponsesEvents

    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = _written(ResponsesEvents({"model": "m"}, "resp_x", 1), [_chunk(head, {"role": "assistant", "content": ""}), _chunk(head, {}, "stop")])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"] == [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]


def test_writer_opens_a_new_item_for_each_kind_in_turn() -> None:
    from app.api.responses_output import ResponsesEvents

    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    kept: list[Any] = []
    chunks = [
        _chunk(head, {"role": "assistant", "reasoning": "think"}),
        _chunk(head, {"content": "Let me check."}),
        _chunk(head, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}),
        _chunk(head, {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        _chunk(head, {}, "tool_calls"),
        {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]
    events = _written(ResponsesEvents({"model": "m"}, "resp_x", 1, lambda response, turn: kept.append((response, turn))), chunks)
    final = events[-1]["response"]
    assert [(o["type"], o["status"]) for o in final["output"]] == [("reasoning", "completed"), ("message", "completed"), ("function_call", "completed")]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert final["output"][2]["arguments"] == '{"a": 1}' and final["usage"]["total_tokens"] == 7
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    assert len({o["id"] for o in final["output"]}) == 3
    # what is stored: the response as sent, and the assistant turn in chat form (no reasoning)
    [(response, turn)] = kept
    assert response == final
    assert turn == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }


def test_store_keeps_what_the_database_refused_and_writes_it_later(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/late.db"

    async def run() -> None:
        engine = create_engine(url)  # no schema yet: every insert fails
        store = ResponseStore(engine, backoff_s=0.01, max_backoff_s=0.05)
        store.start()
        try:
            store.put(_record("resp_waiting"))
            while store.failures == 0:
                await asyncio.sleep(0.01)
            assert await store.get("resp_waiting", "alpha") is not None  # served from memory meanwhile
            await asyncio.to_thread(upgrade_to_head, url)
            deadline = time.monotonic() + 10
            while store._pending:
                assert time.monotonic() < deadline, "the stored response was never written"
                await asyncio.sleep(0.01)
            async with engine.connect() as conn:
                assert (await conn.execute(select(StoredResponse.__table__.c.id))).scalars().all() == ["resp_waiting"]
        finally:
            await store.aclose()
            await engine.dispose()

    asyncio.run(run())


def test_store_deletes_before_the_write_and_retries_idempotently(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/store.db"
    upgrade_to_head(url)

    async def run() -> None:
        engine = create_engine(url)
        store = ResponseStore(engine)  # not started: the test decides when it writes
        try:
            store.put(_record("resp_gone"))
            assert await store.delete("resp_gone", "alpha")
            store.put(_record("resp_kept"))
            assert await store._flush()
            # the same row again (a retry after a commit whose answer was lost) is no error
            store.put(_record("resp_kept"))
            assert await store._flush() and store.failures == 0
            async with engine.connect() as conn:
                assert (await conn.execute(select(StoredResponse.__table__.c.id))).scalars().all() == ["resp_kept"]
        finally:
            await store.aclose()
            await engine.dispose()

    asyncio.run(run())
