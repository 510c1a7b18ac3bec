"""``POST /v1/completions`` through the official OpenAI SDK: plain and streamed, through the same
layers as chat (cache, dedupe, limits, failover), every field the provider sent kept on every path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.pipeline.streaming import ChunkAssembler, replay
from tests.fake_upstream import FakeUpstream, streamed_as
from tests.replicas import replicas
from tests.serve import NewDatabase
from tests.support import GatewayServer, gateway

KEY = "sk-agent-writer-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_CACHE = {**AUTH, "Cache-Control": "no-cache"}


def config(up: FakeUpstream, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: writer}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-secret, timeout_s: 10}}
  demo: {{kind: demo}}
models:
  fast: [up/fake-model]
  rich: [up/rich-model]
  demo: [demo/echo]
routing: {{default: fast}}
retry: {{attempts: 1}}
{extra}
"""


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def upstream_reset(up: FakeUpstream) -> FakeUpstream:
    up.reset()
    return up


@pytest.fixture
def client(gw: GatewayServer, upstream_reset: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)


# -- a provider answer with everything a text completion can carry ----------------------------

HEAD = {"id": "cmpl-rich-1", "object": "text_completion", "created": 1_700_000_000, "model": "rich-model", "system_fingerprint": "fp_rich"}


def _lp(tokens: list[str], values: list[float], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": [{t: v, "alt": v - 1} for t, v in zip(tokens, values, strict=True)],
        "text_offset": offsets,
    }


RICH_CHUNKS: list[dict[str, Any]] = [
    {
        **HEAD,
        "x_vendor": {"region": "eu"},
        "usage": None,
        "choices": [{"index": 0, "text": "Hello", "logprobs": _lp(["Hello"], [-0.1], 0), "finish_reason": None}],
    },
    {**HEAD, "usage": None, "choices": [{"index": 1, "text": "Bye", "logprobs": _lp(["Bye"], [-0.5], 0), "finish_reason": None}]},
    {**HEAD, "usage": None, "choices": [{"index": 0, "text": " world", "logprobs": _lp([" world"], [-0.2], 5), "finish_reason": "stop", "stop_reason": 13}]},
    {**HEAD, "usage": None, "choices": [{"index": 1, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": "eos"}]},
    {**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 1}}},
]
RICH: dict[str, Any] = {
    **HEAD,
    "x_vendor": {"region": "eu"},
    "choices": [
        {"index": 0, "text": "Hello world", "logprobs": _lp(["Hello", " world"], [-0.1, -0.2], 0), "finish_reason": "stop", "stop_reason": 13},
        {"index": 1, "text": "Bye", "logprobs": _lp(["Bye"], [-0.5], 0), "finish_reason": "length", "stop_reason": "eos"},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 1}},
}
RICH_BODY = {"model": "rich", "prompt": "say hello", "n": 2, "logprobs": 1}


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The ``data:`` events of an SSE body, which must end with ``[DONE]``."""
    lines = [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def folded(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return dict(assembler.result())


def without_usage(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "usage"}


def test_the_fold_and_the_replay_are_each_others_inverse() -> None:
    assert folded(RICH_CHUNKS) == RICH
    assert folded(list(replay(RICH))) == RICH
    replayed = list(replay(RICH))
    assert all(c["object"] == "text_completion" for c in replayed)
    assert all("delta" not in choice for c in replayed for choice in c["choices"])


# -- the SDK ------------------------------------------------------------------------------


def test_plain_completion(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    resp = client.completions.create(model="fast", prompt="hello completions")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "echo: hello completions"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    sent = upstream_reset.completion_requests
    assert len(sent) == 1 and upstream_reset.chat_requests == []
    assert sent[0].body["model"] == "fake-model" and sent[0].body["prompt"] == "hello completions"
    assert sent[0].headers["authorization"] == "Bearer sk-provider-secret"


def test_streamed_completion_with_and_without_usage(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    chunks = list(client.completions.create(model="fast", prompt="stream me", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: stream me"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # the upstream is always asked for usage (the gateway counts tokens); the client only when it asked
    assert upstream_reset.completion_requests[0].body["stream_options"] == {"include_usage": True}
    plain = list(client.completions.create(model="fast", prompt="stream me too", stream=True))
    assert "".join(c.choices[0].text for c in plain if c.choices) == "echo: stream me too"
    assert all(c.usage is None and c.choices for c in plain)


def test_prompt_forms_travel_unchanged(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    for prompt in (["one", "two"], [1, 2, 3], [[1, 2], [3]], ""):
        client.completions.create(model="fast", prompt=prompt, max_tokens=5, suffix="!", echo=True, stop=["\n"], best_of=2, n=2, extra_body={"top_k": 3})
    sent = [r.body for r in upstream_reset.completion_requests]
    assert [b["prompt"] for b in sent] == [["one", "two"], [1, 2, 3], [[1, 2], [3]], ""]
    assert all(b["suffix"] == "!" and b["echo"] is True and b["best_of"] == 2 and b["top_k"] == 3 and b["max_tokens"] == 5 for b in sent)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fast"}, "prompt"),
        ({"model": "fast", "prompt": []}, "prompt"),
        ({"model": "fast", "prompt": [[]]}, "prompt"),
        ({"model": "fast", "prompt": [-1, 2]}, "prompt"),
        ({"model": "fast", "prompt": [1, "two"]}, "prompt"),
        ({"model": "fast", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "fast", "prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ({"model": "fast", "prompt": "x", "best_of": 1, "n": 2}, "best_of"),
        ({"model": "fast", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "fast", "prompt": "x", "max_tokens": "16"}, "max_tokens"),
        ({"model": "fast", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client: openai.OpenAI, upstream_reset: FakeUpstream, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", body=body, cast_to=httpx.Response)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error", error
    assert error["param"] == param or error["param"].startswith(param + "["), error
    assert upstream_reset.calls == 0


def test_upstream_error_keeps_its_type_code_and_param(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    upstream_reset.behaviour = "status:400"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="fast", prompt="too long")
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "context_length_exceeded"


def test_the_demo_provider_answers_completions(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="demo", prompt=["first prompt", "second"], n=2, echo=True, logprobs=1, max_tokens=3)
    assert [c.index for c in plain.choices] == [0, 1, 2, 3]
    assert plain.choices[0].text == "first prompt Admiral demo answer."
    assert plain.choices[2].text.startswith("second ")
    assert plain.choices[0].finish_reason == "length"
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.tokens == [" Admiral", " demo", " answer."]
    streamed = list(client.completions.create(model="demo", prompt=[5, 6, 7], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == client.completions.create(model="demo", prompt=[5, 6, 7], extra_headers={"Cache-Control": "no-cache"}).choices[0].text
    assert text.startswith("Admiral demo answer.")
    assert streamed[-1].usage is not None and streamed[-1].usage.prompt_tokens == 3


# -- fidelity: the rich answer on every path ---------------------------------------------------


def test_every_path_keeps_every_field(gw: GatewayServer, upstream_reset: FakeUpstream) -> None:
    upstream_reset.answers = {"rich-model": (RICH, RICH_CHUNKS)}
    url = f"{gw.base_url}/completions"
    with httpx.Client(timeout=10) as http:
        # a stream miss relays the provider's events as they came
        miss = http.post(url, headers=AUTH, json={**RICH_BODY, "stream": True, "stream_options": {"include_usage": True}})
        assert miss.headers["x-admiral-cache"] == "miss"
        assert events(miss) == streamed_as(RICH_CHUNKS, include_usage=True)
        # the stream was stored as the answer it folds into: a plain hit is the provider's answer
        hit = http.post(url, headers=AUTH, json=RICH_BODY)
        assert hit.headers["x-admiral-cache"] == "hit"
        assert hit.json() == RICH
        # a stream hit replays it; usage only to a client that asks
        replayed = http.post(url, headers=AUTH, json={**RICH_BODY, "stream": True})
        assert replayed.headers["x-admiral-cache"] == "hit"
        assert folded(events(replayed)) == without_usage(RICH)
        with_usage = http.post(url, headers=AUTH, json={**RICH_BODY, "stream": True, "stream_options": {"include_usage": True}})
        assert folded(events(with_usage)) == RICH
        # a plain miss is the provider's body
        plain_miss = http.post(url, headers=NO_CACHE, json=RICH_BODY)
        assert plain_miss.headers["x-admiral-cache"] == "bypass"
        assert plain_miss.json() == RICH
    assert upstream_reset.calls == 2


async def _overlap(gw: GatewayServer, up: FakeUpstream, leader: dict[str, Any], follower: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """``leader`` held at the upstream, ``follower`` joined onto it, then both answered."""
    coalesced = gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0
    up.hold()
    async with httpx.AsyncClient(timeout=20) as http:
        first = asyncio.create_task(http.post(f"{gw.base_url}/completions", headers=NO_CACHE, json=leader))
        while up.held < 1:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(http.post(f"{gw.base_url}/completions", headers=NO_CACHE, json=follower))
        while (gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0) <= coalesced:
            await asyncio.sleep(0.01)
        up.release()
        return await first, await second


def test_a_plain_request_joining_a_streamed_leader_gets_the_folded_answer(gw: GatewayServer, upstream_reset: FakeUpstream) -> None:
    upstream_reset.answers = {"rich-model": (RICH, RICH_CHUNKS)}
    leader, follower = asyncio.run(_overlap(gw, upstream_reset, {**RICH_BODY, "stream": True, "stream_options": {"include_usage": True}}, RICH_BODY))
    assert events(leader) == streamed_as(RICH_CHUNKS, include_usage=True)
    assert follower.headers["x-admiral-dedupe"] == "follower"
    assert follower.json() == RICH
    assert upstream_reset.calls == 1


def test_a_streamed_request_joining_a_plain_leader_gets_the_answer_replayed(gw: GatewayServer, upstream_reset: FakeUpstream) -> None:
    upstream_reset.answers = {"rich-model": (RICH, RICH_CHUNKS)}
    leader, follower = asyncio.run(_overlap(gw, upstream_reset, RICH_BODY, {**RICH_BODY, "stream": True, "stream_options": {"include_usage": True}}))
    assert leader.json() == RICH
    assert follower.headers["x-admiral-dedupe"] == "follower"
    assert folded(events(follower)) == RICH
    assert upstream_reset.calls == 1


# -- the same layers as chat ------------------------------------------------------------------


def test_cache_is_per_endpoint(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    first = client.completions.with_raw_response.create(model="fast", prompt="cache me")
    again = client.completions.with_raw_response.create(model="fast", prompt="cache me")
    assert (first.headers["x-admiral-cache"], again.headers["x-admiral-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].text == "echo: cache me"
    chat = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "cache me"}])
    assert chat.headers["x-admiral-cache"] == "miss"
    assert upstream_reset.calls == 2


def test_failover_moves_a_completion_to_the_next_deployment(upstream: FakeUpstream, upstream2: FakeUpstream) -> None:
    cfg = f"""
keys:
  - {{key: {KEY}, agent: writer}}
providers:
  one: {{kind: openai, base_url: "{upstream.base_url}", api_key: sk-one}}
  two: {{kind: openai, base_url: "{upstream2.base_url}", api_key: sk-two}}
models:
  fast: [one/m1, two/m2]
retry: {{attempts: 1}}
"""
    upstream.behaviour = "500"
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        plain = client.completions.with_raw_response.create(model="fast", prompt="fail over")
        assert plain.headers["x-admiral-backend"] == "two"
        assert plain.parse().choices[0].text == "echo: fail over"
        streamed = client.completions.create(model="fast", prompt="fail over, streamed", stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "echo: fail over, streamed"
    assert len(upstream.completion_requests) == 2 and len(upstream2.completion_requests) == 2
    assert upstream2.completion_requests[0].body["model"] == "m2"


def test_rate_limits_count_completions(upstream: FakeUpstream) -> None:
    cfg = config(upstream).replace("agent: writer}", "agent: writer, rpm: 2}")
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.completions.create(model="fast", prompt="one")
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "two"}])
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model="fast", prompt="three")
        assert int(caught.value.response.headers["retry-after"]) >= 1
    assert upstream.calls == 2


def test_requests_are_logged_and_counted_by_endpoint(upstream: FakeUpstream) -> None:
    cfg = config(upstream, "admin_key: admin-key-123456")
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.completions.create(model="fast", prompt="count me")
        client.completions.create(model="fast", prompt="count me")
        list(client.completions.create(model="fast", prompt="count me, streamed", stream=True))
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "and me"}])
        registry = gw.services.metrics.registry
        assert (
            registry.get_sample_value(
                "admiral_requests_total", {"agent": "writer", "model": "fast", "backend": "up", "status": "200", "cache": "hit", "endpoint": "completions"}
            )
            == 1
        )
        assert (
            registry.get_sample_value(
                "admiral_requests_total", {"agent": "writer", "model": "fast", "backend": "up", "status": "200", "cache": "miss", "endpoint": "completions"}
            )
            == 2
        )
        assert (
            registry.get_sample_value(
                "admiral_requests_total", {"agent": "writer", "model": "fast", "backend": "up", "status": "200", "cache": "miss", "endpoint": "chat"}
            )
            == 1
        )
        admin = {"Authorization": "Bearer admin-key-123456"}
        by_endpoint: dict[str, Any] = {}
        for _ in range(500):
            by_endpoint = httpx.get(f"{gw.url}/admin/stats", headers=admin).json()["by_endpoint"]
            if sum(e["requests"] for e in by_endpoint.values()) == 4:
                break
            gw.call(asyncio.sleep(0.01))
        assert by_endpoint["completions"]["requests"] == 3 and by_endpoint["completions"]["cache_hits"] == 1
        assert by_endpoint["chat"]["requests"] == 1


def test_an_object_each_chunk_repeats_is_folded_once() -> None:
    head = {"id": "c-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "x_vendor": {"region": "eu", "trace": {"hop": "a"}}}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]},
        {
            **head,
            "x_vendor": {"region": "eu", "trace": {"hop": "a"}, "usage": {"queue_ms": 3}},
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        },
    ]
    assert folded(chunks)["x_vendor"] == {"region": "eu", "trace": {"hop": "a"}, "usage": {"queue_ms": 3}}
    assert (
        folded([{**c, "object": "text_completion", "choices": [{"index": 0, "text": "Hi", "finish_reason": "stop"}]} for c in chunks])["x_vendor"]["region"]
        == "eu"
    )


def test_the_request_log_keeps_a_completions_prompt_and_text(upstream: FakeUpstream, tmp_path: Path) -> None:
    from sqlalchemy import select

    from app.storage.models import RequestLog

    with gateway(config(upstream, f"database: {{url: 'sqlite+aiosqlite:///{tmp_path}/log.db', log_content: true}}")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.completions.create(model="fast", prompt="log this prompt")
        list(client.completions.create(model="fast", prompt="log this stream", stream=True))

        async def rows() -> list[Any]:
            async with gw.services.db.connect() as conn:
                return list(
                    (await conn.execute(select(RequestLog.endpoint, RequestLog.prompt, RequestLog.completion, RequestLog.stream).order_by(RequestLog.id))).all()
                )

        found: list[Any] = []
        for _ in range(500):
            found = gw.call(rows())
            if len(found) == 2:
                break
            gw.call(asyncio.sleep(0.01))
        assert [tuple(r) for r in found] == [
            ("completions", "log this prompt", "echo: log this prompt", False),
            ("completions", "log this stream", "echo: log this stream", True),
        ]


@pytest.mark.redis
def test_a_follower_on_another_replica_gets_every_field(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    upstream.answers = {"rich-model": (RICH, RICH_CHUNKS)}
    with replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as (one, two):

        async def overlap() -> tuple[httpx.Response, httpx.Response]:
            upstream.hold()
            async with httpx.AsyncClient(timeout=20) as http:
                leader = asyncio.create_task(
                    http.post(f"{one.base_url}/completions", headers=AUTH, json={**RICH_BODY, "stream": True, "stream_options": {"include_usage": True}})
                )
                while upstream.held < 1:
                    await asyncio.sleep(0.01)
                follower = asyncio.create_task(http.post(f"{two.base_url}/completions", headers=AUTH, json=RICH_BODY))
                while not two.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total"):
                    await asyncio.sleep(0.01)
                upstream.release()
                return await leader, await follower

        leader, follower = asyncio.run(overlap())
    assert events(leader) == streamed_as(RICH_CHUNKS, include_usage=True)
    assert follower.headers["x-admiral-dedupe"] == "follower"
    assert follower.json() == RICH
    assert upstream.calls == 1
