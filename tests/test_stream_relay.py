"""The stream relay's fast paths: a provider's events parsed a read at a time and relayed in the
bytes they came in, and the fold's shortcut for chunks that only add content."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator

import httpx
import orjson
import pytest

from app.errors import UpstreamBadResponseError
from app.pipeline.streaming import ChunkAssembler
from app.providers.openai_compat import _whole_events
from app.shapes import Events
from app.storage.response_cache import CachedAnswer
from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, gateway

KEY = "sk-agent-relay-0001"


@pytest.fixture
def gw(upstream: FakeUpstream) -> Iterator[GatewayServer]:
    config = f"""
keys:
  - {{key: {KEY}, agent: relay}}
providers:
  up: {{kind: openai, base_url: "{upstream.base_url}", api_key: sk-provider-relay-9999, timeout_s: 5}}
models:
  fast: [up/fake-model]
routing: {{default: fast}}
"""
    with gateway(config) as server:
        yield server


def _events(gw: GatewayServer, body: dict[str, object]) -> list[str]:
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=10) as r:
        assert r.status_code == 200
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def test_events_go_out_in_the_bytes_the_provider_sent(gw: GatewayServer, upstream: FakeUpstream) -> None:
    """The fake provider writes its events with ``json.dumps`` (a space after each separator); the
    gateway's own encoding has none: every event arrives spaced as the provider wrote it."""
    body = {"model": "fast", "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "relay these words"}]}
    events = _events(gw, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 4
    for event in chunks:
        assert event == json.dumps(json.loads(event)), event
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in chunks if json.loads(e)["choices"]) == "echo: relay these words"
    # the same request again is a cache hit: the stream was kept as the provider's events, and goes out in its bytes again
    assert _events(gw, body) == events
    assert upstream.calls == 1


def test_a_stream_kept_as_its_events_answers_a_plain_request_with_what_they_fold_into(gw: GatewayServer, upstream: FakeUpstream) -> None:
    messages = [{"role": "user", "content": "fold me later"}]
    events = _events(gw, {"model": "fast", "stream": True, "stream_options": {"include_usage": True}, "messages": messages})
    usage = json.loads(events[-2])["usage"]
    r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"model": "fast", "messages": messages}, timeout=10)
    assert r.status_code == 200 and r.headers["x-admiral-cache"] == "hit" and upstream.calls == 1
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"] == usage
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: fold me later"} and body["choices"][0]["finish_reason"] == "stop"


def test_a_chunk_changed_on_the_way_is_encoded_anew(gw: GatewayServer) -> None:
    """Without ``include_usage`` the gateway takes out the ``usage: null`` the provider puts in each
    chunk: those chunks are new objects, written in the gateway's encoding, never the provider's bytes."""
    events = _events(gw, {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "no usage please"}]})
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c for c in chunks)
    assert all(e == orjson.dumps(json.loads(e)).decode() for e in events[:-1])


def _data(*events: object) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


def test_events_are_parsed_in_one_go_when_read_keeping_their_bytes() -> None:
    datas = _data({"id": "a", "choices": [{"index": 0, "delta": {"content": "x, y"}}]}, {"id": "a", "choices": [], "usage": {"total_tokens": 3}})
    events = Events(datas, "up")
    assert events.raw == b"".join(b"data: " + d + b"\n\n" for d in datas) and len(events) == 2
    assert events.usage() == {"total_tokens": 3}
    assert list(events) == [json.loads(d) for d in datas] and events[1]["usage"] == {"total_tokens": 3}
    assert list(Events([], "up")) == [] and Events([], "up").raw == b""
    assert Events.of_raw(events.raw, "up").datas == datas


@pytest.mark.parametrize(
    "datas",
    [
        [b'{"id": "a"}', b"not json"],
        [b'{"id": "a"}, {"id": "b"}'],  # two objects in one event: not one chunk each
        [b'{"id": "a"}', b"[1, 2]"],
        [b'{"id": "a"}', b""],
    ],
)
def test_events_that_are_not_chunks_are_the_providers_fault_when_read(datas: list[bytes]) -> None:
    events = Events(datas, "up")
    with pytest.raises(UpstreamBadResponseError, match="up sent a stream event that is not a JSON object"):
        list(events)


def _fold(*chunks: dict[str, object]) -> dict[str, object]:
    folded = ChunkAssembler()
    for chunk in chunks:
        folded.add(chunk)
    return dict(folded.result())


def test_the_content_shortcut_keeps_what_other_chunks_say() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body = _fold(
        {**head, "system_fingerprint": None, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "system_fingerprint": None, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        # a field the first chunks left null, given later with the same fields around it
        {**head, "system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        # content and usage in one chunk
        {**head, "system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": None}], "usage": {"total_tokens": 4}},
        # a choice field of the provider's own beside the content
        {
            **head,
            "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": {"content": "?"}, "finish_reason": None, "native_finish_reason": None, "x_seq": 5}],
        },
        {**head, "system_fingerprint": "fp_1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )
    assert body["system_fingerprint"] == "fp_1"
    assert body["usage"] == {"total_tokens": 4}
    choice = body["choices"][0]  # type: ignore[index]
    assert choice["message"] == {"role": "assistant", "content": "Hello!?"}
    assert choice["finish_reason"] == "stop" and choice["x_seq"] == 5


def test_content_before_a_role_and_vendor_objects_still_fold() -> None:
    body = _fold(
        {"id": "c2", "x_groq": {"id": "g"}, "choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"id": "c2", "x_groq": {"id": "g"}, "choices": [{"index": 0, "delta": {"content": "b"}}]},
        {"id": "c2", "x_groq": {"id": "g", "usage": {"total_tokens": 2}}, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    )
    assert body["x_groq"] == {"id": "g", "usage": {"total_tokens": 2}}
    assert body["choices"][0]["message"] == {"content": "ab", "role": "assistant"}  # type: ignore[index]


def _raw_fold(events: list[bytes]) -> tuple[dict[str, object], dict[str, object]]:
    """The stream folded from the provider's events (raw chunks, the bytes shortcut), and from plain copies of them."""
    chunks = Events(events, "up")
    folded = ChunkAssembler()
    folded.add_all(chunks)
    return dict(folded.result()), _fold(*(dict(c) for c in chunks))


_HEAD = b'{"id":"c3","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":'
_TAIL = b',"finish_reason":null}]}'


@pytest.mark.parametrize(
    ("middles", "content"),
    [
        # plain content pieces: after the second, the rest take the bytes shortcut
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":"c, d"}', b'{"content":""}', b'{"content":"e"}'], "abc, de"),
        # the same bytes around more than the content: a second delta key is folded, not skipped
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":"c","refusal":"no"}', b'{"content":"d"}'], "abcd"),
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":"c", "reasoning_content":"r"}', b'{"content":"d"}'], "abcd"),
        # the same bytes at both ends around more: a piece's logprobs, a second choice in the same chunk
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":"c"},"logprobs":{"content":[{"token":"c","logprob":-0.1}]}', b'{"content":"d"}'], "abcd"),
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":"c"},"finish_reason":null},{"index":1,"delta":{"content":"x"}', b'{"content":"d"}'], "abcd"),
        # content escaped as the provider does it (\\u, \\"): no shape is learned from it, the fold stays exact
        ([b'{"content":"a"}', b'{"content":"\\u00e9\\"q\\""}', b'{"content":"\\u00e9"}', b'{"content":"x"}'], 'a\u00e9"q"\u00e9x'),
        # a piece that is also a value elsewhere in the event, and a piece that is the word content
        ([b'{"content":"m"}', b'{"content":"m"}', b'{"content":"content"}', b'{"content":"m"}'], "mmcontentm"),
        # not text: a later piece of another type is folded by the rules, never added as text
        ([b'{"content":"a"}', b'{"content":"b"}', b'{"content":null}', b'{"content":"c"}'], "abc"),
    ],
)
def test_the_bytes_shortcut_folds_exactly_what_the_chunks_say(middles: list[bytes], content: str) -> None:
    role = _HEAD + b'{"role":"assistant","content":""}' + _TAIL
    finish = _HEAD.replace(b'"delta":', b'"delta":{},"finish_reason":"stop"}]}')
    events = [role, *(_HEAD + m + _TAIL for m in middles), finish]
    by_bytes, by_dicts = _raw_fold(events)
    assert by_bytes == by_dicts
    assert by_bytes["choices"][0]["message"]["content"] == content  # type: ignore[index]


def test_the_bytes_shortcut_is_learned_for_the_choice_it_saw() -> None:
    """Two choices interleaved: each event's bytes name its index, so a piece never lands in the other choice."""
    head = b'{"id":"c4","choices":[{"index":%d,"delta":{"content":"%s"},"finish_reason":null}]}'
    events = [head % (i % 2, f"p{i}".encode()) for i in range(8)]
    by_bytes, by_dicts = _raw_fold(events)
    assert by_bytes == by_dicts
    assert [c["message"]["content"] for c in by_bytes["choices"]] == ["p0p2p4p6", "p1p3p5p7"]  # type: ignore[index]


def _by_lines(data: bytes) -> list[bytes]:
    return [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")]


@pytest.mark.parametrize(
    "data",
    [
        b'data: {"id":"a"}\n\ndata: {"id":"b", "x": "data: y"}\n\ndata: [DONE]\n\n',
        b'data: {"id":"a"}\n\n',
    ],
)
def test_a_read_of_whole_events_is_split_in_one_go(data: bytes) -> None:
    assert _whole_events(data) == _by_lines(data)


@pytest.mark.parametrize("data", [b'data:  {"id":"a"}\n\n', b'data: {"id":"a"} \n\n', b'data: {"id":"a"}\t\n\ndata: {"id":"b"}\r\n\n'])
def test_space_around_an_events_json_stays_in_its_data(data: bytes) -> None:
    """JSON reads it as space: the events say what the line by line path reads."""
    whole = _whole_events(data)
    assert whole is not None and [orjson.loads(d) for d in whole] == [orjson.loads(d) for d in _by_lines(data)]


@pytest.mark.parametrize(
    "data",
    [
        b'data: {"id":"a"}\n\ndata: {"id":"b"}',  # the last event cut
        b'data: {"id":"a"}\n\n: keep-alive\n\n',  # a comment
        b'event: chunk\ndata: {"id":"a"}\n\n',  # another field
        b'data: {"id":"a"}\r\n\r\n',
        b'data: {"id":"a"}\n\ndata:{"id":"b"}\n\n',  # no space after the colon
        b'data: {"id":"a"}\ndata: {"id":"b"}\n\n',  # one event of two data lines
        b"",
    ],
)
def test_anything_but_whole_events_is_left_to_the_line_by_line_path(data: bytes) -> None:
    assert _whole_events(data) is None


_CONTENT = b'{"id":"c5","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}'
_FINISH = b'{"id":"c5","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
_USAGE = b'{"id":"c5","choices":[],"usage":{"total_tokens":3}}'


def test_what_the_gateway_needs_of_events_is_found_parsing_only_the_events_that_may_say_it() -> None:
    """The event that is not JSON is never parsed: only the finishing one and the usage one are."""
    events = Events([_CONTENT, b"not json", _FINISH, _USAGE], "up")
    assert events.finishes() and events.usage() == {"total_tokens": 3}
    assert not Events([_CONTENT, b"not json", _USAGE], "up").finishes()
    assert Events([_CONTENT, b"not json"], "up").usage() is None
    # "finish_reason" with space around it, or a value other than null, is parsed to be sure
    spaced = Events([b'{"choices": [{"index": 0, "delta": {}, "finish_reason" : "length"}]}'], "up")
    assert spaced.finishes()
    assert not Events([b'{"choices": [{"index": 0, "delta": {"content": "finish_reason"}, "finish_reason": null}]}'], "up").finishes()


def test_a_stream_kept_as_its_events_survives_the_persistent_tiers_envelope() -> None:
    raw = Events([_CONTENT, _FINISH, _USAGE], "up").raw
    stored = CachedAnswer.of_events(raw, {"total_tokens": 3}, "up", "up/m", 123.0)
    assert stored.is_events and not CachedAnswer.of({"id": "x", "choices": []}, "up", None, 1.0).is_events
    back = CachedAnswer.decode(stored.encode())
    assert back is not None and back.is_events and back.usage == {"total_tokens": 3}
    assert (back.backend, back.deployment, back.expires_at) == ("up", "up/m", 123.0)
    assert list(Events.of_raw(back.payload, "up")) == [orjson.loads(d) for d in (_CONTENT, _FINISH, _USAGE)]
    # an event that is not JSON spoils the envelope: read back as no entry
    spoiled = CachedAnswer.of_events(Events([_CONTENT, b"not json"], "up").raw, None, "up", None, 1.0)
    assert CachedAnswer.decode(spoiled.encode()) is None
    # kept compressed (the events repeat themselves), and an envelope stored uncompressed still reads
    many = CachedAnswer.of_events(Events([_CONTENT] * 40 + [_FINISH, _USAGE], "up").raw, None, "up", None, 1.0)
    assert len(many.encode()) * 5 < len(many.payload)
    plain = zlib.decompress(many.encode())
    assert plain.startswith(b"{") and CachedAnswer.decode(plain) == CachedAnswer.decode(many.encode()) == many
    assert CachedAnswer.decode(b"\x78 not zlib") is None
