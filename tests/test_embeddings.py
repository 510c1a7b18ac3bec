"""``POST /v1/embeddings`` through the official OpenAI SDK: float and base64, the per-item cache
(a batch asks the provider only for its new items), dedupe, limits, failover, the log and stats."""

from __future__ import annotations

import asyncio
import base64
from array import array
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from app.providers.demo import DEMO_DIMENSIONS, demo_vector
from app.vectors import as_base64, base64_to_floats, floats_to_base64, in_format
from tests.fake_upstream import FakeUpstream, fake_vector
from tests.replicas import replicas
from tests.serve import NewDatabase
from tests.support import GatewayServer, gateway

KEY = "sk-agent-embedder-01"
OTHER_KEY = "sk-agent-other-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}


def config(up: FakeUpstream, extra: str = "", key_extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: embedder{key_extra}}}
  - {{key: {OTHER_KEY}, agent: other, cache_namespace: other}}
admin_key: admin-key-123456
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-secret, timeout_s: 10}}
  demo: {{kind: demo}}
models:
  vectors: [up/embed-model]
  demo-vectors: [demo/demo-embed]
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


def asked(up: FakeUpstream) -> list[Any]:
    """The inputs of each embeddings call the provider got."""
    return [r.body["input"] for r in up.embedding_requests]


def f32(values: list[float]) -> list[float]:
    return list(array("f", values))


# -- the wire forms ---------------------------------------------------------------------------


def test_vectors_round_trip_between_floats_and_base64() -> None:
    values = f32([0.25, -1.5, 3.0e-7, 1.0])
    text = floats_to_base64(values)
    assert base64.b64decode(text) == array("f", values).tobytes()
    assert base64_to_floats(text) == values
    assert as_base64(values) == text and as_base64(text) == text
    assert in_format(text, "float").tolist() == values and in_format(values, "base64") == text
    # neither a vector nor base64 of float32s
    assert as_base64("not base64!") is None and as_base64(base64.b64encode(b"abc").decode()) is None
    assert as_base64([]) is None and as_base64(["1"]) is None and as_base64([float("nan")]) is None


# -- the SDK, float and base64 ----------------------------------------------------------------


def test_sdk_default_base64_is_decoded_to_the_providers_vector(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    raw = client.embeddings.with_raw_response.create(model="vectors", input="the fleet at dawn")
    answer = raw.parse()
    assert raw.headers["x-admiral-cache"] == "miss"
    assert raw.headers["x-admiral-backend"] == "up" and raw.headers["x-admiral-route"] == "vectors"
    assert answer.object == "list" and answer.model == "embed-model"
    assert [d.index for d in answer.data] == [0]
    assert f32(answer.data[0].embedding) == fake_vector("the fleet at dawn")
    assert answer.usage.prompt_tokens == 4 and answer.usage.total_tokens == 4
    # the provider is asked for base64 whatever the client wants: the compact, exact form
    assert upstream_reset.embedding_requests[0].body == {"model": "embed-model", "input": ["the fleet at dawn"], "encoding_format": "base64"}


def test_float_and_base64_clients_get_their_form_on_a_miss_and_on_a_hit(client: openai.OpenAI, upstream_reset: FakeUpstream, gw: GatewayServer) -> None:
    floats = client.embeddings.with_raw_response.create(model="vectors", input=["alpha", "beta"], encoding_format="float")
    assert floats.headers["x-admiral-cache"] == "miss"
    assert [f32(d.embedding) for d in floats.parse().data] == [fake_vector("alpha"), fake_vector("beta")]
    # floats in float32's shortest form, as OpenAI writes them (0.1, not 0.10000000149011612)
    assert floats.http_response.json()["data"][0]["embedding"] == [float(str(np.float32(v))) for v in fake_vector("alpha")]
    b64 = httpx.post(f"{gw.base_url}/embeddings", headers=AUTH, json={"model": "vectors", "input": ["alpha", "beta"], "encoding_format": "base64"})
    assert b64.headers["x-admiral-cache"] == "hit"
    data = b64.json()["data"]
    assert [base64_to_floats(d["embedding"]) for d in data] == [fake_vector("alpha"), fake_vector("beta")]
    assert data[0] == {"object": "embedding", "index": 0, "embedding": floats_to_base64(fake_vector("alpha"))}
    # a hit cost nothing upstream: its usage says so
    assert b64.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    again = client.embeddings.create(model="vectors", input=["beta", "alpha"], encoding_format="float")
    assert [f32(d.embedding) for d in again.data] == [fake_vector("beta"), fake_vector("alpha")]
    plain = httpx.post(f"{gw.base_url}/embeddings", headers=AUTH, json={"model": "vectors", "input": "alpha"}).json()
    assert f32(plain["data"][0]["embedding"]) == fake_vector("alpha")
    assert len(upstream_reset.embedding_requests) == 1


# -- the per-item cache -----------------------------------------------------------------------


def test_a_batch_of_100_with_3_new_inputs_asks_the_provider_for_those_3(client: openai.OpenAI, upstream_reset: FakeUpstream, gw: GatewayServer) -> None:
    texts = [f"document number {i}" for i in range(100)]
    new = {7, 50, 99}
    known = [t for i, t in enumerate(texts) if i not in new]
    client.embeddings.create(model="vectors", input=known)
    assert len(upstream_reset.embedding_requests) == 1
    registry = gw.services.metrics.registry
    items_hit = registry.get_sample_value("admiral_embedding_cache_items_total", {"result": "hit"}) or 0.0

    raw = client.embeddings.with_raw_response.create(model="vectors", input=texts)
    answer = raw.parse()
    assert raw.headers["x-admiral-cache"] == "partial"
    assert asked(upstream_reset)[1] == [texts[i] for i in sorted(new)]
    assert len(upstream_reset.embedding_requests) == 2
    assert [d.index for d in answer.data] == list(range(100))
    assert [f32(d.embedding) for d in answer.data] == [fake_vector(t) for t in texts]
    # usage: what the provider counted for the inputs it embedded for this request
    assert answer.usage.prompt_tokens == 9
    assert registry.get_sample_value("admiral_embedding_cache_items_total", {"result": "hit"}) == items_hit + 97

    full = client.embeddings.with_raw_response.create(model="vectors", input=texts)
    assert full.headers["x-admiral-cache"] == "hit" and full.headers["x-admiral-backend"] == "up"
    assert [f32(d.embedding) for d in full.parse().data] == [fake_vector(t) for t in texts]
    assert len(upstream_reset.embedding_requests) == 2


def test_inputs_repeated_in_a_batch_are_asked_for_once(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    answer = client.embeddings.create(model="vectors", input=["twice", "once", "twice"])
    assert asked(upstream_reset) == [["twice", "once"]]
    assert [f32(d.embedding) for d in answer.data] == [fake_vector("twice"), fake_vector("once"), fake_vector("twice")]


def test_token_arrays_are_items_of_their_own(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    one = client.embeddings.create(model="vectors", input=[5, 6, 7])
    assert f32(one.data[0].embedding) == fake_vector([5, 6, 7])
    several = client.embeddings.with_raw_response.create(model="vectors", input=[[5, 6, 7], [8, 9]])
    assert several.headers["x-admiral-cache"] == "partial"
    assert [f32(d.embedding) for d in several.parse().data] == [fake_vector([5, 6, 7]), fake_vector([8, 9])]
    assert asked(upstream_reset) == [[[5, 6, 7]], [[8, 9]]]
    # a string is not its token ids
    text = client.embeddings.with_raw_response.create(model="vectors", input="5 6 7")
    assert text.headers["x-admiral-cache"] == "miss"


def test_dimensions_are_part_of_the_key_and_reach_the_provider(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    short = client.embeddings.with_raw_response.create(model="vectors", input="sized", dimensions=4)
    assert short.headers["x-admiral-cache"] == "miss"
    assert f32(short.parse().data[0].embedding) == fake_vector("sized", 4)
    longer = client.embeddings.with_raw_response.create(model="vectors", input="sized", dimensions=16)
    assert longer.headers["x-admiral-cache"] == "miss" and len(longer.parse().data[0].embedding) == 16
    again = client.embeddings.with_raw_response.create(model="vectors", input="sized", dimensions=4, user="someone")
    assert again.headers["x-admiral-cache"] == "hit"
    assert [r.body.get("dimensions") for r in upstream_reset.embedding_requests] == [4, 16]


def test_namespaces_never_share_vectors(gw: GatewayServer, client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    client.embeddings.create(model="vectors", input="private")
    other = openai.OpenAI(base_url=gw.base_url, api_key=OTHER_KEY, max_retries=0)
    assert other.embeddings.with_raw_response.create(model="vectors", input="private").headers["x-admiral-cache"] == "miss"
    assert len(upstream_reset.embedding_requests) == 2


def test_cache_control_skips_the_read_or_the_write(gw: GatewayServer, upstream_reset: FakeUpstream) -> None:
    url = f"{gw.base_url}/embeddings"
    body = {"model": "vectors", "input": ["kept", "also kept"]}
    assert httpx.post(url, headers={**AUTH, "Cache-Control": "no-store"}, json=body).headers["x-admiral-cache"] == "miss"
    assert httpx.post(url, headers=AUTH, json=body).headers["x-admiral-cache"] == "miss"
    bypass = httpx.post(url, headers={**AUTH, "Cache-Control": "no-cache"}, json=body)
    assert bypass.headers["x-admiral-cache"] == "bypass"
    assert [base64_to_floats(d["embedding"]) if isinstance(d["embedding"], str) else f32(d["embedding"]) for d in bypass.json()["data"]] == [
        fake_vector("kept"),
        fake_vector("also kept"),
    ]
    assert httpx.post(url, headers=AUTH, json=body).headers["x-admiral-cache"] == "hit"
    assert len(upstream_reset.embedding_requests) == 3


def test_embeddings_and_chat_never_share_entries(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    client.embeddings.create(model="vectors", input="shared words")
    chat = client.chat.completions.with_raw_response.create(model="vectors", messages=[{"role": "user", "content": "shared words"}])
    assert chat.headers["x-admiral-cache"] == "miss"
    assert len(upstream_reset.embedding_requests) == 1 and len(upstream_reset.chat_requests) == 1


def test_a_provider_answer_with_missing_vectors_is_a_502_and_not_cached(client: openai.OpenAI, upstream_reset: FakeUpstream) -> None:
    upstream_reset.behaviour = "wrongshape"
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="vectors", input=["a", "b"])
    assert caught.value.status_code == 502
    upstream_reset.behaviour = "ok"
    assert client.embeddings.with_raw_response.create(model="vectors", input=["a", "b"]).headers["x-admiral-cache"] == "miss"


# -- dedupe, failover, limits -----------------------------------------------------------------


def test_identical_batches_in_flight_share_one_call(gw: GatewayServer, upstream_reset: FakeUpstream) -> None:
    body = {"model": "vectors", "input": ["in flight", "together"]}

    async def both() -> tuple[httpx.Response, httpx.Response]:
        registry = gw.services.metrics.registry
        coalesced = registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0
        upstream_reset.hold()
        async with httpx.AsyncClient(timeout=20) as http:
            first = asyncio.create_task(http.post(f"{gw.base_url}/embeddings", headers=AUTH, json=body))
            while upstream_reset.held < 1:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(http.post(f"{gw.base_url}/embeddings", headers=AUTH, json={**body, "encoding_format": "base64"}))
            while (registry.get_sample_value("admiral_dedupe_coalesced_total") or 0.0) <= coalesced:
                await asyncio.sleep(0.01)
            upstream_reset.release()
            return await first, await second

    leader, follower = asyncio.run(both())
    assert follower.headers["x-admiral-dedupe"] == "follower"
    assert leader.headers["x-admiral-dedupe"] == "leader"
    assert [f32(d["embedding"]) for d in leader.json()["data"]] == [fake_vector("in flight"), fake_vector("together")]
    assert [base64_to_floats(d["embedding"]) for d in follower.json()["data"]] == [fake_vector("in flight"), fake_vector("together")]
    assert len(upstream_reset.embedding_requests) == 1


def test_failover_moves_embeddings_to_the_next_deployment(upstream: FakeUpstream, upstream2: FakeUpstream) -> None:
    cfg = f"""
keys:
  - {{key: {KEY}, agent: embedder}}
providers:
  one: {{kind: openai, base_url: "{upstream.base_url}", api_key: sk-one-secret}}
  two: {{kind: openai, base_url: "{upstream2.base_url}", api_key: sk-two-secret}}
models:
  vectors: [one/e1, two/e2]
retry: {{attempts: 1}}
circuit_breaker: {{failure_threshold: 1}}
"""
    upstream.behaviour = "500"
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        raw = client.embeddings.with_raw_response.create(model="vectors", input=["fail", "over"])
        assert raw.headers["x-admiral-backend"] == "two"
        assert raw.parse().model == "e2"
        assert [f32(d.embedding) for d in raw.parse().data] == [fake_vector("fail"), fake_vector("over")]
        # the breaker opened on the first failure: the next miss goes to two without calling one
        client.embeddings.create(model="vectors", input="next")
        state = gw.services.metrics.registry.get_sample_value("admiral_circuit_state", {"backend": "one"})
        assert state == 2
    assert len(upstream.embedding_requests) == 1 and len(upstream2.embedding_requests) == 2


def test_one_answer_never_mixes_two_deployments_vectors(upstream: FakeUpstream) -> None:
    cfg = f"""
keys:
  - {{key: {KEY}, agent: embedder}}
providers:
  one: {{kind: openai, base_url: "{upstream.base_url}", api_key: sk-one-secret}}
  demo: {{kind: demo}}
models:
  mixed: [one/e1, demo/demo-embed]
retry: {{attempts: 1}}
circuit_breaker: {{failure_threshold: 100}}
"""

    def demo(item: str) -> list[float]:
        return f32(demo_vector(item, DEMO_DIMENSIONS).tolist())

    with gateway(cfg) as gw:
        sdk = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)

        def embed(items: list[str]) -> tuple[str, str, list[list[float]]]:
            raw = sdk.embeddings.with_raw_response.create(model="mixed", input=items, encoding_format="float")
            return raw.headers["x-admiral-cache"], raw.parse().model, [f32(d.embedding) for d in raw.parse().data]

        assert embed(["alpha"]) == ("miss", "e1", [fake_vector("alpha")])
        # one fails: beta comes from demo, and so must alpha, though one's alpha is cached
        upstream.behaviour = "500"
        assert embed(["alpha", "beta"]) == ("miss", "demo-embed", [demo("alpha"), demo("beta")])
        assert asked(upstream) == [["alpha"], ["beta"]]
        # demo's vectors are what the cache holds now
        assert embed(["beta", "alpha"]) == ("hit", "demo-embed", [demo("beta"), demo("alpha")])
        # one is back and answers gamma: the cached alpha (demo's) is asked of one too
        upstream.behaviour = "ok"
        assert embed(["alpha", "gamma"]) == ("miss", "e1", [fake_vector("alpha"), fake_vector("gamma")])
        assert asked(upstream)[2:] == [["gamma"], ["alpha"]]
        # hits of two deployments: those of the one holding most are used, the rest asked for
        assert embed(["alpha", "beta", "gamma"]) == ("partial", "e1", [fake_vector("alpha"), fake_vector("beta"), fake_vector("gamma")])
        assert asked(upstream)[4:] == [["beta"]]


def test_agent_limits_count_embedding_tokens(upstream: FakeUpstream) -> None:
    with gateway(config(upstream, key_extra=", tpm: 100")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.embeddings.create(model="vectors", input="a short one")
        with pytest.raises(openai.RateLimitError) as caught:
            # about 150 tokens (4 characters a token): more than the minute's 100
            client.embeddings.create(model="vectors", input=["x" * 300, "y" * 300])
        assert int(caught.value.response.headers["retry-after"]) >= 1
    assert asked(upstream) == [["a short one"]]


def test_provider_budgets_count_the_items_asked_for(upstream: FakeUpstream) -> None:
    cfg = config(upstream).replace("timeout_s: 10}", "timeout_s: 10, rpm: 2}")
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.embeddings.create(model="vectors", input=["one"])
        client.embeddings.create(model="vectors", input=["one", "two"])
        # fully cached: no provider call, no budget spent
        client.embeddings.create(model="vectors", input=["two", "one"])
        with pytest.raises(openai.RateLimitError):
            client.embeddings.create(model="vectors", input=["three"])
    assert asked(upstream) == [["one"], ["two"]]


def test_requests_are_logged_and_counted_as_embeddings(upstream: FakeUpstream) -> None:
    with gateway(config(upstream)) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        client.embeddings.create(model="vectors", input=["log", "me"])
        client.embeddings.create(model="vectors", input=["log", "me", "too"])
        client.embeddings.create(model="vectors", input=["me", "log"])
        registry = gw.services.metrics.registry
        labels = {"agent": "embedder", "model": "vectors", "backend": "up", "status": "200", "endpoint": "embeddings"}
        assert [registry.get_sample_value("admiral_requests_total", {**labels, "cache": c}) for c in ("miss", "partial", "hit")] == [1, 1, 1]
        assert registry.get_sample_value("admiral_tokens_total", {"agent": "embedder", "backend": "up", "direction": "prompt"}) == 3
        admin = {"Authorization": "Bearer admin-key-123456"}
        stats: dict[str, Any] = {}
        for _ in range(500):
            stats = httpx.get(f"{gw.url}/admin/stats", headers=admin).json()
            if stats["by_endpoint"].get("embeddings", {}).get("requests") == 3:
                break
            gw.call(asyncio.sleep(0.01))
        assert stats["by_endpoint"]["embeddings"] == {**stats["by_endpoint"]["embeddings"], "requests": 3, "cache_hits": 1, "prompt_tokens": 3}


# -- the demo provider ------------------------------------------------------------------------


def test_demo_vectors_are_deterministic_and_sized(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model="demo-vectors", input=["hello", "fleet"], extra_headers={"Cache-Control": "no-cache"})
    assert [len(d.embedding) for d in first.data] == [DEMO_DIMENSIONS, DEMO_DIMENSIONS]
    assert f32(first.data[0].embedding) == f32(demo_vector("hello", DEMO_DIMENSIONS))
    assert f32(first.data[1].embedding) == f32(demo_vector("fleet", DEMO_DIMENSIONS))
    tokens = client.embeddings.create(model="demo-vectors", input=[[1, 2, 3]])
    assert f32(tokens.data[0].embedding) == f32(demo_vector([1, 2, 3], DEMO_DIMENSIONS))
    assert abs(sum(v * v for v in first.data[0].embedding) - 1.0) < 1e-5
    again = client.embeddings.create(model="demo-vectors", input="hello", extra_headers={"Cache-Control": "no-cache"})
    assert f32(again.data[0].embedding) == first.data[0].embedding
    sized = client.embeddings.create(model="demo-vectors", input="hello", dimensions=32, encoding_format="float")
    assert len(sized.data[0].embedding) == 32 and sized.model == "demo-embed"


# -- bad requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "vectors"}, "input"),
        ({"model": "vectors", "input": ""}, "input"),
        ({"model": "vectors", "input": []}, "input"),
        ({"model": "vectors", "input": ["ok", ""]}, "input[1]"),
        ({"model": "vectors", "input": ["ok", 3]}, "input[1]"),
        ({"model": "vectors", "input": [[1, 2], "text"]}, "input[1]"),
        ({"model": "vectors", "input": [[1, 2], []]}, "input[1]"),
        ({"model": "vectors", "input": [1, -2]}, "input[1]"),
        ({"model": "vectors", "input": [1, True]}, "input[1]"),
        ({"model": "vectors", "input": [[1, 2.5]]}, "input[0][1]"),
        ({"model": "vectors", "input": {"text": "x"}}, "input"),
        ({"model": "vectors", "input": 42}, "input"),
        ({"model": "vectors", "input": ["x"] * 2049}, "input"),
        ({"model": "vectors", "input": "x", "encoding_format": "binary"}, "encoding_format"),
        ({"model": "vectors", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "vectors", "input": "x", "dimensions": "8"}, "dimensions"),
        ({"model": "vectors", "input": "x", "user": 7}, "user"),
        ({"model": "vectors", "input": "x", "stream": True}, "stream"),
        ({"input": "x"}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_param(gw: GatewayServer, upstream_reset: FakeUpstream, body: dict[str, Any], param: str) -> None:
    resp = httpx.post(f"{gw.base_url}/embeddings", headers=AUTH, json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert upstream_reset.embedding_requests == []


def test_bad_bodies_and_unknown_models_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="vectors", input=[""])
    assert caught.value.body["param"] == "input[0]"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="sk-wrong-key-000000", max_retries=0).embeddings.create(model="vectors", input="x")


def test_without_a_cache_embeddings_still_pass_every_layer(upstream: FakeUpstream) -> None:
    with gateway(config(upstream, "cache: {enabled: false}")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        floats = client.embeddings.with_raw_response.create(model="vectors", input=["no", "cache"], encoding_format="float")
        assert floats.headers["x-admiral-cache"] == "bypass"
        assert [f32(d.embedding) for d in floats.parse().data] == [fake_vector("no"), fake_vector("cache")]
        # asked for explicitly, base64 reaches the SDK's caller undecoded
        b64 = client.embeddings.create(model="vectors", input=["no", "cache"], encoding_format="base64")
        assert [base64_to_floats(d.embedding) for d in b64.data] == [fake_vector("no"), fake_vector("cache")]  # type: ignore[arg-type]
    # sent as the client asked; the vectors came back in either form and were written as asked
    assert [r.body["encoding_format"] for r in upstream.embedding_requests] == ["float", "base64"]


def test_a_provider_that_refuses_base64_gets_none_and_its_floats_are_taken(upstream: FakeUpstream) -> None:
    cfg = config(upstream).replace("timeout_s: 10}", "timeout_s: 10, drop_params: [encoding_format]}")
    with gateway(cfg) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        answer = client.embeddings.create(model="vectors", input=["floats", "only"])
        assert [f32(d.embedding) for d in answer.data] == [fake_vector("floats"), fake_vector("only")]
        hit = client.embeddings.with_raw_response.create(model="vectors", input="only", encoding_format="float")
        assert hit.headers["x-admiral-cache"] == "hit" and f32(hit.parse().data[0].embedding) == fake_vector("only")
    assert "encoding_format" not in upstream.embedding_requests[0].body


# -- several replicas: one Redis, one PostgreSQL ------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
def test_replicas_share_items_and_single_flight(upstream: FakeUpstream, prefix: str, new_pg_database: NewDatabase) -> None:
    with replicas(config(upstream), prefix=prefix, database_url=new_pg_database()) as (a, b):
        first = openai.OpenAI(base_url=a.base_url, api_key=KEY, max_retries=0)
        second = openai.OpenAI(base_url=b.base_url, api_key=KEY, max_retries=0)
        first.embeddings.create(model="vectors", input=["red", "green", "blue"])
        assert a.services.cache is not None
        a.call(a.services.cache.flush())
        raw = second.embeddings.with_raw_response.create(model="vectors", input=["blue", "cyan", "red"])
        assert raw.headers["x-admiral-cache"] == "partial"
        assert [f32(d.embedding) for d in raw.parse().data] == [fake_vector(t) for t in ("blue", "cyan", "red")]
        assert asked(upstream) == [["red", "green", "blue"], ["cyan"]]

        body = {"model": "vectors", "input": ["across", "replicas"]}

        async def both() -> tuple[httpx.Response, httpx.Response]:
            upstream.hold()
            async with httpx.AsyncClient(timeout=20) as http:
                leader = asyncio.create_task(http.post(f"{a.base_url}/embeddings", headers=AUTH, json=body))
                while upstream.held < 1:
                    await asyncio.sleep(0.01)
                follower = asyncio.create_task(http.post(f"{b.base_url}/embeddings", headers=AUTH, json=body))
                while not b.services.metrics.registry.get_sample_value("admiral_dedupe_coalesced_total"):
                    await asyncio.sleep(0.01)
                upstream.release()
                return await leader, await follower

        leader, follower = asyncio.run(both())
        assert follower.headers["x-admiral-dedupe"] == "follower"
        assert follower.json()["data"] == leader.json()["data"]
        assert [f32(d["embedding"]) for d in follower.json()["data"]] == [fake_vector("across"), fake_vector("replicas")]
        assert len(upstream.embedding_requests) == 3
