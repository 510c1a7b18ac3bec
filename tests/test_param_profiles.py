"""Provider parameter profiles: what a provider refuses is dropped, renamed or split before it leaves.

Each fake upstream refuses what the provider it stands for documents refusing (``refuse_params``),
so a request the profile did not fix would fail; the recorded bodies show what was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.config import PRESETS, ConfigError
from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, PROVIDER_KEY, metric_sum
from tests.manual_clock import ManualClock
from tests.support import GatewayServer, gateway, make_settings

#: what Groq answers 400 to (console.groq.com/docs/openai), n only above 1
GROQ_REFUSES = {"logprobs", "top_logprobs", "logit_bias", "messages[].name", "n"}
#: Mistral's schema forbids extra fields: 422 on stream_options, message names; the seed is random_seed
MISTRAL_REFUSES = {"stream_options", "seed", "messages[].name"}


@pytest.fixture(scope="module")
def groq() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def mistral() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def other() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def shared_gw(groq: FakeUpstream, mistral: FakeUpstream, other: FakeUpstream) -> Iterator[GatewayServer]:
    # providers named after their presets take the presets' profiles; base_url points at the fakes
    config = f"""
keys: [{{key: {AGENT_KEY}, agent: profiles}}]
providers:
  groq: {{kind: openai, base_url: "{groq.base_url}", api_key: {PROVIDER_KEY}}}
  mistral: {{kind: openai, base_url: "{mistral.base_url}", api_key: {PROVIDER_KEY}}}
  custom: {{kind: openai, base_url: "{other.base_url}", api_key: {PROVIDER_KEY}, drop_params: [user, "messages[].name"],
            rename_params: {{max_completion_tokens: max_tokens}}, max_n: 2}}
  plain: {{kind: openai, base_url: "{other.base_url}", api_key: {PROVIDER_KEY}}}
  quiet: {{kind: openai, base_url: "{other.base_url}", api_key: {PROVIDER_KEY}, drop_params: [stream_options], max_n: 1}}
models:
  g: [groq/fake-model]
  m: [mistral/fake-model]
  c: [custom/fake-model]
  p: [plain/fake-model]
  q: [quiet/fake-model]
retry: {{attempts: 1, backoff_s: 0}}
cache: {{enabled: true}}
"""
    with gateway(config) as server:
        yield server


@pytest.fixture
def gw(shared_gw: GatewayServer, groq: FakeUpstream, mistral: FakeUpstream, other: FakeUpstream) -> GatewayServer:
    for upstream in (groq, mistral, other):
        upstream.reset()
    groq.refuse_params = set(GROQ_REFUSES)
    mistral.refuse_params = set(MISTRAL_REFUSES)
    return shared_gw


@pytest.fixture
def sdk(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)


def sent(upstream: FakeUpstream) -> list[dict[str, Any]]:
    return [r.body for r in upstream.chat_requests]


def test_groq_profile_drops_what_groq_refuses(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    messages: Any = [{"role": "system", "content": "be brief", "name": "rules"}, {"role": "user", "content": "hello there", "name": "ann"}]
    reply = sdk.chat.completions.create(model="g", messages=messages, logprobs=True, top_logprobs=2, logit_bias={"50256": -100}, temperature=0.5)
    assert reply.choices[0].message.content == "echo: hello there"
    (body,) = sent(groq)
    assert not {"logprobs", "top_logprobs", "logit_bias"} & body.keys()
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert body["temperature"] == 0.5  # what the provider takes goes as sent


def test_the_cache_keys_on_the_clients_request_not_the_profiled_one(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    messages: Any = [{"role": "user", "content": "cache me"}]
    with_logprobs = sdk.chat.completions.with_raw_response.create(model="g", messages=messages, logprobs=True)
    without = sdk.chat.completions.with_raw_response.create(model="g", messages=messages)
    again = sdk.chat.completions.with_raw_response.create(model="g", messages=messages, logprobs=True)
    assert [r.headers["x-admiral-cache"] for r in (with_logprobs, without, again)] == ["miss", "miss", "hit"]
    assert groq.calls == 2  # both went out alike, yet they are two requests


def test_groq_n_above_one_is_split_into_calls_of_one(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    reply = sdk.chat.completions.create(model="g", messages=[{"role": "user", "content": "three of them"}], n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == "echo: three of them" and c.finish_reason == "stop" for c in reply.choices)
    assert groq.calls == 3 and all("n" not in body for body in sent(groq))
    one = sent(groq)[0]
    assert reply.usage is not None
    words = len(one["messages"][0]["content"].split())
    # the fake counts words: each call paid the prompt and its answer, the reply says all three
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3 * words, 3 * (words + 1))


def test_groq_n_streamed_interleaves_the_calls_choices(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    stream = sdk.chat.completions.create(
        model="g", messages=[{"role": "user", "content": "two streams"}], n=2, stream=True, stream_options={"include_usage": True}
    )
    text: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == {0: "echo: two streams", 1: "echo: two streams"}
    assert finished == {0: "stop", 1: "stop"}
    assert usage is not None and usage.prompt_tokens == 4 and usage.completion_tokens == 6
    assert groq.calls == 2 and all("n" not in body for body in sent(groq))


def test_groq_n_split_fails_as_one_when_a_call_fails(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    groq.script(["ok", "status:503"])
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model="g", messages=[{"role": "user", "content": "one fails"}], n=2)
    assert info.value.status_code == 502


def test_groq_n_split_stream_failing_at_the_start_fails_before_the_client_gets_anything(sdk: openai.OpenAI, groq: FakeUpstream) -> None:
    groq.script(["ok", "status:503"])  # whichever call comes second fails
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model="g", messages=[{"role": "user", "content": "one fails"}], n=2, stream=True)
    assert info.value.status_code == 502  # an error status, not a 200 stream cut short
    assert groq.calls == 2


def test_mistral_stream_without_stream_options_gets_estimated_usage(gw: GatewayServer, sdk: openai.OpenAI, mistral: FakeUpstream) -> None:
    before = metric_sum(gw, "admiral_tokens_total", backend="mistral")
    content = "count these words for me please"
    stream = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    (body,) = sent(mistral)
    assert "stream_options" not in body  # neither the client's nor the gateway's own
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.model_extra == {"estimated": True}
    answer = "echo: " + content
    assert usage.prompt_tokens == (len(content) + 3) // 4 + 1
    assert usage.completion_tokens == (len(answer) + 3) // 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    # the estimate is what the gateway counts and settles budgets on
    assert metric_sum(gw, "admiral_tokens_total", backend="mistral") - before == usage.total_tokens


def test_a_client_that_did_not_ask_for_usage_gets_no_usage_chunk(sdk: openai.OpenAI, mistral: FakeUpstream) -> None:
    stream = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "no usage asked"}], stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)  # the client did not ask: none reaches it
    assert "stream_options" not in sent(mistral)[0]


def test_mistral_seed_goes_as_random_seed(sdk: openai.OpenAI, mistral: FakeUpstream) -> None:
    reply = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "seeded", "name": "ann"}], seed=7)  # type: ignore[misc,list-item]
    assert reply.usage is not None and not reply.usage.model_extra  # a plain answer's usage is the provider's own
    (body,) = sent(mistral)
    assert body["random_seed"] == 7 and "seed" not in body
    assert body["messages"] == [{"role": "user", "content": "seeded"}]


def test_configured_profile_drops_and_renames(sdk: openai.OpenAI, other: FakeUpstream) -> None:
    other.refuse_params = {"user", "max_completion_tokens", "messages[].name"}
    messages: Any = [{"role": "user", "content": "renamed", "name": "bob"}]
    sdk.chat.completions.create(model="c", messages=messages, max_completion_tokens=50, user="agent-7")
    (body,) = sent(other)
    assert body["max_tokens"] == 50 and "max_completion_tokens" not in body and "user" not in body
    assert body["messages"] == [{"role": "user", "content": "renamed"}]


def test_max_n_two_splits_five_into_two_two_one(sdk: openai.OpenAI, other: FakeUpstream) -> None:
    reply = sdk.chat.completions.create(model="c", messages=[{"role": "user", "content": "five"}], n=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]  # the fake answers one choice a call, whatever n
    assert sorted(body.get("n", 1) for body in sent(other)) == [1, 2, 2]


def test_provider_without_profile_gets_the_body_as_sent(sdk: openai.OpenAI, other: FakeUpstream) -> None:
    sdk.chat.completions.create(model="p", messages=[{"role": "user", "content": "untouched", "name": "x"}], logprobs=True, n=2, seed=3, user="u")  # type: ignore[misc,list-item]
    (body,) = sent(other)
    assert (body["logprobs"], body["n"], body["seed"], body["user"], body["messages"][0]["name"]) == (True, 2, 3, "u", "x")


def test_without_profile_the_refusal_reaches_the_client_naming_the_parameter(sdk: openai.OpenAI, other: FakeUpstream) -> None:
    other.refuse_params = {"logprobs"}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="p", messages=[{"role": "user", "content": "refused"}], logprobs=True)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "logprobs"
    assert other.calls == 1  # a client's parameter refused is no reason to call another


def test_plain_answer_without_usage_gets_it_estimated(gw: GatewayServer, other: FakeUpstream) -> None:
    completion = {
        "id": "x-1",
        "object": "chat.completion",
        "created": 1,
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abcdefgh"}, "finish_reason": "stop"}],
    }
    other.answers = {"fake-model": (completion, [])}
    r = httpx.post(
        f"{gw.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {AGENT_KEY}"},
        json={"model": "p", "messages": [{"role": "user", "content": "1234"}]},
        timeout=10,
    )
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "estimated": True}
    request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 15
    while (row := gw.call(_logged(gw, request_id))) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the request log is written in batches
    assert row == (2, 2, True)  # the request log marks the counts as the gateway's estimate


async def _logged(gw: GatewayServer, request_id: str) -> tuple[int, int, bool] | None:
    from sqlalchemy import select

    from app.storage.models import RequestLog

    query = select(RequestLog.prompt_tokens, RequestLog.completion_tokens, RequestLog.usage_estimated).where(RequestLog.request_id == request_id)
    async with gw.services.db.connect() as conn:
        found = (await conn.execute(query)).first()
    return None if found is None else (found[0], found[1], bool(found[2]))


def test_groq_x_groq_usage_is_taken_when_usage_is_missing(gw: GatewayServer, groq: FakeUpstream) -> None:
    head = {"id": "g-1", "object": "chat.completion.chunk", "created": 1, "model": "fake-model"}
    real = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}], "x_groq": {"id": "req_1"}},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "x_groq": {"id": "req_1", "usage": real}},
    ]
    groq.answers = {"fake-model": ({}, chunks)}
    body = {"model": "g", "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body, timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    import json

    last = json.loads(lines[-1].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"] == real


def test_profile_config_checks() -> None:
    providers = {"groq": {"kind": "openai", "drop_params": []}}
    s = make_settings({"providers": providers})
    assert s.providers["groq"].drop_params == [] and s.providers["groq"].max_n == 1  # a list given replaces the preset's
    assert make_settings({"providers": {"mistral": {"kind": "openai"}}}).providers["mistral"].rename_params == {"seed": "random_seed", "max_completion_tokens": "max_tokens"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"drop_params": ["messages"]}, "'messages' cannot be dropped"),
        ({"rename_params": {"model": "engine"}}, "'model' cannot be dropped or renamed"),
        ({"drop_params": ["seed"], "rename_params": {"seed": "random_seed"}}, "both dropped and renamed"),
        ({"max_n": 0}, "providers.x.max_n"),
    ]
    for bad, says in cases:
        with pytest.raises(ConfigError, match=says):
            make_settings({"providers": {"x": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", **bad}}})


def test_profiles_apply_to_completions_and_embeddings(sdk: openai.OpenAI, groq: FakeUpstream, other: FakeUpstream) -> None:
    text = sdk.completions.create(model="g", prompt="say it", n=3, logprobs=2, max_tokens=5)
    assert [c.index for c in text.choices] == [0, 1, 2] and all(c.text == "echo: say it" for c in text.choices)
    sent_text = [r.body for r in groq.completion_requests]
    assert len(sent_text) == 3 and all("n" not in b and "logprobs" not in b for b in sent_text)
    assert text.usage is not None and text.usage.prompt_tokens == 3 * 2
    other.refuse_params = {"user"}
    sdk.completions.create(model="c", prompt="as a user", user="agent-7")
    vectors = sdk.embeddings.create(model="c", input=["a b", "c"], user="agent-7")
    assert len(vectors.data) == 2
    assert all("user" not in r.body for r in [*other.completion_requests, *other.embedding_requests])


def test_a_streamed_text_completion_without_usage_gets_it_estimated(mistral: FakeUpstream, sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(model="m", prompt="twelve chars", stream=True, stream_options={"include_usage": True}))
    (body,) = [r.body for r in mistral.completion_requests]
    assert "stream_options" not in body
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra == {"estimated": True}
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, (len("echo: twelve chars") + 3) // 4)


def test_budgets_settle_on_the_estimate(mistral: FakeUpstream) -> None:
    mistral.reset()
    mistral.refuse_params = set(MISTRAL_REFUSES)
    config = f"""
keys: [{{key: {AGENT_KEY}, agent: budgeted, tpm: 100000}}]
providers:
  mistral: {{kind: openai, base_url: "{mistral.base_url}", api_key: {PROVIDER_KEY}, tpm: 100000}}
models:
  m: [mistral/fake-model]
"""
    # a clock that stands still: what a budget holds is exactly what was settled
    with gateway(config, clock=ManualClock()) as gw:
        sdk = openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)
        chunks = list(
            sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "settle on me"}], stream=True, stream_options={"include_usage": True})
        )
        usage = chunks[-1].usage
        assert usage is not None and usage.model_extra == {"estimated": True}
        budgets = gw.services.resilience
        provider, agent = budgets.provider_budgets.usage("mistral"), budgets.agent_limits.usage("budgeted")
        assert provider is not None and agent is not None
        # reserved as prompt + 256 answer tokens, settled to the estimate once the stream ended
        assert provider.tpm_used == pytest.approx(usage.total_tokens, abs=0.01) and agent.tpm_used == pytest.approx(usage.total_tokens, abs=0.01)


def test_the_readme_presets_table_says_each_presets_profile() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[4] for line in readme.splitlines() if line.startswith("| ") and line.count("|") == 5}
    for name, preset in PRESETS.items():
        said = rows[name]
        for field in [*preset.drop_params, *preset.rename_params, *preset.rename_params.values()]:
            assert f"`{field}`" in said, (name, field)
        assert (f"`max_n: {preset.max_n}`" in said) == (preset.max_n is not None), name
        if not (preset.drop_params or preset.rename_params or preset.max_n):
            assert said.strip() == "—", name


def test_split_calls_without_usage_are_each_estimated(sdk: openai.OpenAI, other: FakeUpstream) -> None:
    other.refuse_params = {"stream_options", "n"}
    content = "each call pays its prompt"
    chunks = list(
        sdk.chat.completions.create(model="q", messages=[{"role": "user", "content": content}], n=2, stream=True, stream_options={"include_usage": True})
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra == {"estimated": True}
    one_prompt = (len(content) + 3) // 4 + 1
    one_answer = (len("echo: " + content) + 3) // 4
    assert (usage.prompt_tokens, usage.completion_tokens) == (2 * one_prompt, 2 * one_answer)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)  # one usage chunk, at the end
    assert other.calls == 2
