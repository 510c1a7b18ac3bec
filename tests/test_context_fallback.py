"""Context-window fallback: a prompt too long for one deployment goes to the next that has room.

``small`` stands for a deployment with a short context (its fake answers the context-length 400
for more than ``context_limit`` words), ``big`` for one with room. ``retry.attempts: 3`` with a
failure threshold of 1: a context-length 400 that counted as a failure, or was retried, would show.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest

from app.config import ConfigError
from app.errors import BadRequestError, ContextLengthError, GatewayError, ProviderErrorFields, UpstreamClientError, provider_error_fields
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, ModelRequest, RequestContext
from app.pipeline.failover import FailoverLayer, RetryPolicy
from app.pipeline.latency import LatencyTracker
from app.pipeline.params import context_needed, prompt_tokens
from app.shapes import ChatCompletion
from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, PROVIDER_KEY, metric_sum
from tests.manual_clock import ManualClock
from tests.support import GatewayServer, gateway, make_settings

LONG = "one two three four five six seven eight nine ten eleven twelve"
#: how providers word a prompt too long for the model when they send no code
WORDINGS = {
    "openai": "This model's maximum context length is {limit} tokens. However, your messages resulted in {words} tokens.",
    "vllm": "This model's maximum context length is {limit} tokens. However, you requested {words} tokens in the messages.",
    "groq": "Please reduce the length of the messages or completion.",
    "mistral": "Prompt contains {words} tokens and 0 draft tokens, too large for model with {limit} maximum context length",
    "anthropic-style": "prompt is too long: {words} tokens > {limit} maximum",
    "gemini": "The input token count ({words}) exceeds the maximum number of tokens allowed ({limit}).",
    "tgi": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. Given: {words} `inputs` tokens and 16 `max_new_tokens`",
    "llama.cpp": "the request exceeds the available context size, try increasing it",
    "xai": "This model's maximum prompt length is {limit} but the request contains {words} tokens.",
    "together": "The input ({words} tokens) is longer than the model's context length ({limit} tokens).",
    "ollama": "prompt too long; exceeded max context length by {words} tokens",
    "vllm-engine": "The decoder prompt (length {words}) is longer than the maximum model length of {limit}. Make sure that `max_model_len` is no smaller than the number of text tokens.",
}


@pytest.fixture(scope="module")
def small() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def big() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def fallback_config(small: FakeUpstream, big: FakeUpstream, failure_threshold: int = 1) -> str:
    return f"""
keys: [{{key: {AGENT_KEY}, agent: context}}]
providers:
  small: {{kind: openai, base_url: "{small.base_url}", api_key: {PROVIDER_KEY}}}
  big: {{kind: openai, base_url: "{big.base_url}", api_key: {PROVIDER_KEY}}}
models:
  long: [small/fake-model, big/fake-model]
  windowed:
    deployments: [{{deployment: small/fake-model, context_window: 20}}, big/fake-model]
  tiny: {{deployments: [small/fake-model, big/fake-model], context_window: 8}}
retry: {{attempts: 3, backoff_s: 0}}
circuit_breaker: {{failure_threshold: {failure_threshold}, cooldown_s: 600}}
cache: {{enabled: false}}
dedupe: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def shared_gw(small: FakeUpstream, big: FakeUpstream) -> Iterator[GatewayServer]:
    with gateway(fallback_config(small, big)) as server:
        yield server


@pytest.fixture
def gw(shared_gw: GatewayServer, small: FakeUpstream, big: FakeUpstream) -> GatewayServer:
    small.reset()
    big.reset()
    small.context_limit = 5
    return shared_gw


@pytest.fixture
def sdk(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)


def ask(sdk: openai.OpenAI, model: str, content: str, **extra: Any) -> Any:
    """The raw response (headers, then ``parse()``) to one user message."""
    return sdk.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}], **extra)


def test_a_prompt_too_long_moves_to_the_next_deployment(gw: GatewayServer, sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    raw = ask(sdk, "long", LONG)
    assert raw.headers["x-admiral-backend"] == "big"
    assert raw.parse().choices[0].message.content == "echo: " + LONG
    assert (small.calls, big.calls) == (1, 1)
    assert metric_sum(gw, "admiral_failovers_total", from_backend="small") >= 1
    # no breaker failure: with a threshold of 1 the next short prompt still goes to small
    assert ask(sdk, "long", "short one").headers["x-admiral-backend"] == "small"
    assert metric_sum(gw, "admiral_circuit_state", backend="small") == 0


@pytest.mark.parametrize("provider", sorted(WORDINGS))
def test_each_providers_wording_is_recognised(provider: str, sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    small.context_error = (WORDINGS[provider], None)
    assert ask(sdk, "long", LONG).headers["x-admiral-backend"] == "big"
    assert (small.calls, big.calls) == (1, 1)


def test_streams_fall_back_too(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    with sdk.chat.completions.with_streaming_response.create(model="long", messages=[{"role": "user", "content": LONG}], stream=True) as raw:
        assert raw.headers["x-admiral-backend"] == "big"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "echo: " + LONG
    assert (small.calls, big.calls) == (1, 1)


def test_when_none_has_room_the_client_gets_the_400_with_its_code(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    big.context_limit = 8
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, "long", LONG)
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", "messages")
    assert "small/fake-model" in error["message"] and "big/fake-model" in error["message"] and "maximum context length is 8" in error["message"]
    assert (small.calls, big.calls) == (1, 1)  # three rounds allowed, none repeated: no retry helps a prompt too long


def test_the_400_names_the_field_holding_the_prompt_on_each_endpoint(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    # providers that name no field (Mistral's wording, no code): the endpoint says which it is
    for upstream in (small, big):
        upstream.context_limit, upstream.context_error = 3, (WORDINGS["mistral"], None)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="long", prompt=LONG)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model="long", input=LONG)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, "long", LONG)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "messages"
    # skipped by their windows, uncalled: the same
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="tiny", prompt="y" * 60)
    assert isinstance(info.value.body, dict) and (info.value.body["code"], info.value.body["param"]) == ("context_length_exceeded", "prompt")
    assert (small.calls, big.calls) == (3, 3)


def test_a_refusal_in_mistrals_top_level_shape_is_read(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    small.error_shape = big.error_shape = "top"
    small.context_error = (WORDINGS["mistral"], "3051")
    assert ask(sdk, "long", LONG).headers["x-admiral-backend"] == "big"
    assert (small.calls, big.calls) == (1, 1)
    # any other refusal reaches the client with the provider's words and fields
    small.refuse_params = {"seed"}
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, "long", "short", seed=3)
    error = info.value.body
    assert isinstance(error, dict)
    assert "seed is not supported by this model" in error["message"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", "seed")


def test_provider_error_fields_reads_either_shape() -> None:
    nested = {"error": {"message": "too long", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
    top = {"object": "error", "message": "too large for model with 8192 maximum context length", "type": "invalid_request_error", "param": None, "code": 3051}
    assert provider_error_fields(nested) == ProviderErrorFields("too long", "invalid_request_error", "context_length_exceeded", "messages")
    assert provider_error_fields(top) == ProviderErrorFields("too large for model with 8192 maximum context length", "invalid_request_error", "3051", None)
    assert provider_error_fields({"error": "quota exceeded"}) == ProviderErrorFields("quota exceeded")
    assert provider_error_fields({"error": {"message": ["a"], "code": {"x": 1}, "param": True}}) == ProviderErrorFields("")
    assert provider_error_fields(["not", "an", "object"]) == provider_error_fields({"detail": "Not Found"}) == ProviderErrorFields("")


def test_a_refusal_of_another_kind_still_ends_the_request(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    small.behaviour = "refuse"
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, "long", "short")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "temperature"
    assert (small.calls, big.calls) == (1, 0)


def test_too_long_here_and_down_there_is_not_a_400(gw: GatewayServer, small: FakeUpstream, big: FakeUpstream) -> None:
    big.behaviour = "500"
    # a gateway of its own: big's circuit must not open for the other tests
    with gateway(fallback_config(small, big, failure_threshold=5)) as own, pytest.raises(openai.APIStatusError) as info:
        ask(openai.OpenAI(base_url=own.base_url, api_key=AGENT_KEY, max_retries=0), "long", LONG)
    assert info.value.status_code == 502  # big may well take it once it is back
    message = info.value.body["message"] if isinstance(info.value.body, dict) else ""
    assert "small/fake-model" in message and "maximum context length" in message
    assert small.calls == 1 and big.calls == 3  # big retried each round, small never again


def test_context_window_skips_a_deployment_too_small_without_calling_it(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    small.context_limit = None
    prompt = "x" * 100  # about 26 tokens, the window is 20
    assert ask(sdk, "windowed", prompt).headers["x-admiral-backend"] == "big"
    assert (small.calls, big.calls) == (0, 1)
    assert ask(sdk, "windowed", "hello").headers["x-admiral-backend"] == "small"
    # the answer it allows needs room too
    assert ask(sdk, "windowed", "hello", max_tokens=30).headers["x-admiral-backend"] == "big"
    assert (small.calls, big.calls) == (1, 2)


def test_when_every_window_is_too_small_the_400_names_messages(sdk: openai.OpenAI, small: FakeUpstream, big: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, "tiny", "y" * 60)
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", "messages")
    assert "context window is 8 tokens" in error["message"]
    assert (small.calls, big.calls) == (0, 0)


def test_a_plain_http_client_sees_the_same_400(gw: GatewayServer, small: FakeUpstream, big: FakeUpstream) -> None:
    big.context_limit = 3
    r = httpx.post(
        f"{gw.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {AGENT_KEY}"},
        json={"model": "long", "messages": [{"role": "user", "content": LONG}]},
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_context_window_config_checks() -> None:
    providers = {"p": {"kind": "demo"}}
    s = make_settings({"providers": providers, "models": {"m": {"deployments": [{"deployment": "p/a", "context_window": 10}, "p/b"], "context_window": 99}}})
    assert (s.models["m"].window_of("p/a"), s.models["m"].window_of("p/b")) == (10, 99)
    for entry, says in [
        ({"deployment": "p/a", "context_windows": 5}, "unknown key 'context_windows'"),
        ({"deployment": "p/a", "context_window": 0}, r"deployments\[0\].context_window"),
        ({"context_window": 5}, "an entry is 'provider/model-id'"),
    ]:
        with pytest.raises(ConfigError, match=says):
            make_settings({"providers": providers, "models": {"m": [entry]}})
    with pytest.raises(ConfigError, match="models.m.context_window"):
        make_settings({"providers": providers, "models": {"m": {"deployments": ["p/a"], "context_window": -1}}})


# -- the failover rules on their own (manual clock, scripted next handler) ------------------------

A, B = Deployment("a", "m"), Deployment("b", "m")


class Scripted:
    """Raises the listed error for a deployment, answers for the rest; records the calls."""

    def __init__(self, failures: dict[Deployment, GatewayError]) -> None:
        self.failures = failures
        self.calls: list[Deployment] = []

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        assert ctx.deployment is not None
        self.calls.append(ctx.deployment)
        if ctx.deployment in self.failures:
            raise self.failures[ctx.deployment]
        return Answer(body=cast("ChatCompletion", {"choices": []}))


def layer(handler: Scripted, windows: dict[str, dict[Deployment, int]] | None = None) -> FailoverLayer:
    clock = ManualClock()
    return FailoverLayer(
        handler, RetryPolicy(attempts=3, backoff_s=0), LatencyTracker([A, B]), clock, Metrics(), ["a", "b"], rng=random.Random(1), windows=windows
    )  # type: ignore[arg-type]


def chat(content: str, **extra: object) -> ModelRequest:
    return ModelRequest({"model": "fast", "messages": [{"role": "user", "content": content}], **extra})


@pytest.mark.asyncio
async def test_the_in_process_engines_coded_400_falls_back_too() -> None:
    # what the vLLM engine raises for a prompt that leaves no room in its context
    engine = BadRequestError(
        "the prompt is 600 tokens, which leaves no room in the model's 512-token context", param="messages", code="context_length_exceeded"
    )
    handler = Scripted({A: engine})
    ctx = RequestContext(request_id="t", route="fast", deployments=[A, B])
    await layer(handler)(chat("long"), ctx)
    assert handler.calls == [A, B] and ctx.deployment == B


@pytest.mark.asyncio
async def test_an_engine_400_of_another_kind_is_raised_as_it_is() -> None:
    handler = Scripted({A: BadRequestError("'top_k' must be an integer", param="top_k")})
    with pytest.raises(BadRequestError, match="top_k"):
        await layer(handler)(chat("x"), RequestContext(request_id="t", route="fast", deployments=[A, B]))
    assert handler.calls == [A]


@pytest.mark.asyncio
async def test_the_providers_code_and_param_are_kept_when_none_has_room() -> None:
    refused = UpstreamClientError(
        "a answered 400: Prompt contains 9000 tokens, too large for model with 8192 maximum context length", status=400, backend="a", code="3051", param=None
    )
    handler = Scripted({A: refused})
    windows = {"fast": {B: 100}}
    with pytest.raises(ContextLengthError) as info:
        await layer(handler, windows)(chat("z" * 1000), RequestContext(request_id="t", route="fast", deployments=[A, B]))
    assert handler.calls == [A]  # b skipped: about 251 tokens against its window of 100
    error = info.value.body()["error"]
    assert (info.value.status, error["type"], error["code"], error["param"]) == (400, "invalid_request_error", "3051", "messages")
    assert "b/m: skipped: its context window is 100 tokens, the request needs about 251" in error["message"]


def test_prompt_estimate_counts_text_parts_and_tool_arguments() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "x" * 40}}
    request = chat("")
    request.body["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "a" * 40}, {"type": "image_url", "image_url": {"url": "data:..."}}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    assert prompt_tokens(request) == 20 + 1
    request.body["max_completion_tokens"] = 9
    assert context_needed(request) == 30
