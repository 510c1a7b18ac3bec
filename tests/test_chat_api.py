"""The gateway through the official OpenAI SDK, against a fake upstream on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

AGENT_KEY = "sk-agent-quality-0001"
PROVIDER_KEY = "sk-provider-secret-9999"


def config(up: FakeUpstream, *, extra_providers: str = "", fast: str = "[up/fake-model]") -> str:
    return f"""
keys:
  - {{key: {AGENT_KEY}, agent: quality}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: {PROVIDER_KEY}, timeout_s: 5}}
  demo: {{kind: demo}}
{extra_providers}
models:
  fast: {fast}
  demo: [demo/echo]
routing: {{default: fast}}
"""


@pytest.fixture
def gw(upstream: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(upstream)) as server:
        yield server


@pytest.fixture
def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)


def test_plain_completion(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    resp = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello gateway"}])
    assert resp.choices[0].message.content == "echo: hello gateway"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    assert upstream.calls == 1
    assert upstream.chat_requests[0].body["model"] == "fake-model"


def test_headers_and_request_id(gw: GatewayServer) -> None:
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}", "x-request-id": "trace-42"}, json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42"
    assert r.headers["x-admiral-backend"] == "up"
    assert r.headers["x-admiral-route"] == "fast"


def test_stream_shape_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "one two three"}], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "echo: one two three"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_stream_is_relayed_as_it_arrives(gw: GatewayServer, upstream: FakeUpstream) -> None:
    upstream.behaviour = "dribble:0.3"
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "fast", "stream": True, "messages": [{"role": "user", "content": "a b c d e"}]}, timeout=10) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        # the first event reached us while the upstream is still dribbling the rest
        assert upstream.inflight == 1
        assert '"role":"assistant"' in first
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"


def test_models_list(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["demo", "fast"]


def test_wrong_key_is_authentication_error(gw: GatewayServer) -> None:
    bad = openai.OpenAI(base_url=gw.base_url, api_key="sk-wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_missing_key_is_401(gw: GatewayServer) -> None:
    r = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_not_found(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model"  # type: ignore[index]
    assert upstream.calls == 0


def test_malformed_json_is_bad_request(gw: GatewayServer) -> None:
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}", "content-type": "application/json"}, content=b'{"model": "fast", "messages": [')
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]


def test_validation_error_names_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fast", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[misc, list-item]
    assert info.value.body["param"] == "messages[0].role"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]


def test_provider_key_goes_upstream_and_agent_key_does_not(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    headers = upstream.chat_requests[0].headers
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert AGENT_KEY not in repr(upstream.chat_requests[0])


def test_upstream_cookies_stay_with_the_call_that_got_them(upstream: FakeUpstream) -> None:
    # by name, not IP: cookie jars keep no cookies from IP addresses
    with gateway(config(upstream).replace("127.0.0.1", "localhost")) as gw:
        for prompt in ("first agent", "second agent"):
            r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "fast", "messages": [{"role": "user", "content": prompt}]}, timeout=10)
            assert r.status_code == 200, r.text
            assert "set-cookie" not in r.headers
    assert [("cookie" in req.headers) for req in upstream.chat_requests] == [False, False]


def test_body_over_limit_is_413(upstream: FakeUpstream) -> None:
    with gateway(config(upstream) + "server: {max_body_bytes: 2048}\n") as gw:
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "fast", "messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"


def test_health(gw: GatewayServer) -> None:
    assert httpx.get(f"{gw.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gw.url}/health/ready")
    assert ready.status_code == 200


def test_provider_model_id_routes_to_that_deployment(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    client.chat.completions.create(model="up/other-model", messages=[{"role": "user", "content": "hi"}])
    assert upstream.chat_requests[0].body["model"] == "other-model"


def test_next_deployment_when_first_cannot_connect(upstream: FakeUpstream) -> None:
    dead = FakeUpstream()
    dead.start()
    dead_url = dead.base_url
    dead.stop()  # nothing listens there any more
    providers = f'  dead: {{kind: openai, base_url: "{dead_url}", api_key: k, timeout_s: 2}}\n'
    with gateway(config(upstream, extra_providers=providers, fast="[dead/m, up/fake-model]")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-admiral-backend"] == "up"
        assert raw.parse().choices[0].message.content == "echo: hi"
