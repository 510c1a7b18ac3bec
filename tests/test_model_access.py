"""Model access per key (``keys[].models``): what a key sees in ``/v1/models`` and what it may call,
on every model endpoint, by public name, ``auto`` and ``provider/model-id``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from app.classifier import Decision
from app.config import ConfigError
from app.pipeline.base import ModelRequest
from app.pipeline.router import ModelRouter
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway, make_settings

FULL = "sk-agent-full-00001"  # no models list: every model
FAST = "sk-agent-fast-00002"  # models: [fast]
CODER = "sk-agent-code-00003"  # models: [code, demo]


def config(up: FakeUpstream) -> str:
    return f"""
keys:
  - {{key: {FULL}, agent: full}}
  - {{key: {FAST}, agent: fast-only, models: [fast]}}
  - {{key: {CODER}, agent: coder, models: [code, demo]}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider, timeout_s: 10}}
  demo: {{kind: demo}}
models:
  fast: [up/fast-model]
  code: [up/code-model, up/fast-model]
  demo: [demo/echo]
routing:
  default: fast
  rules:
    - {{if: {{contains_any: ["def "]}}, model: code}}
retry: {{attempts: 1}}
"""


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def upstream(up: FakeUpstream) -> FakeUpstream:
    up.reset()
    return up


def client(gw: GatewayServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def chat(gw: GatewayServer, key: str, model: str, text: str = "hello") -> Any:
    return client(gw, key).chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}])


def assert_not_allowed(exc: openai.PermissionDeniedError, model: str) -> None:
    assert exc.status_code == 403
    body = exc.body
    assert isinstance(body, dict), body
    assert body["type"] == "permission_error" and body["code"] == "model_not_allowed" and body["param"] == "model"
    assert f"'{model}'" in body["message"]
    assert exc.response.json() == {"error": body}


# -- config -------------------------------------------------------------------------------


def test_unknown_names_fail_at_start_naming_the_key_path() -> None:
    base = {"providers": {"demo": {"kind": "demo"}}, "models": {"demo": ["demo/echo"]}}
    with pytest.raises(ConfigError) as caught:
        make_settings({**base, "keys": [{"key": FULL, "agent": "a", "models": ["demo", "gpt-5"]}]}, source="gw.yaml")
    assert str(caught.value) == "gw.yaml: keys[0].models[1]: unknown model 'gpt-5' (known: demo)"
    with pytest.raises(ConfigError) as caught:
        make_settings({**base, "keys": [{"key": FULL, "agent": "a", "models": []}]}, source="gw.yaml")
    assert "gw.yaml: keys[0].models: an empty list would allow no model at all" in str(caught.value)
    with pytest.raises(ConfigError, match=r"keys\[0\]\.models: Input should be a valid list"):
        make_settings({**base, "keys": [{"key": FULL, "agent": "a", "models": "demo"}]}, source="gw.yaml")


# -- /v1/models ---------------------------------------------------------------------------


def test_the_model_list_shows_what_the_key_may_use(gw: GatewayServer) -> None:
    assert [m.id for m in client(gw, FULL).models.list()] == ["fast", "code", "demo"]
    assert [m.id for m in client(gw, FAST).models.list()] == ["fast"]
    assert [m.id for m in client(gw, CODER).models.list()] == ["code", "demo"]
    # the key may come as Anthropic's SDK sends it
    r = httpx.get(f"{gw.base_url}/models", headers={"x-api-key": FAST})
    assert [m["id"] for m in r.json()["data"]] == ["fast"]
    assert httpx.get(f"{gw.base_url}/models", headers={"x-api-key": "sk-nobody-at-all"}).status_code == 401


def test_retrieve_a_model(gw: GatewayServer) -> None:
    model = client(gw, FAST).models.retrieve("fast")
    assert (model.id, model.object, model.owned_by) == ("fast", "model", "admiral-optimizer")
    for key, name in ((FAST, "code"), (FAST, "no-such-model"), (FULL, "up/fast-model"), (FULL, "auto")):
        with pytest.raises(openai.NotFoundError) as caught:
            client(gw, key).models.retrieve(name)
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "not_found_error" and body["code"] == "model_not_found", body
        assert body["message"] == f"The model '{name}' does not exist or this key may not use it."
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.base_url, api_key="sk-wrong-key-000", max_retries=0).models.retrieve("fast")


# -- calls --------------------------------------------------------------------------------


def test_a_model_outside_the_list_is_403_on_every_endpoint(gw: GatewayServer, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(gw, FAST, "code")
    assert_not_allowed(caught.value, "code")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gw, FAST).completions.create(model="demo", prompt="hi")
    assert_not_allowed(caught.value, "demo")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        list(client(gw, CODER).chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert_not_allowed(caught.value, "fast")
    assert upstream.calls == 0
    # inside the list it is served, and keys without a list are untouched
    assert chat(gw, FAST, "fast").headers["x-admiral-route"] == "fast"
    assert chat(gw, CODER, "code").headers["x-admiral-route"] == "code"
    assert client(gw, CODER).completions.create(model="demo", prompt="hi").choices[0].text.startswith("Admiral demo answer.")
    assert chat(gw, FULL, "demo").headers["x-admiral-route"] == "demo"


def test_a_cached_answer_is_no_way_around_the_list(gw: GatewayServer, upstream: FakeUpstream) -> None:
    assert chat(gw, FULL, "code", "cached for everyone?").headers["x-admiral-cache"] == "miss"
    assert chat(gw, CODER, "code", "cached for everyone?").headers["x-admiral-cache"] in ("hit", "miss")
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, FAST, "code", "cached for everyone?")


def test_an_unknown_model_is_404_listing_only_the_keys_models(gw: GatewayServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat(gw, FAST, "gpt-9")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert body["message"].endswith("Known models: fast.")


def test_provider_model_id_obeys_the_list(gw: GatewayServer, upstream: FakeUpstream) -> None:
    # up/fast-model serves fast (and code): a key with either may call it directly
    assert chat(gw, FAST, "up/fast-model").headers["x-admiral-backend"] == "up"
    assert chat(gw, CODER, "up/fast-model", "hello, coder").headers["x-admiral-backend"] == "up"
    # up/code-model serves code only
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(gw, FAST, "up/code-model")
    assert_not_allowed(caught.value, "up/code-model")
    # a deployment no public model names is open to unrestricted keys only
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, CODER, "up/anything-else")
    assert chat(gw, FULL, "up/anything-else").headers["x-admiral-route"] == "up/anything-else"
    assert [r.body["model"] for r in upstream.chat_requests] == ["fast-model", "fast-model", "anything-else"]


def test_auto_routes_only_among_the_keys_models(gw: GatewayServer) -> None:
    # unrestricted: the rule picks code, otherwise the default
    assert chat(gw, FULL, "auto", "def f(): pass").headers["x-admiral-route"] == "code"
    assert chat(gw, FULL, "auto", "hello").headers["x-admiral-route"] == "fast"
    # the rule's model is not allowed: the rule is passed over, the default serves
    assert chat(gw, FAST, "auto", "def g(): pass").headers["x-admiral-route"] == "fast"
    # allowed rule applies; no rule and a default the key may not use: the key's first model
    assert chat(gw, CODER, "auto", "def h(): pass").headers["x-admiral-route"] == "code"
    assert chat(gw, CODER, "auto", "hello there").headers["x-admiral-route"] == "code"
    assert client(gw, CODER).completions.with_raw_response.create(model="auto", prompt="hello").headers["x-admiral-route"] == "code"


def test_the_other_model_endpoints_obey_the_list_too(gw: GatewayServer) -> None:
    fast_only, coder = client(gw, FAST), client(gw, CODER)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        fast_only.embeddings.create(model="demo", input="vectors, please")
    assert_not_allowed(caught.value, "demo")
    assert len(coder.embeddings.create(model="demo", input="vectors, please").data) == 1
    with pytest.raises(openai.PermissionDeniedError) as caught:
        fast_only.responses.create(model="demo", input="hello")
    assert_not_allowed(caught.value, "demo")
    assert coder.responses.create(model="demo", input="hello").output_text.startswith("Admiral demo answer.")
    # Anthropic's SDK: the same refusal, in Anthropic's error shape
    messages: Any = [{"role": "user", "content": "hello"}]
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        anthropic.Anthropic(base_url=gw.url, api_key=FAST, max_retries=0).messages.create(model="demo", max_tokens=16, messages=messages)
    assert refused.value.status_code == 403
    assert refused.value.body == {"type": "error", "error": {"type": "permission_error", "message": refused.value.body["error"]["message"]}}  # type: ignore[index]
    reply = anthropic.Anthropic(base_url=gw.url, api_key=CODER, max_retries=0).messages.create(model="demo", max_tokens=16, messages=messages)
    assert reply.content[0].type == "text"


def test_a_confident_classifier_choice_outside_the_list_is_passed_over_too() -> None:
    settings = make_settings(
        {
            "keys": [{"key": FAST, "agent": "fast-only", "models": ["fast"]}, {"key": CODER, "agent": "coder", "models": ["code", "demo"]}],
            "providers": {"demo": {"kind": "demo"}},
            "models": {"fast": ["demo/a"], "code": ["demo/b"], "demo": ["demo/c"]},
            "routing": {"default": "fast"},
        }
    )
    router = ModelRouter(settings)
    fast_only, coder = settings.keys
    request = ModelRequest({"model": "auto", "messages": [{"role": "user", "content": "write a parser"}]})
    says_code = Decision(route="code", confidence=0.9, confident=True)
    assert router.resolve_auto(request, "x", None, says_code)[::3] == ("code", "classifier")
    assert router.resolve_auto(request, "x", coder, says_code)[::3] == ("code", "classifier")
    assert router.resolve_auto(request, "x", fast_only, says_code)[::3] == ("fast", "default")
    assert router.resolve_auto(request, "x", coder, Decision(route="fast", confidence=0.9, confident=True))[::3] == ("code", "default")
