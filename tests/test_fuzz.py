"""Property-based fuzz: whatever a client sends, the gateway answers below 500, errors in OpenAI's shape.

Hypothesis builds requests three ways (random JSON values, valid requests with fields swapped for
garbage, raw bytes and corrupted JSON text); schemathesis walks the app's own OpenAPI document in
positive and negative modes. Every example is a real HTTP request to the running app, which talks to
the fake upstream (or the demo provider) when the request is valid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from tests.fake_upstream import FakeUpstream
from tests.hostile import AUTH, HELLO, assert_openai_error, config, inflight, server_errors, wait_for
from tests.support import GatewayServer, gateway, make_settings

EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    # routing rules, so model "auto" reads the prompt text of whatever got through validation
    rules = "routing: {default: fast, rules: [{if: {contains_any: [code]}, model: demo}, {if: {min_chars: 50}, model: fast}]}"
    with gateway(config(up).replace("routing: {default: fast}", rules)) as server:
        yield server


@pytest.fixture(scope="module")
def http(gw: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def gateway_stays_healthy(gw: GatewayServer, http: httpx.Client) -> Iterator[None]:
    """After all the fuzzing: no 5xx of the gateway's own, nothing in flight, still serving."""
    yield
    assert server_errors(gw) == 0
    wait_for(lambda: inflight(gw) == 0, what="inflight 0")
    assert http.post("/v1/chat/completions", json=HELLO, headers=AUTH).status_code == 200


@pytest.fixture(autouse=True)
def no_crash_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.ERROR)
    yield
    crashes = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, crashes


def check(r: httpx.Response) -> None:
    """Below 500; a 4xx is an OpenAI error; a 200 is a completion (or an SSE stream ending in [DONE])."""
    assert r.status_code < 500, (r.status_code, r.text[:500], r.request.content[:500])
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.request.url.path == "/v1/chat/completions":
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        else:
            assert r.json()["object"] == "chat.completion", r.text[:300]


# -- strategies ------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


texts = st.text(max_size=40)
content_parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.just("data:image/png;base64,AAAA")})}),
    ),
    min_size=1,
    max_size=3,
)
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": texts | content_parts}, optional={"name": st.text(min_size=1, max_size=8)}),
    min_size=1,
    max_size=4,
)
valid_requests = st.fixed_dictionaries(
    {"model": st.sampled_from(["fast", "demo", "auto", "up/fake-model", "demo/x"]), "messages": valid_messages},
    optional={
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.integers(min_value=1, max_value=3),
        "temperature": st.floats(min_value=0, max_value=2),
        "top_p": st.floats(min_value=0, max_value=1),
        "max_tokens": st.integers(min_value=1, max_value=2**40),
        "max_completion_tokens": st.integers(min_value=1, max_value=64),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "logit_bias": st.dictionaries(st.text(max_size=6), st.floats(-100, 100), max_size=3),
        "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "user": st.text(max_size=10),
        "top_k": json_values,  # a vLLM extra: passed through whatever it is
        "x_unknown": json_values,
    },
)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON value: the places a mutation can hit."""
    found: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((node, key))
            found.extend(_slots(value))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append((node, index))
            found.extend(_slots(value))
    return found


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one to three places replaced by any JSON value, deleted, or doubled."""
    body = draw(valid_requests)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        slots = _slots(body)
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "delete", "wrap"]))
        if action == "replace":
            container[key] = draw(json_values)
        elif action == "delete":
            del container[key]
        else:
            container[key] = [container[key]]
    return body


chat_requests = valid_requests | mutated_requests()


# -- hypothesis: built requests --------------------------------------------------------------


@EXAMPLES
@given(body=json_values)
def test_any_json_value_as_body(http: httpx.Client, body: Any) -> None:
    check(http.post("/v1/chat/completions", content=json.dumps(body), headers={**AUTH, "content-type": "application/json"}))


@EXAMPLES
@given(body=chat_requests)
def test_valid_requests_with_fields_swapped_for_garbage(http: httpx.Client, body: dict[str, Any]) -> None:
    check(http.post("/v1/chat/completions", json=body, headers=AUTH))


@EXAMPLES
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_raw_bytes_as_body(http: httpx.Client, raw: bytes) -> None:
    check(http.post("/v1/chat/completions", content=raw, headers={**AUTH, "content-type": "application/json"}))


@EXAMPLES
@given(body=chat_requests, data=st.data())
def test_corrupted_json_text(http: httpx.Client, body: dict[str, Any], data: st.DataObject) -> None:
    text = json.dumps(body).encode()
    at = data.draw(st.integers(min_value=0, max_value=len(text)))
    cut = data.draw(st.integers(min_value=0, max_value=8))
    junk = data.draw(st.binary(max_size=4))
    check(http.post("/v1/chat/completions", content=text[:at] + junk + text[at + cut :], headers={**AUTH, "content-type": "application/json"}))


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@EXAMPLES
@given(authorization=header_text | header_text.map(lambda t: "Bearer " + t), content_type=header_text, request_id=header_text, cache=header_text)
def test_random_headers(http: httpx.Client, authorization: str, content_type: str, request_id: str, cache: str) -> None:
    headers = {"Authorization": authorization.strip() or "x", "content-type": content_type.strip() or "application/json", "x-request-id": request_id.strip() or "x", "cache-control": cache.strip() or "x"}
    r = http.post("/v1/chat/completions", json=HELLO, headers=headers)
    check(r)
    assert r.status_code in (400, 401), r.text  # none of these carries the key
    rid = r.headers["x-request-id"]
    assert rid.isascii() and 0 < len(rid) <= 128


# -- schemathesis: the app's own OpenAPI document --------------------------------------------

_DOC_SETTINGS = make_settings({"providers": {"demo": {"kind": "demo"}}, "models": {"demo": ["demo/echo"]}, "database": {"url": "sqlite+aiosqlite:///:memory:"}})
#: valid and invalid bodies from the document's schema; the fuzzing phase only, so it stays quick
_SCHEMATHESIS = schemathesis.Config.from_dict(
    {"generation": {"max-examples": 50, "mode": "all"}, "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}, "fuzzing": {"enabled": True}, "stateful": {"enabled": False}}}
)
schema = schemathesis.openapi.from_dict(create_app(_DOC_SETTINGS).openapi(), config=_SCHEMATHESIS)


@schema.parametrize()
def test_openapi_operations(case: schemathesis.Case, gw: GatewayServer) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        # the document cannot know the configured model names: send each body to a real one too
        check(httpx.post(gw.url + case.path, json={**case.body, "model": "demo"}, headers=AUTH, timeout=30))
    response = case.call(base_url=gw.url, headers=AUTH, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])
    if response.status_code >= 400 and case.path.startswith("/v1/"):
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
