"""Hostile clients: every malformed request gets a 4xx in OpenAI's error shape, never a 5xx or a hang."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, AUTH, HELLO, assert_openai_error, config, inflight, raw_http, server_errors, split_response, wait_for
from tests.support import GatewayServer, gateway

JSON_AUTH = {**AUTH, "content-type": "application/json"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up)) as server:
        yield server


@pytest.fixture
def http(gw: GatewayServer, up: FakeUpstream, caplog: pytest.LogCaptureFixture) -> Iterator[httpx.Client]:
    """A client for one test; afterwards the gateway has made no 5xx, logged no crash, holds nothing."""
    up.reset()
    errors_before = server_errors(gw)
    caplog.set_level(logging.WARNING)
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        yield client
        assert client.get("/health").status_code == 200
    assert server_errors(gw) == errors_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    wait_for(lambda: inflight(gw) == 0, what="inflight 0")


def post_raw(http: httpx.Client, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post("/v1/chat/completions", content=body, headers=headers or JSON_AUTH)


# -- bodies that are not a JSON object -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        (b"hello", "not valid JSON"),
        (b'{"model": "fast", "messages": [', "not valid JSON"),
        (b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}]', "not valid JSON"),
        (b'{"model": "\xff\xfe", "messages": []}', "not valid JSON"),
        (b'{"model": "fast\\ud800", "messages": []}', "not valid JSON"),
        (b'{"model": "fast", "messages": [], "temperature": NaN}', "not valid JSON"),
        (b'{"model": "fast", "max_tokens": ' + b"9" * 400 + b"}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"a string"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON"),
        # readable by orjson (under 1024 levels) but too deep to forward
        (b'{"model": "fast", "messages": [{"role": "user", "content": "x", "extra": ' + b"[" * 600 + b"]" * 600 + b"}]}", "nests too deeply"),
    ],
    ids=["empty", "blank", "not-json", "truncated", "unclosed", "bad-utf8", "lone-surrogate", "nan", "huge-number", "array", "null", "string", "number", "100k-nested-arrays", "100k-nested-objects", "600-nested-inside"],
)
def test_body_not_a_json_object_is_400(http: httpx.Client, up: FakeUpstream, body: bytes, says: str) -> None:
    r = post_raw(http, body)
    assert_openai_error(r, 400, contains=says)
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert up.calls == 0


# -- fields of the wrong shape ----------------------------------------------------------------


def _with(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": USER, **fields}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "fast"}, "messages", "required"),
        (_with(messages=[]), "messages", "at least 1"),
        (_with(messages=None), "messages", "valid list"),
        (_with(messages="hi"), "messages", "valid list"),
        (_with(messages={"role": "user"}), "messages", "valid list"),
        (_with(messages=["hi"]), "messages[0]", "dictionary"),
        (_with(messages=[5]), "messages[0]", "dictionary"),
        (_with(messages=[{"content": "hi"}]), "messages[0].role", "required"),
        (_with(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "'user'"),
        (_with(messages=[{"role": 1, "content": "hi"}]), "messages[0].role", "'user'"),
        (_with(messages=[*USER, {"role": "", "content": "hi"}]), "messages[1].role", "'user'"),
        (_with(messages=[{"role": "user", "content": 5}]), "messages[0].content", "valid string or a valid list"),
        (_with(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content", "valid string or a valid list"),
        (_with(messages=[{"role": "user", "content": True}]), "messages[0].content", "valid string or a valid list"),
        (_with(messages=[{"role": "user", "content": [{"text": "hi"}]}]), "messages[0].content[0].type", "required"),
        (_with(messages=[{"role": "user", "content": [{"type": "", "text": "hi"}]}]), "messages[0].content[0].type", "at least 1"),
        (_with(messages=[{"role": "user", "content": ["hi"]}]), "messages[0].content[0]", "dictionary"),
        (_with(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0]", "'text' must be a string"),
        (_with(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages[0].content[0].text", "valid string"),
        (_with(messages=[{"role": "user", "content": "hi", "name": 7}]), "messages[0].name", "valid string"),
        (_with(messages=[{"role": "assistant", "tool_calls": "x"}]), "messages[0].tool_calls", "valid list"),
        (_with(stream="yes"), "stream", "boolean"),
        (_with(stream=1), "stream", "boolean"),
        (_with(stream_options="x"), "stream_options", "dictionary"),
        (_with(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "boolean"),
        (_with(stream_options={"include_usage": True}), "stream_options", "only allowed when 'stream' is true"),
        (_with(stream=False, stream_options={"include_usage": True}), "stream_options", "only allowed when 'stream' is true"),
        (_with(n=0), "n", "greater than or equal to 1"),
        (_with(n=1000), "n", "less than or equal to 128"),
        (_with(n="2"), "n", "valid integer"),
        (_with(n=1.5), "n", "valid integer"),
        (_with(n=True), "n", "valid integer"),
        (_with(temperature=-1), "temperature", "greater than or equal to 0"),
        (_with(temperature=7), "temperature", "less than or equal to 2"),
        (_with(temperature="hot"), "temperature", "valid number"),
        (_with(temperature="0.5"), "temperature", "valid number"),
        (_with(temperature=[1]), "temperature", "valid number"),
        (_with(top_p=1.5), "top_p", "less than or equal to 1"),
        (_with(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (_with(max_tokens=-5), "max_tokens", "greater than or equal to 1"),
        (_with(max_tokens="10"), "max_tokens", "valid integer"),
        (_with(max_tokens=10.5), "max_tokens", "valid integer"),
        (_with(max_tokens=10**30), "max_tokens", "valid integer"),
        (_with(max_completion_tokens=0), "max_completion_tokens", "greater than or equal to 1"),
        (_with(stop=5), "stop", "valid string or a valid list"),
        (_with(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (_with(stop=[1]), "stop[0]", "valid string"),
        (_with(tools="x"), "tools", "valid list"),
        (_with(tool_choice=5), "tool_choice", "valid string or a valid dictionary"),
        (_with(logit_bias={"50256": "x"}), "logit_bias.50256", "valid number"),
        (_with(seed="1"), "seed", "valid integer"),
        ({"messages": USER}, "model", "required"),
        (_with(model=None), "model", "valid string"),
        (_with(model=5), "model", "valid string"),
        (_with(model=["fast"]), "model", "valid string"),
        (_with(model=""), "model", "at least 1"),
        (_with(model="m" * 100_000), "model", "at most 512"),
        (_with(model="fa\x00st"), "model", "control characters"),
        (_with(model="fast\n"), "model", "control characters"),
        (_with(model="up/\x1b[31mred"), "model", "control characters"),
        (_with(model="fast\u200b"), "model", "control characters"),
    ],
)
def test_invalid_field_is_400_naming_the_param(http: httpx.Client, up: FakeUpstream, body: dict[str, Any], param: str, says: str) -> None:
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    err = assert_openai_error(r, 400, param=param, contains=says)
    assert err["type"] == "invalid_request_error"
    assert param in err["message"]
    assert up.calls == 0


def test_unknown_model_names_are_404_and_quoted_safely(http: httpx.Client, up: FakeUpstream) -> None:
    for model in ("модель🚀", "no-such-model", "/", "up/", "nope/x", "m" * 512):
        r = http.post("/v1/chat/completions", json=_with(model=model), headers=AUTH)
        err = assert_openai_error(r, 404, param="model")
        assert err["code"] == "model_not_found"
        assert len(err["message"]) < 400  # a 512-character name is shortened, not echoed whole
    assert up.calls == 0


def test_unicode_deployment_model_id_is_forwarded_and_its_header_is_encoded(http: httpx.Client, up: FakeUpstream) -> None:
    r = http.post("/v1/chat/completions", json=_with(model="up/модель-7b"), headers=AUTH)
    assert r.status_code == 200, r.text
    assert up.chat_requests[0].body["model"] == "модель-7b"
    route = r.headers["x-admiral-route"]
    assert route.isascii() and route.startswith("up/%D0%BC")


# -- size ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gw(up: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(config(up, extra="server: {max_body_bytes: 2048}")) as server:
        yield server


def test_oversize_body_is_413_by_content_length(small_gw: GatewayServer, up: FakeUpstream) -> None:
    up.reset()
    r = httpx.post(f"{small_gw.base_url}/chat/completions", json=_with(messages=[{"role": "user", "content": "x" * 5000}]), headers=AUTH)
    err = assert_openai_error(r, 413)
    assert err["code"] == "request_too_large" and "2048" in err["message"]
    assert up.calls == 0


def test_oversize_chunked_body_is_413_without_content_length(small_gw: GatewayServer, up: FakeUpstream) -> None:
    up.reset()
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "fast", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            sent += 1
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(f"{small_gw.base_url}/chat/completions", content=body(), headers=JSON_AUTH)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    err = assert_openai_error(r, 413)
    assert err["code"] == "request_too_large"
    assert up.calls == 0
    assert small_gw.services.metrics.registry.get_sample_value("admiral_inflight_requests") == 0


def test_body_under_the_limit_is_served(small_gw: GatewayServer) -> None:
    r = httpx.post(f"{small_gw.base_url}/chat/completions", json=HELLO, headers=AUTH)
    assert r.status_code == 200


# -- authorization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic c2s6eA==", "Bearer", "Bearer ", "bearer", "Token " + AGENT_KEY, "Bearer sk-wrong", "Bearer " + AGENT_KEY + "x", AGENT_KEY, "Bearer " + "k" * 10_000],
    ids=["missing", "empty", "basic", "bearer-only", "bearer-space", "lowercase-only", "token-scheme", "wrong", "longer", "no-scheme", "huge"],
)
def test_missing_or_malformed_authorization_is_401(gw: GatewayServer, up: FakeUpstream, authorization: str | None) -> None:
    up.reset()
    header = b"" if authorization is None else b"Authorization: " + authorization.encode() + b"\r\n"
    body = json.dumps(HELLO).encode()
    raw = raw_http(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    status, headers, payload = split_response(raw)
    assert status == 401, raw[:300]
    err = json.loads(payload)["error"]
    assert err["type"] == "authentication_error" and err["message"]
    assert up.calls == 0


def test_non_latin1_bytes_in_authorization_are_401(gw: GatewayServer) -> None:
    raw = raw_http(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert split_response(raw)[0] == 401


def test_authentication_comes_before_the_body(http: httpx.Client) -> None:
    # a caller without a key learns nothing about what is wrong with its body
    for body in (b"", b"not json", b'{"model": 5}'):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 401)


def test_models_list_needs_the_key(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/models"), 401)
    assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer nope-nope"}), 401)
    assert http.get("/v1/models", headers=AUTH).status_code == 200


# -- method, path, content type --------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_wrong_method_is_405_in_openai_shape(http: httpx.Client, method: str) -> None:
    r = http.request(method, "/v1/chat/completions", headers=AUTH)
    err = assert_openai_error(r, 405, contains=method)
    assert err["type"] == "invalid_request_error"
    assert r.headers["allow"] == "POST"
    r = http.request("POST", "/v1/models", headers=AUTH)
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "GET"


@pytest.mark.parametrize("path", ["/nope", "/v1/completion", "/v1/chat/completions/extra", "/v2/chat/completions", "/v1/%00", "/" + "a" * 5000])
def test_unknown_path_is_404_in_openai_shape(http: httpx.Client, path: str) -> None:
    for method in ("GET", "POST"):
        err = assert_openai_error(http.request(method, path, headers=AUTH), 404)
        assert err["type"] == "not_found_error" and "Unknown path" in err["message"]
        assert len(err["message"]) < 400


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/xml", "text/html", "image/png", "application/octet-stream"])
def test_content_type_that_is_not_json_is_400(http: httpx.Client, up: FakeUpstream, content_type: str) -> None:
    r = post_raw(http, json.dumps(HELLO).encode(), {**AUTH, "content-type": content_type})
    err = assert_openai_error(r, 400, contains="Content-Type")
    assert err["code"] == "unsupported_media_type"
    assert up.calls == 0


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json", "text/plain", "application/x-www-form-urlencoded"])
def test_json_sent_under_lenient_content_types_is_served(http: httpx.Client, content_type: str | None) -> None:
    # `curl -d` (the README's example) labels its body form-urlencoded
    headers = dict(AUTH) if content_type is None else {**AUTH, "content-type": content_type}
    r = post_raw(http, json.dumps(HELLO).encode(), headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello"


def test_form_encoded_body_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", data={"model": "fast", "messages": "hi"}, headers=AUTH)
    assert_openai_error(r, 400, contains="not valid JSON")


# -- clients that misbehave on the wire ------------------------------------------------------


def test_client_that_leaves_while_sending_the_body_frees_the_request(gw: GatewayServer, up: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    errors_before = server_errors(gw)
    # claims 1000 bytes, sends 20, then goes away
    sock = socket.create_connection(("127.0.0.1", gw.port))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + AGENT_KEY.encode()
    sock.sendall(head + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"model": "fast", "m')
    wait_for(lambda: inflight(gw) == 1, what="the request to be in flight")
    sock.close()
    wait_for(lambda: inflight(gw) == 0, what="inflight back to 0")
    assert server_errors(gw) == errors_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert up.calls == 0
    assert httpx.post(f"{gw.base_url}/chat/completions", json=HELLO, headers=AUTH).status_code == 200


def test_garbage_on_the_wire_does_not_hurt_the_gateway(gw: GatewayServer) -> None:
    for junk in (b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        try:
            raw_http(gw.port, junk, timeout=2)
        except OSError:
            pass
    assert httpx.post(f"{gw.base_url}/chat/completions", json=HELLO, headers=AUTH).status_code == 200


def test_after_all_that_the_gateway_answers_normally(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=HELLO, headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hello"
    assert http.get("/health/ready").status_code == 200
