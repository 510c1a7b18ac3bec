"""Legacy text completions (``/v1/completions``) on the in-process vLLM engine, through the gateway
and the OpenAI SDK: prompt strings and token arrays, ``n``, ``echo``, ``logprobs``, plain and streamed.

One gateway for the module (loading the engine takes about 30 s on CPU). Greedy sampling
(``temperature: 0``) makes the random-weight model's answers repeatable, so a stream can be
compared with the plain answer to the same request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.pipeline.streaming import ChunkAssembler
from tests.fake_upstream import FakeUpstream
from tests.hostile import wait_for
from tests.support import GatewayServer, gateway
from tests.vllm_support import ENGINE, MAX_MODEL_LEN, tokenizer

KEY = "sk-agent-local-0002"
NO_CACHE = {"Cache-Control": "no-cache"}
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def gw(tiny_model: Path, up: FakeUpstream) -> Iterator[GatewayServer]:
    config = {
        "keys": [{"key": KEY, "agent": "local-agent"}],
        "providers": {
            "local": {"kind": "vllm", "model": str(tiny_model), "engine": ENGINE},
            "roomy": {"kind": "openai", "base_url": up.base_url, "api_key": "sk-roomy-secret"},
        },
        # a prompt longer than the engine's context goes on to a provider with room
        "models": {"tiny": ["local/tiny"], "fallback": ["local/tiny", "roomy/big"]},
        "retry": {"attempts": 1},
    }
    with gateway(config) as server:
        provider: Any = server.services.providers["local"]
        server.call(provider.wait_ready(), timeout=600)
        yield server

        async def running() -> int:
            return int(provider.running_requests())

        wait_for(lambda: server.call(running()) == 0, what="no request left in the engine")


def folded(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return dict(assembler.result())


@pytest.fixture
def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120)


def test_a_plain_completion(client: openai.OpenAI, tiny_model: Path) -> None:
    prompt = "The fleet sails at dawn and"
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=8, **GREEDY)
    assert raw.headers["x-admiral-backend"] == "local"
    reply = raw.parse()
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text and choice.logprobs is None
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer(tiny_model)(prompt)["input_ids"])
    assert reply.usage.completion_tokens == 8


def test_max_tokens_defaults_to_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Default length, please", **GREEDY)
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_a_stream_says_what_the_plain_answer_says(client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "Stream the harbour report", "max_tokens": 10, **GREEDY}
    plain = client.completions.create(**body, extra_headers=NO_CACHE)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}, extra_headers=NO_CACHE))
    *text_chunks, last = chunks
    assert len(text_chunks) > 1 and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None and last.usage == plain.usage


def test_token_arrays_several_prompts_and_n(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 16
    streamed = list(client.completions.create(model="tiny", prompt=["one prompt", "another prompt"], max_tokens=3, stream=True, **GREEDY))
    assert {c.choices[0].index for c in streamed} == {0, 1}
    plain = client.completions.create(model="tiny", prompt=["one prompt", "another prompt"], max_tokens=3, **GREEDY, extra_headers=NO_CACHE)
    for choice in plain.choices:
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == choice.index) == choice.text


def test_echo_and_logprobs(client: openai.OpenAI, tiny_model: Path) -> None:
    prompt = "Echo this signal"
    prompt_ids = tokenizer(tiny_model)(prompt)["input_ids"]
    reply = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=3, **GREEDY)
    [choice] = reply.choices
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(prompt_ids) + 3
    # the prompt's first token has nothing before it to be scored by
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    # greedy: the chosen token is the likeliest, and at most 2 alternatives besides it are listed
    for token, value, top in list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True))[len(prompt_ids) :]:
        assert top is not None and token in top and 1 <= len(top) <= 3 and value == max(top.values())
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_a_streamed_answer_folds_into_the_plain_one_logprobs_included(gw: GatewayServer, client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "Fold me", "max_tokens": 5, "logprobs": 1, "echo": True, **GREEDY}
    plain = client.completions.create(**body, extra_headers=NO_CACHE).model_dump(exclude_none=True)
    streamed = [c.model_dump(exclude_none=True) for c in client.completions.create(**body, stream=True, extra_headers=NO_CACHE)]
    assert folded(streamed)["choices"] == plain["choices"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "fill me in"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"prompt": "word " * (MAX_MODEL_LEN + 10)}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
    ],
)
def test_what_the_engine_cannot_serve_is_a_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            result = client.completions.create(**{"model": "tiny", "prompt": "x", **extra}, stream=stream)  # type: ignore[call-overload]
            if stream:
                list(result)
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == param, body


#: more tokens than the engine's context holds
TOO_LONG = "word " * (MAX_MODEL_LEN + 10)


def test_a_prompt_too_long_for_the_engine_goes_to_the_next_deployment(client: openai.OpenAI, up: FakeUpstream) -> None:
    up.reset()
    chat = client.chat.completions.with_raw_response.create(model="fallback", messages=[{"role": "user", "content": TOO_LONG}], max_tokens=4)
    assert chat.headers["x-admiral-backend"] == "roomy" and chat.parse().choices[0].message.content == "echo: " + TOO_LONG
    text = client.completions.with_raw_response.create(model="fallback", prompt=TOO_LONG + "plain", max_tokens=4)
    assert text.headers["x-admiral-backend"] == "roomy" and text.parse().choices[0].text == "echo: " + TOO_LONG + "plain"
    with client.completions.with_streaming_response.create(model="fallback", prompt=TOO_LONG + "streamed", max_tokens=4, stream=True) as streamed:
        assert streamed.headers["x-admiral-backend"] == "roomy"
        assert "".join(c.choices[0].text for c in streamed.parse() if c.choices).strip() == "echo: " + TOO_LONG + "streamed"
    assert up.calls == 3
    # the engine alone: its 400 says why, on the field holding the prompt
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            result = client.completions.create(model="tiny", prompt=TOO_LONG, stream=stream)
            if stream:
                list(result)
        body = caught.value.body
        assert isinstance(body, dict) and (body["code"], body["param"]) == ("context_length_exceeded", "prompt"), body
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TOO_LONG}])
    body = caught.value.body
    assert isinstance(body, dict) and (body["code"], body["param"]) == ("context_length_exceeded", "messages"), body
