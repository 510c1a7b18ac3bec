"""Single-flight dedupe: identical requests in flight cost one upstream call (the counter proves it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

KEY_A = "sk-agent-alpha-0001"
KEY_B = "sk-agent-bravo-0002"
HELLO: Any = [{"role": "user", "content": "hello dedupe"}]
NO_CACHE = "cache: {enabled: false}"


def config(up: FakeUpstream, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY_A}, agent: alpha, cache_namespace: team-a}}
  - {{key: {KEY_B}, agent: bravo, cache_namespace: team-b}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider, timeout_s: 10}}
models:
  fast: [up/fake-model]
routing: {{default: fast}}
retry: {{attempts: 1}}
{extra}
"""


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": HELLO, **extra}


async def post(client: httpx.AsyncClient, gw: GatewayServer, body: dict[str, Any], key: str = KEY_A) -> httpx.Response:
    return await client.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)


async def stream(client: httpx.AsyncClient, gw: GatewayServer, body: dict[str, Any], first: asyncio.Event | None = None) -> tuple[httpx.Headers, list[str]]:
    """The response headers and every ``data:`` line; ``first`` is set once the first one arrived."""
    lines: list[str] = []
    async with client.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if first is not None:
                    first.set()
    return r.headers, lines


def streamed_text(lines: list[str]) -> str:
    text = ""
    for line in lines[:-1]:
        for choice in json.loads(line[5:])["choices"]:
            text += choice["delta"].get("content") or ""
    return text


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def no_flights_left(gw: GatewayServer) -> None:
    """The in-flight registry empties itself (a moment after the last answer went out)."""
    deadline = time.monotonic() + 5
    while len(gw.services.inflight):
        assert time.monotonic() < deadline, "a flight outlived its requests"
        time.sleep(0.01)


async def every_waiter_leaves(gw: GatewayServer, upstream: FakeUpstream, join: Callable[[httpx.AsyncClient], Awaitable[list[asyncio.Task[Any]]]]) -> None:
    """Cancel every request ``join`` started; wait until the upstream call is cancelled and its flight gone."""
    async with httpx.AsyncClient(timeout=20) as client:
        tasks = await join(client)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: upstream.cancelled == 1)
    await until(lambda: len(gw.services.inflight) == 0)


def coalesced(gw: GatewayServer) -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0


def answered_with(gw: GatewayServer, status: str) -> float:
    return sum(s.value for m in gw.services.metrics.registry.collect() if m.name == "admiral_requests" for s in m.samples if s.name == "admiral_requests_total" and s.labels["status"] == status)


def roles(responses: list[httpx.Response] | list[httpx.Headers]) -> Counter[str | None]:
    return Counter((r.headers if isinstance(r, httpx.Response) else r).get("x-admiral-dedupe") for r in responses)


def assert_one_shared_answer(responses: list[httpx.Response], upstream: FakeUpstream, count: int) -> None:
    """``count`` equal 200s from one upstream call to backend ``up``: one leader, the others followers."""
    assert [r.status_code for r in responses] == [200] * count
    assert len({r.content for r in responses}) == 1
    assert upstream.calls == 1
    assert roles(responses) == {"leader": 1, "follower": count - 1}
    assert all(r.headers["x-admiral-backend"] == "up" for r in responses)


def test_twenty_concurrent_identical_requests_make_one_call(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1.5"
    with gateway(config(upstream)) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for _ in range(20)))

        responses = asyncio.run(run())
        assert_one_shared_answer(responses, upstream, 20)
        assert coalesced(gw) == 19
        no_flights_left(gw)


def test_dedupe_works_with_the_cache_disabled(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1"
    with gateway(config(upstream, NO_CACHE)) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for _ in range(5)))

        responses = asyncio.run(run())
        assert len({r.content for r in responses}) == 1
        assert all(r.headers["x-admiral-cache"] == "bypass" for r in responses)
        assert upstream.calls == 1


def test_dedupe_disabled_calls_each_time(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:0.5"
    with gateway(config(upstream, NO_CACHE + "\ndedupe: {enabled: false}")) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for _ in range(3)))

        responses = asyncio.run(run())
        assert roles(responses) == {None: 3}
        assert upstream.calls == 3


def test_namespaces_never_coalesce(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1"
    with gateway(config(upstream)) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return list(await asyncio.gather(post(client, gw, chat(), KEY_A), post(client, gw, chat(), KEY_B)))

        responses = asyncio.run(run())
        assert upstream.calls == 2
        assert roles(responses) == {None: 2}


def test_five_concurrent_identical_streams_make_one_call(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1.5"
    with gateway(config(upstream)) as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY_A, max_retries=0)

        async def one() -> tuple[str | None, str, str | None]:
            events = await client.chat.completions.create(model="fast", messages=HELLO, stream=True)
            chunks = [c async for c in events]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return events.response.headers.get("x-admiral-dedupe"), text, chunks[-1].choices[0].finish_reason

        async def run() -> list[tuple[str | None, str, str | None]]:
            try:
                return await asyncio.gather(*(one() for _ in range(5)))
            finally:
                await client.close()

        results = asyncio.run(run())
        assert upstream.calls == 1
        assert [(text, finish) for _, text, finish in results] == [("echo: hello dedupe", "stop")] * 5
        assert Counter(role for role, _, _ in results) == {"leader": 1, "follower": 4}
        no_flights_left(gw)


def test_late_joiner_gets_the_chunks_so_far_then_the_rest(upstream: FakeUpstream) -> None:
    upstream.behaviour = "dribble:0.2"
    with gateway(config(upstream, NO_CACHE)) as gw:

        async def run() -> tuple[tuple[httpx.Headers, list[str]], tuple[httpx.Headers, list[str]]]:
            async with httpx.AsyncClient(timeout=20) as client:
                first = asyncio.Event()
                leader = asyncio.create_task(stream(client, gw, chat(), first))
                await first.wait()
                follower = await stream(client, gw, chat())
                return await leader, follower

        (leader_headers, leader_lines), (follower_headers, follower_lines) = asyncio.run(run())
        assert upstream.calls == 1
        assert follower_lines == leader_lines
        assert streamed_text(follower_lines) == "echo: hello dedupe"
        assert follower_lines[-1] == "data: [DONE]"
        assert follower_headers["x-admiral-dedupe"] == "follower"
        # the leader's headers went out before anyone joined
        assert "x-admiral-dedupe" not in leader_headers


def test_plain_follower_of_a_streamed_leader(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1"
    with gateway(config(upstream, NO_CACHE)) as gw:

        async def run() -> tuple[tuple[httpx.Headers, list[str]], httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                leader = asyncio.create_task(stream(client, gw, chat()))
                await until(lambda: upstream.calls == 1)
                plain = await post(client, gw, chat())
                return await leader, plain

        (_, lines), plain = asyncio.run(run())
        assert upstream.calls == 1
        assert plain.headers["x-admiral-dedupe"] == "follower"
        body = plain.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == streamed_text(lines) == "echo: hello dedupe"
        assert body["choices"][0]["finish_reason"] == "stop"


def test_streamed_follower_of_a_plain_leader(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:1"
    with gateway(config(upstream, NO_CACHE)) as gw:

        async def run() -> tuple[httpx.Response, tuple[httpx.Headers, list[str]]]:
            async with httpx.AsyncClient(timeout=20) as client:
                leader = asyncio.create_task(post(client, gw, chat()))
                await until(lambda: upstream.calls == 1)
                follower = await stream(client, gw, chat())
                return await leader, follower

        plain, (headers, lines) = asyncio.run(run())
        assert upstream.calls == 1
        assert plain.headers["x-admiral-dedupe"] == "leader"
        assert headers["x-admiral-dedupe"] == "follower"
        assert streamed_text(lines) == plain.json()["choices"][0]["message"]["content"]
        assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(("behaviour", "status"), [("status:400", 400), ("500", 502)])
def test_upstream_failure_reaches_every_waiter(upstream: FakeUpstream, behaviour: str, status: int) -> None:
    upstream.behaviour = behaviour
    upstream.latency = 1.0
    with gateway(config(upstream)) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(post(client, gw, chat()) for _ in range(5)))

        responses = asyncio.run(run())
        assert upstream.calls == 1
        assert [r.status_code for r in responses] == [status] * 5
        assert len({r.content for r in responses}) == 1
        assert "error" in responses[0].json()
        no_flights_left(gw)


def test_stream_failing_midway_reaches_every_waiter(upstream: FakeUpstream) -> None:
    upstream.behaviour = "cut"
    upstream.latency = 1.0
    with gateway(config(upstream)) as gw:

        async def run() -> list[tuple[httpx.Headers, list[str]]]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(stream(client, gw, chat()) for _ in range(3)))

        results = asyncio.run(run())
        assert upstream.calls == 1
        assert len({tuple(lines) for _, lines in results}) == 1
        lines = results[0][1]
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        no_flights_left(gw)


def test_leader_leaving_does_not_cancel_the_call_others_wait_for(upstream: FakeUpstream) -> None:
    upstream.behaviour = "slow:3"
    with gateway(config(upstream)) as gw:

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as client:
                leader = asyncio.create_task(post(client, gw, chat()))
                await until(lambda: upstream.calls == 1)
                followers = [asyncio.create_task(post(client, gw, chat())) for _ in range(3)]
                await until(lambda: coalesced(gw) == 3)
                leader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leader
                await until(lambda: answered_with(gw, "499") == 1)  # the gateway saw the leader go
                assert upstream.inflight == 1
                return await asyncio.gather(*followers)

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 3
        assert responses[0].json()["choices"][0]["message"]["content"] == "echo: hello dedupe"
        assert upstream.calls == 1
        assert upstream.cancelled == 0
        no_flights_left(gw)


def test_call_is_cancelled_when_every_waiter_left(upstream: FakeUpstream) -> None:
    upstream.behaviour = "hang"
    with gateway(config(upstream)) as gw:

        async def join(client: httpx.AsyncClient) -> list[asyncio.Task[Any]]:
            tasks = [asyncio.create_task(post(client, gw, chat()))]
            await until(lambda: upstream.calls == 1)
            tasks += [asyncio.create_task(post(client, gw, chat())) for _ in range(2)]
            await until(lambda: coalesced(gw) == 2)
            return tasks

        asyncio.run(every_waiter_leaves(gw, upstream, join))
        assert upstream.calls == 1


def test_shared_stream_is_cancelled_when_every_reader_left(upstream: FakeUpstream) -> None:
    upstream.behaviour = "dribble:0.5"
    with gateway(config(upstream)) as gw:

        async def join(client: httpx.AsyncClient) -> list[asyncio.Task[Any]]:
            firsts = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(stream(client, gw, chat(), firsts[0]))]
            await firsts[0].wait()
            tasks.append(asyncio.create_task(stream(client, gw, chat(), firsts[1])))
            await firsts[1].wait()
            assert coalesced(gw) == 1
            return tasks

        asyncio.run(every_waiter_leaves(gw, upstream, join))
        assert upstream.calls == 1
        # nothing was stored from the abandoned stream
        assert gw.services.cache is not None and len(gw.services.cache.memory) == 0
