"""``/v1/responses`` forwarded to providers with the Responses API natively (``responses: native``).

Driven by the official OpenAI SDK against the fake upstream's ``/v1/responses``: what the
provider was sent is read from the fake's recordings, and its call counter proves what the cache
and dedupe saved.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fake_responses import events_of
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

KEY = "sk-agent-alpha-0001"


def config(up: FakeUpstream) -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: alpha}}
providers:
  nat: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key, responses: native}}
  nat2: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key, responses: native}}
  chat: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key}}
models:
  native: [nat/gpt-native]
  natives: [nat/gpt-broken, nat2/gpt-native]
  mixed: [nat/gpt-broken, chat/fake-model]
  translated: [chat/fake-model]
  rich: [nat/gpt-rich]
retry: {{attempts: 1}}
"""


#: a provider's answer with what chat cannot say: a built-in tool's call, encrypted reasoning,
#: a citation, a field of the provider's own
RICH: dict[str, Any] = {
    "id": "resp_provider_rich",
    "object": "response",
    "created_at": 1755000000,
    "status": "completed",
    "background": False,
    "error": None,
    "incomplete_details": None,
    "model": "gpt-rich-2025",
    "output": [
        {"id": "ws_1", "type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "weather oslo"}},
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "Searched."}], "encrypted_content": "gAAAA-opaque"},
        {
            "id": "msg_1",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "It is cold in Oslo.",
                    "annotations": [{"type": "url_citation", "start_index": 0, "end_index": 5, "url": "https://weather.example/oslo", "title": "Oslo"}],
                }
            ],
        },
    ],
    "reasoning": {"effort": "low", "summary": "auto"},
    "tools": [{"type": "web_search_preview", "search_context_size": "medium"}],
    "service_tier": "default",
    "usage": {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 29,
    },
    "x_provider_trace": {"region": "eu"},
}
WEB_SEARCH: Any = [{"type": "web_search_preview"}]


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def upstream(up: FakeUpstream) -> Iterator[FakeUpstream]:
    up.reset()
    up.by_model = {"gpt-broken": "status:500"}
    up.responses_answers = {"gpt-rich": RICH}  # type: ignore[attr-defined]
    yield up
    up.responses_answers = {}  # type: ignore[attr-defined]


def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)


def unique(text: str = "hello") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def sent(up: FakeUpstream) -> list[dict[str, Any]]:
    return [r.body for r in up.requests if r.path == "/v1/responses"]


def post(gw: GatewayServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/responses", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=15)


def sse(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: ")]


def providers_own(response: dict[str, Any], rid: str) -> dict[str, Any]:
    """RICH as the gateway tells it: its id, and what it settled itself (previous_response_id, store)."""
    return {**response, "id": rid, "store": True, "previous_response_id": None}


def test_built_in_tools_and_encrypted_reasoning_reach_the_provider_unchanged(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("weather in Oslo?")
    items: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": prompt}]},
        {"type": "reasoning", "id": "rs_0", "summary": [], "encrypted_content": "gAAAA-from-the-last-turn"},
        {"type": "item_reference", "id": "msg_0"},
    ]
    body = {
        "model": "native",
        "input": items,
        "tools": [{"type": "web_search_preview", "search_context_size": "low"}, {"type": "code_interpreter", "container": {"type": "auto"}}],
        "include": ["reasoning.encrypted_content", "web_search_call.action.sources"],
        "reasoning": {"effort": "low", "summary": "auto"},
        "max_tool_calls": 3,
        "top_k": 5,
    }
    r = post(gw, body)
    assert r.status_code == 200, r.text
    [forwarded] = sent(upstream)
    assert forwarded == {**body, "model": "gpt-native", "store": False}
    assert upstream.chat_requests == []
    # a plain request says nothing of streaming: stream_options is refused without stream: true
    assert post(gw, {**body, "input": unique(), "stream": False, "stream_options": {"include_obfuscation": False}}).status_code == 200
    assert "stream" not in sent(upstream)[-1] and "stream_options" not in sent(upstream)[-1]


def test_the_providers_items_and_fields_reach_the_client_plain_and_streamed(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    r = post(gw, {"model": "rich", "input": unique("weather?"), "tools": WEB_SEARCH})
    assert r.status_code == 200 and r.json() == providers_own(RICH, r.json()["id"])
    rid = r.json()["id"]
    assert rid.startswith("resp_") and rid != RICH["id"]
    # the SDK reads the provider's own items
    response = sdk.responses.create(model="rich", input=unique("weather?"), tools=WEB_SEARCH)
    assert [o.type for o in response.output] == ["web_search_call", "reasoning", "message"]
    assert response.output[1].encrypted_content == "gAAAA-opaque"  # type: ignore[union-attr]
    assert response.output_text == "It is cold in Oslo." and (response.model_extra or {})["x_provider_trace"] == {"region": "eu"}
    # kept as the client got it
    assert sdk.responses.retrieve(rid).model_dump(exclude_unset=True) == providers_own(RICH, rid)
    # streamed: the provider's events as it sent them, each response in them the gateway's
    streamed = post(gw, {"model": "rich", "input": unique("weather?"), "tools": WEB_SEARCH, "stream": True})
    events = sse(streamed)
    srid = events[0]["response"]["id"]
    expected = events_of(RICH)
    for event in expected:
        if "response" in event:
            event["response"] = {**event["response"], "id": srid, "store": True, "previous_response_id": None}
    assert events == expected
    assert [line[7:] for line in streamed.text.split("\n") if line.startswith("event: ")] == [e["type"] for e in expected]
    # the SDK's stream helper gathers them into the provider's response
    with sdk.responses.stream(model="rich", input=unique("weather?"), tools=WEB_SEARCH) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_item.added" in kinds and kinds[-1] == "response.completed"
    assert [o.type for o in final.output] == ["web_search_call", "reasoning", "message"] and final.output_text == "It is cold in Oslo."
    assert final.output[1].encrypted_content == "gAAAA-opaque"  # type: ignore[union-attr]


def test_cache_hits_and_dedupe_followers_get_the_providers_answer(gw: GatewayServer, upstream: FakeUpstream) -> None:
    # streamed first: stored as the provider's events
    request = {"model": "rich", "input": unique("cache me"), "tools": WEB_SEARCH}
    first = post(gw, {**request, "stream": True})
    assert first.headers["x-admiral-cache"] == "miss" and upstream.calls == 1
    # a plain hit is those events' response; a streamed hit is the events again
    plain = post(gw, request)
    assert plain.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    assert plain.json() == providers_own(RICH, plain.json()["id"])
    again = post(gw, {**request, "stream": True})
    assert again.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    assert [e["type"] for e in sse(again)] == [e["type"] for e in events_of(RICH)]
    assert sse(again)[-1]["response"]["output"] == RICH["output"]
    # plain first: stored as the response object; a streamed hit is told as its events
    request = {"model": "rich", "input": unique("cache me plain"), "tools": WEB_SEARCH}
    post(gw, request)
    calls = upstream.calls
    streamed = client(gw).responses.create(**request, stream=True)
    final = [e for e in streamed][-1]
    assert final.type == "response.completed" and upstream.calls == calls
    assert final.response.model_dump(exclude_unset=True)["output"] == RICH["output"]
    # in flight: a follower, plain or streamed, gets the leader's answer whole
    prompt = unique("together")
    body = {"model": "rich", "input": prompt, "tools": WEB_SEARCH}

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(timeout=15) as http:
            upstream.hold()
            leader = asyncio.create_task(http.post(f"{gw.base_url}/responses", headers=headers, json=body))
            while upstream.held < 1:
                await asyncio.sleep(0.01)
            followers = [
                asyncio.create_task(http.post(f"{gw.base_url}/responses", headers=headers, json=body)),
                asyncio.create_task(http.post(f"{gw.base_url}/responses", headers=headers, json={**body, "stream": True})),
            ]
            while coalesced(gw) < before + 2:
                await asyncio.sleep(0.01)
            upstream.release()
            return await asyncio.gather(leader, *followers)

    before = coalesced(gw)
    calls = upstream.calls
    leader, follower, streamed_follower = asyncio.run(run())
    assert upstream.calls == calls + 1
    assert follower.headers["x-admiral-dedupe"] == streamed_follower.headers["x-admiral-dedupe"] == "follower"
    assert leader.json() == providers_own(RICH, leader.json()["id"]) and follower.json() == providers_own(RICH, follower.json()["id"])
    assert sse(streamed_follower)[-1]["response"]["output"] == RICH["output"]


def coalesced(gw: GatewayServer) -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0


def test_a_native_failure_fails_over_to_the_next_native_deployment(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("fail over")
    raw = client(gw).responses.with_raw_response.create(model="natives", input=prompt, tools=WEB_SEARCH)
    assert raw.headers["x-admiral-backend"] == "nat2" and raw.parse().output_text == f"echo: {prompt}"
    assert [(b["model"], b["tools"]) for b in sent(upstream)] == [("gpt-broken", WEB_SEARCH), ("gpt-native", WEB_SEARCH)]
    events = list(client(gw).responses.create(model="natives", input=unique("fail over"), tools=WEB_SEARCH, stream=True))
    assert events[-1].type == "response.completed" and [b["model"] for b in sent(upstream)][-2:] == ["gpt-broken", "gpt-native"]


def test_what_chat_can_say_fails_over_to_a_translated_deployment(gw: GatewayServer, upstream: FakeUpstream) -> None:
    prompt = unique("fail over to chat")
    items: Any = [{"role": "user", "content": prompt}, {"type": "reasoning", "id": "rs_0", "summary": [], "encrypted_content": "gAAAA-x"}]
    raw = client(gw).responses.with_raw_response.create(model="mixed", input=items, include=["reasoning.encrypted_content"])
    assert raw.headers["x-admiral-backend"] == "chat" and raw.parse().output_text == f"echo: {prompt}"
    # the native deployment was sent the request as it came, the translated one its chat request
    [native] = sent(upstream)
    assert native["input"] == items and native["include"] == ["reasoning.encrypted_content"]
    [chat] = upstream.chat_requests
    assert chat.body["messages"] == [{"role": "user", "content": prompt}]  # type: ignore[index]
    events = list(client(gw).responses.create(model="mixed", input=unique("streamed to chat"), stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text.startswith("echo: streamed to chat")


def test_what_only_the_responses_api_says_goes_only_to_native_deployments(gw: GatewayServer, upstream: FakeUpstream) -> None:
    # a route with a native deployment forwards it...
    assert post(gw, {"model": "native", "input": unique(), "tools": WEB_SEARCH}).status_code == 200
    # (background responses are not the gateway's on any route: the provider keeps nothing to poll)
    refused = post(gw, {"model": "native", "input": unique(), "background": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "background"
    upstream.reset(behaviours=False)
    # ... a route without one refuses it, naming the feature
    for body, param in (
        ({"tools": WEB_SEARCH}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ):
        r = post(gw, {"model": "translated", "input": unique(), **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # ... and a route with both never translates it: its native deployment failed, so did the request
    r = post(gw, {"model": "mixed", "input": unique(), "tools": WEB_SEARCH})
    assert r.status_code == 502 and "nat/gpt-broken" in r.json()["error"]["message"]
    assert upstream.chat_requests == [] and [b["model"] for b in sent(upstream)] == ["gpt-broken"]


def test_previous_response_id_across_a_forward(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    first = sdk.responses.create(model="rich", input="weather in Oslo?", tools=WEB_SEARCH)
    # forwarded on: the stored conversation as items, the provider's own as it sent them
    second = sdk.responses.create(model="native", input="and tomorrow?", previous_response_id=first.id, tools=WEB_SEARCH)
    forwarded = sent(upstream)[-1]
    assert "previous_response_id" not in forwarded and forwarded["store"] is False
    assert forwarded["input"] == [{"role": "user", "content": "weather in Oslo?"}, *RICH["output"], {"role": "user", "content": "and tomorrow?"}]
    assert second.previous_response_id == first.id and second.output_text == "echo: and tomorrow?"
    # translated on: the same conversation as chat messages (what chat cannot take left out)
    third = sdk.responses.create(model="translated", input="and the day after?", previous_response_id=second.id)
    assert third.output_text == "echo: and the day after?"
    assert upstream.chat_requests[-1].body["messages"] == [  # type: ignore[index]
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "It is cold in Oslo."},
        {"role": "user", "content": "and tomorrow?"},
        {"role": "assistant", "content": "echo: and tomorrow?"},
        {"role": "user", "content": "and the day after?"},
    ]
    # and forwarded again: the translated answer as plain text
    sdk.responses.create(model="native", input="thanks", previous_response_id=third.id, stream=True).close()
    assert sent(upstream)[-1]["input"][-2:] == [{"role": "assistant", "content": "echo: and the day after?"}, {"role": "user", "content": "thanks"}]


def test_the_request_log_counts_a_forwarded_answers_tokens(upstream: FakeUpstream, tmp_path: Any) -> None:
    with gateway(config(upstream) + f'database: {{url: "sqlite+aiosqlite:///{tmp_path}/log.db", log_content: true}}\n') as server:
        client(server).responses.create(model="rich", input=unique("logged"), tools=WEB_SEARCH)
        streamed = unique("logged streamed")
        for _ in range(2):
            list(client(server).responses.create(model="rich", input=streamed, tools=WEB_SEARCH, stream=True))
        server.call(server.services.log_writer.close())  # type: ignore[union-attr]
        rows = server.call(_log_rows(server))
    # the provider's usage, told in chat's words (input 20, output 9), and its text; a stream's hit
    # has the usage its events carry
    said = [(r.endpoint, r.backend, r.prompt_tokens, r.completion_tokens, r.completion) for r in rows]
    assert said == [("responses", "nat", 20, 9, "It is cold in Oslo.")] * 3 and [r.cache for r in rows] == ["miss", "miss", "hit"]


async def _log_rows(server: GatewayServer) -> list[Any]:
    from sqlalchemy import select

    from app.storage.models import RequestLog

    async with server.services.db.connect() as conn:
        return list(await conn.execute(select(RequestLog.__table__).order_by(RequestLog.__table__.c.id)))


def test_an_item_reference_to_a_stored_item_is_sent_as_that_item(gw: GatewayServer, upstream: FakeUpstream) -> None:
    # the provider is sent store: false and keeps nothing a reference could name: the gateway resolves
    # a reference to an item of the conversation it continues, and passes any other one on as it came
    sdk = client(gw)
    first = sdk.responses.create(model="rich", input=unique("weather?"), tools=WEB_SEARCH)
    refs: Any = [{"type": "item_reference", "id": "rs_1"}, {"type": "item_reference", "id": "msg_elsewhere"}, {"role": "user", "content": "again"}]
    second = sdk.responses.create(model="native", input=refs, previous_response_id=first.id)
    reasoning = RICH["output"][1]
    assert sent(upstream)[-1]["input"][-3:] == [reasoning, refs[1], refs[2]]
    # and the conversation kept holds the item, so a continuation sends it again as it was
    sdk.responses.create(model="native", input="thanks", previous_response_id=second.id)
    assert sent(upstream)[-1]["input"][1:7] == [*RICH["output"], reasoning, *refs[1:]]


def test_a_provider_failing_midway_ends_the_stream_with_its_error(upstream: FakeUpstream) -> None:
    # a gateway of its own, whose circuit stays closed through these failures
    with gateway(config(upstream) + "circuit_breaker: {failure_threshold: 100}\n") as gw:
        failing_midway(gw, upstream)


def failing_midway(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.responses_failures = {"gpt-native": {"code": "server_error", "message": "The model crashed."}}  # type: ignore[attr-defined]
    try:
        body = {"model": "native", "input": unique("fail midway"), "stream": True}
        events = sse(post(gw, body))
        kinds = [e["type"] for e in events]
        # the provider's events up to its error, then the error as it said it and the failed response, numbered on
        assert kinds[-4:] == ["response.content_part.added", "response.output_text.delta", "error", "response.failed"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        error, failed = events[-2], events[-1]
        assert error["code"] == "server_error" and "The model crashed." in error["message"]
        rid = events[0]["response"]["id"]
        # the failed response is the one the provider began (its model), as the gateway tells it
        assert failed["response"]["id"] == rid and failed["response"]["status"] == "failed" and failed["response"]["model"] == "gpt-native"
        assert failed["response"]["error"] == {"code": "server_error", "message": error["message"]}
        # neither kept nor cached: the id is unknown, the same request asks the provider again
        assert httpx.get(f"{gw.base_url}/responses/{rid}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
        sse(post(gw, body))
        assert upstream.calls == 2
        # the SDK sees the failure
        kinds = [e.type for e in client(gw).responses.create(model="native", input=unique("fail midway"), stream=True)]
        assert kinds[-2:] == ["error", "response.failed"]
        # plain: a failed response is the provider's failure, not an answer
        plain = post(gw, {"model": "native", "input": unique("fail plain")})
        assert plain.status_code == 502 and "The model crashed." in plain.json()["error"]["message"]
        # a provider's response.failed event is its failure too, told the same way
        upstream.responses_failures = {"gpt-native": {"code": "response.failed", "message": "The model crashed."}}  # type: ignore[attr-defined]
        events = sse(post(gw, {"model": "native", "input": unique("failed event"), "stream": True}))
        assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
        assert "The model crashed." in events[-1]["response"]["error"]["message"]
    finally:
        upstream.responses_failures = {}  # type: ignore[attr-defined]
    # a stream cut midway ends the same way
    upstream.behaviour = "cut"
    events = sse(post(gw, {"model": "native", "input": unique("cut"), "stream": True}))
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_the_providers_refusals_reach_the_client_in_its_words(upstream: FakeUpstream) -> None:
    with gateway(config(upstream)) as gw:
        refusals(gw, upstream)


def refusals(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    upstream.behaviour = "status:404"
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.responses.create(model="native", input=unique())
    assert refused.value.status_code == 404 and refused.value.body["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="native", input=unique(), stream=True)
    upstream.behaviour = "429:7"
    r = post(gw, {"model": "native", "input": unique()})
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["type"] == "rate_limit_error"


def test_a_streamed_forward_is_kept_and_continued(gw: GatewayServer, upstream: FakeUpstream) -> None:
    sdk = client(gw)
    prompt = unique("weather?")
    with sdk.responses.stream(model="rich", input=prompt, tools=WEB_SEARCH) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert sdk.responses.retrieve(final.id).model_dump(exclude_unset=True) == providers_own(RICH, final.id)
    sdk.responses.create(model="native", input="and tomorrow?", previous_response_id=final.id)
    assert sent(upstream)[-1]["input"] == [{"role": "user", "content": prompt}, *RICH["output"], {"role": "user", "content": "and tomorrow?"}]


def test_an_incomplete_response_cached_is_streamed_as_incomplete(gw: GatewayServer, upstream: FakeUpstream) -> None:
    cut = {**RICH, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    upstream.responses_answers = {"gpt-rich": cut}  # type: ignore[attr-defined]
    request = {"model": "rich", "input": unique("long"), "max_output_tokens": 16}
    assert post(gw, request).json()["status"] == "incomplete"
    hit = post(gw, {**request, "stream": True})
    assert hit.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    last = sse(hit)[-1]
    assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
