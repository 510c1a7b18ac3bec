"""Fidelity: whatever a provider put in an answer reaches the client unchanged on every path.

The fake upstream answers with the provider answers of ``tests/provider_answers.py`` (each a plain
``chat.completion`` P and the chunks C the provider streams for it); the official OpenAI SDK drives
the gateway, and the raw JSON the client receives is compared:

- a plain answer that came from P (a plain miss, a hit stored from a plain miss, a plain follower
  of a plain leader) is P itself, key for key;
- a stream that came from C (a streamed miss, a streamed follower of a streamed leader) is C itself,
  chunk for chunk (without the usage chunk and the ``usage`` keys when the client did not ask
  ``stream_options.include_usage``: what the provider streams such a client);
- a stream made from a whole answer (a cache hit replayed, a streamed follower of a plain leader)
  is a valid chunk stream (:func:`tests.provider_answers.stream_problems`) that folds to P, by the
  reference fold and by the OpenAI SDK's own accumulator;
- a plain answer made from a stream (a streamed miss stored, then hit; a plain follower of a
  streamed leader) is P;

"is P" across a conversion meaning equal after :func:`tests.provider_answers.normalise` (null
values and ``annotations: []`` count as absent). Hits and misses are proved by ``x-admiral-cache``
and the fake upstream's call counter; dedupe by ``x-admiral-dedupe: follower`` and one upstream
call, the leader held at the upstream (``hold``/``release``) until the follower has joined.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import redis

from tests.conftest import REDIS_URL
from tests.fake_upstream import FakeUpstream, streamed_as
from tests.provider_answers import (
    ALL,
    BY_NAME,
    DEEPSEEK_REASONER,
    OPENAI_TOOLS,
    OPENROUTER_REASONING,
    ProviderAnswer,
    assert_same,
    client_chunks,
    expected,
    fold,
    normalise,
    sdk_fold,
    sdk_view,
    stream_problems,
)
from tests.replicas import replicas
from tests.serve import PgDatabases
from tests.support import GatewayServer, gateway

KEY = "sk-fidelity-agent-0001"
#: one run's prompts never meet another's entries
RUN = uuid.uuid4().hex[:8]


def upstream_model(answer: ProviderAnswer) -> str:
    return f"fx-{answer.name}"


def config(up: FakeUpstream) -> dict[str, Any]:
    """One public model per provider answer, each on its own upstream model id."""
    return {
        "keys": [{"key": KEY, "agent": "fidelity"}],
        "providers": {"up": {"kind": "openai", "base_url": up.base_url, "api_key": "sk-provider", "timeout_s": 10}},
        "models": {a.name: [f"up/{upstream_model(a)}"] for a in ALL},
        "routing": {"default": ALL[0].name},
        "retry": {"attempts": 1},
    }


# -- the self-check of the fixtures ----------------------------------------------------------------


@pytest.mark.parametrize("answer", ALL, ids=lambda a: a.name)
def test_each_provider_stream_folds_to_its_completion(answer: ProviderAnswer) -> None:
    choices = len(answer.completion["choices"])
    for include_usage in (True, False):
        chunks = client_chunks(answer, include_usage=include_usage)
        assert stream_problems(chunks, include_usage=include_usage, choices=choices) == []
        assert normalise(fold(chunks)) == expected(answer, include_usage=include_usage)
        # the OpenAI SDK's accumulator agrees on what it keeps
        completion = answer.completion if include_usage else {k: v for k, v in answer.completion.items() if k != "usage"}
        assert sdk_view(sdk_fold(chunks)) == sdk_view(completion)


def _each_delta(chunks: list[dict[str, Any]], change: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks with every choice's delta passed through ``change``."""
    return [{**c, "choices": [{**ch, "delta": change(ch["delta"])} for ch in c["choices"]]} for c in chunks]


def test_the_comparison_rules_can_fail() -> None:
    """The fold and the normalisation are not so lenient that a lost field goes unnoticed."""
    p = OPENAI_TOOLS.completion
    assert normalise({"a": None, "b": {"c": None}, "annotations": [], "d": []}) == {"b": {}, "d": []}
    lost_type = _each_delta(OPENAI_TOOLS.chunks, lambda d: {**d, "tool_calls": [{**t, "type": "function"} if t.get("type") else t for t in d.get("tool_calls", [])]})
    assert normalise(fold(lost_type)) != normalise(p)
    no_reasoning = _each_delta(DEEPSEEK_REASONER.chunks, lambda d: {k: v for k, v in d.items() if k != "reasoning_content"})
    assert normalise(fold(no_reasoning)) != expected(DEEPSEEK_REASONER)
    assert sdk_view(sdk_fold(no_reasoning)) != sdk_view(DEEPSEEK_REASONER.completion)
    chunks = DEEPSEEK_REASONER.chunks
    reordered = [*chunks[:4], chunks[5], chunks[4], *chunks[6:]]
    assert normalise(fold(reordered)) != expected(DEEPSEEK_REASONER)
    # a stream without a finish, or with usage though not asked, is not valid
    assert stream_problems(DEEPSEEK_REASONER.chunks[:-2], include_usage=False, choices=1)
    assert stream_problems(DEEPSEEK_REASONER.chunks, include_usage=False, choices=1)
    assert stream_problems(streamed_as(DEEPSEEK_REASONER.chunks, False), include_usage=True, choices=1)


# -- gateways ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeUpstream]:
    """The fake upstream, answering each ``fx-<name>`` model with that provider answer."""
    with FakeUpstream() as up:
        up.answers = {upstream_model(a): a for a in ALL}
        yield up


@pytest.fixture
def fake(provider: FakeUpstream) -> Iterator[FakeUpstream]:
    provider.reset(behaviours=False)
    yield provider
    provider.release()


@pytest.fixture(scope="module")
def one_gateway(provider: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(provider)) as gw:
        yield gw


@pytest.fixture(scope="module")
def two_replicas(provider: FakeUpstream, _pg_databases: PgDatabases) -> Iterator[list[GatewayServer]]:
    """Two replicas on the real Redis and a fresh PostgreSQL database."""
    prefix = f"admiral-test:{uuid.uuid4().hex}:"
    try:
        with replicas(config(provider), prefix=prefix, database_url=_pg_databases.create()) as gws:
            yield gws
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


# -- talking to the gateway ----------------------------------------------------------------------


@dataclass
class Case:
    answer: ProviderAnswer
    fake: FakeUpstream
    #: where the first request (the leader) and the second (the follower) go
    first: GatewayServer
    second: GatewayServer
    prompt: str

    def client(self, gw: GatewayServer) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=20)

    def args(self) -> dict[str, Any]:
        return {"model": self.answer.name, "messages": [{"role": "user", "content": self.prompt}], "extra_body": self.answer.request}


@dataclass
class Received:
    """What the client got: the headers, and the body or the stream's chunks."""

    headers: Any
    body: dict[str, Any] | None = None
    chunks: list[dict[str, Any]] | None = None


async def ask_plain(case: Case, gw: GatewayServer) -> Received:
    async with case.client(gw) as client:
        raw = await client.chat.completions.with_raw_response.create(**case.args())
        return Received(raw.headers, body=json.loads(raw.text))


async def ask_stream(case: Case, gw: GatewayServer, include_usage: bool) -> Received:
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with case.client(gw) as client, client.chat.completions.with_streaming_response.create(stream=True, **options, **case.args()) as resp:
        lines = [line async for line in resp.iter_lines()]
        headers = resp.headers
    data = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", f"the stream does not end with data: [DONE]: {data[-2:]}"
    assert "[DONE]" not in data[:-1], "data: [DONE] before the end"
    chunks = [json.loads(d) for d in data[:-1]]
    errors = [c for c in chunks if "error" in c]
    assert not errors, f"the stream carried an error: {errors}"
    return Received(headers, chunks=chunks)


async def ask(case: Case, gw: GatewayServer, stream: bool, include_usage: bool = True) -> Received:
    return await (ask_stream(case, gw, include_usage) if stream else ask_plain(case, gw))


def without_usage(completion: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in completion.items() if k != "usage"}


def assert_is_c(got: Received, answer: ProviderAnswer, include_usage: bool) -> None:
    """The provider's own stream, chunk for chunk."""
    assert_same(got.chunks, client_chunks(answer, include_usage=include_usage), "the chunks (vs the provider's)")


def assert_replay_is_p(got: Received, answer: ProviderAnswer, include_usage: bool) -> None:
    """A stream made from P: valid, and both folds give P back."""
    assert got.chunks is not None
    problems = stream_problems(got.chunks, include_usage=include_usage, choices=len(answer.completion["choices"]))
    assert not problems, "not a valid chunk stream:\n  " + "\n  ".join(problems)
    assert_same(normalise(fold(got.chunks)), expected(answer, include_usage=include_usage), "the stream folded (vs P)")
    completion = answer.completion if include_usage else without_usage(answer.completion)
    assert_same(sdk_view(sdk_fold(got.chunks)), sdk_view(completion), "the stream as the OpenAI SDK accumulates it (vs P)")


def assert_folded_is_p(got: Received, answer: ProviderAnswer) -> None:
    """A plain answer made from C: P."""
    assert got.body is not None
    assert_same(normalise(got.body), expected(answer), "the plain answer (vs P, normalised)")


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what}")
        await asyncio.sleep(0.005)


def coalesced(gw: GatewayServer) -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0


# -- the paths -----------------------------------------------------------------------------------


async def miss_plain(c: Case) -> None:
    got = await ask_plain(c, c.first)
    assert got.headers["x-admiral-cache"] == "miss"
    assert_same(got.body, c.answer.completion, "the plain answer (vs P)")
    assert c.fake.calls == 1


async def _miss_stream(c: Case, include_usage: bool) -> None:
    got = await ask_stream(c, c.first, include_usage)
    assert got.headers["x-admiral-cache"] == "miss"
    assert_is_c(got, c.answer, include_usage)
    assert got.chunks is not None
    assert_same(normalise(fold(got.chunks)), expected(c.answer, include_usage=include_usage), "the stream folded (vs P)")
    assert c.fake.calls == 1


async def miss_stream(c: Case) -> None:
    await _miss_stream(c, True)


async def miss_stream_without_usage(c: Case) -> None:
    await _miss_stream(c, False)


async def hit_plain(c: Case) -> None:
    assert (await ask_plain(c, c.first)).headers["x-admiral-cache"] == "miss"
    got = await ask_plain(c, c.first)
    assert got.headers["x-admiral-cache"] == "hit"
    assert_same(got.body, c.answer.completion, "the plain answer (vs P)")
    assert c.fake.calls == 1


async def _hit_stream(c: Case, include_usage: bool) -> None:
    assert (await ask_plain(c, c.first)).headers["x-admiral-cache"] == "miss"
    got = await ask_stream(c, c.first, include_usage)
    assert got.headers["x-admiral-cache"] == "hit"
    assert c.fake.calls == 1
    assert_replay_is_p(got, c.answer, include_usage)


async def hit_stream(c: Case) -> None:
    await _hit_stream(c, True)


async def hit_stream_without_usage(c: Case) -> None:
    await _hit_stream(c, False)


async def stream_folded_to_plain(c: Case) -> None:
    # the client did not ask for the usage: the stored answer has it all the same
    assert (await ask_stream(c, c.first, include_usage=False)).headers["x-admiral-cache"] == "miss"
    got = await ask_plain(c, c.first)
    assert got.headers["x-admiral-cache"] == "hit"
    assert c.fake.calls == 1
    assert_folded_is_p(got, c.answer)


async def stream_stored_then_replayed(c: Case) -> None:
    assert (await ask_stream(c, c.first, include_usage=True)).headers["x-admiral-cache"] == "miss"
    got = await ask_stream(c, c.first, include_usage=True)
    assert got.headers["x-admiral-cache"] == "hit"
    assert c.fake.calls == 1
    assert_replay_is_p(got, c.answer, True)


def dedupe(leader_stream: bool, follower_stream: bool) -> Callable[[Case], Awaitable[None]]:
    """The leader (``c.first``, a stream without usage or plain) is held at the upstream until the
    follower (``c.second``, a stream with usage or plain) has joined it."""

    async def run(c: Case) -> None:
        c.fake.hold()
        try:
            leader = asyncio.create_task(ask(c, c.first, leader_stream, include_usage=False))
            await until(lambda: c.fake.held == 1 or leader.done(), "the leader reaches the upstream")
            joined = coalesced(c.second) + 1
            follower = asyncio.create_task(ask(c, c.second, follower_stream, include_usage=True))
            # (a follower that called the upstream itself is held there too: no need to wait it out)
            await until(lambda: coalesced(c.second) >= joined or follower.done() or c.fake.held > 1, "the follower joins the leader")
        finally:
            c.fake.release()
        lead, follow = await asyncio.gather(leader, follower)
        assert c.fake.calls == 1
        assert follow.headers.get("x-admiral-dedupe") == "follower"
        if leader_stream:
            assert_is_c(lead, c.answer, include_usage=False)
        else:
            assert_same(lead.body, c.answer.completion, "the leader's plain answer (vs P)")
        if leader_stream and follower_stream:
            assert_is_c(follow, c.answer, include_usage=True)
        elif follower_stream:
            assert_replay_is_p(follow, c.answer, include_usage=True)
        elif leader_stream:
            assert_folded_is_p(follow, c.answer)
        else:
            assert_same(follow.body, c.answer.completion, "the follower's plain answer (vs P)")

    return run


LOCAL_PATHS: dict[str, Callable[[Case], Awaitable[None]]] = {
    "miss-plain": miss_plain,
    "miss-stream": miss_stream,
    "miss-stream-no-usage": miss_stream_without_usage,
    "hit-plain": hit_plain,
    "hit-stream": hit_stream,
    "hit-stream-no-usage": hit_stream_without_usage,
    "stream-folded-to-plain": stream_folded_to_plain,
    "stream-stored-replayed": stream_stored_then_replayed,
    "dedupe-plain-plain": dedupe(False, False),
    "dedupe-plain-stream": dedupe(False, True),
    "dedupe-stream-plain": dedupe(True, False),
    "dedupe-stream-stream": dedupe(True, True),
}
#: the same dedupe paths with the leader on one replica and the follower on the other
REPLICA_PATHS: dict[str, Callable[[Case], Awaitable[None]]] = {f"replicas-{k}": v for k, v in LOCAL_PATHS.items() if k.startswith("dedupe-")}
PATHS = {**LOCAL_PATHS, **REPLICA_PATHS}

CASES = [pytest.param(path, name, id=f"{path}:{name}") for path in LOCAL_PATHS for name in BY_NAME] + [
    pytest.param(path, name, id=f"{path}:{name}", marks=[pytest.mark.redis, pytest.mark.postgres]) for path in REPLICA_PATHS for name in BY_NAME
]


@pytest.mark.parametrize(("path", "name"), CASES)
def test_fidelity(path: str, name: str, fake: FakeUpstream, request: pytest.FixtureRequest) -> None:
    if path in REPLICA_PATHS:
        first, second = request.getfixturevalue("two_replicas")
    else:
        first = second = request.getfixturevalue("one_gateway")
    case = Case(BY_NAME[name], fake, first, second, prompt=f"fidelity {RUN} {path} {name}")
    asyncio.run(PATHS[path](case))


# -- the SDK's stream helper on a replayed stream ------------------------------------------------


@pytest.mark.parametrize("stored_from", ["plain", "stream"])
@pytest.mark.parametrize("answer", [OPENAI_TOOLS, DEEPSEEK_REASONER, OPENROUTER_REASONING], ids=lambda a: a.name)
def test_sdk_stream_helper_accumulates_a_replayed_answer(answer: ProviderAnswer, stored_from: str, fake: FakeUpstream, one_gateway: GatewayServer) -> None:
    """``client.chat.completions.stream`` accumulates a cache hit's stream to P's message: every tool call
    of any type, with its arguments or input whole, and the reasoning."""
    case = Case(answer, fake, one_gateway, one_gateway, prompt=f"fidelity {RUN} sdk-helper {stored_from} {answer.name}")

    async def run() -> tuple[dict[str, Any], list[Any]]:
        stored = await ask(case, one_gateway, stream=stored_from == "stream")
        assert stored.headers["x-admiral-cache"] == "miss"
        # tools go in the body as they are: the helper itself only takes strict function tools
        async with case.client(one_gateway) as client, client.chat.completions.stream(stream_options={"include_usage": True}, **case.args()) as stream:
            events = [event async for event in stream]
            return stream.current_completion_snapshot.to_dict(), events

    snapshot, events = asyncio.run(run())
    assert fake.calls == 1  # the second request was a hit
    assert_same(sdk_view(snapshot), sdk_view(answer.completion), "the SDK helper's completion (vs P)")
    message = answer.completion["choices"][0]["message"]
    got = snapshot["choices"][0]["message"]
    for field in ("reasoning_content", "reasoning", "content"):
        assert got.get(field) == message.get(field), field
    # the SDK adds ``parsed_arguments: None`` to function calls: normalised away
    calls = [{k: v for k, v in call.items() if k != "index"} for call in got.get("tool_calls") or ()]
    assert_same(normalise(calls), normalise(message.get("tool_calls") or []), "the SDK helper's tool calls (vs P)")
    # the helper's own events report each function call's whole arguments
    done = [(e.name, e.arguments) for e in events if e.type == "tool_calls.function.arguments.done"]
    assert done == [(t["function"]["name"], t["function"]["arguments"]) for t in message.get("tool_calls") or () if t["type"] == "function"]
