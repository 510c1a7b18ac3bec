"""A gateway whose backend is the in-process vLLM engine serves like any other backend.

One gateway for the module (loading the engine takes about 30 s on CPU): the OpenAI SDK reads its
answers, the cache and dedupe layers spare the engine, ``/metrics`` and ``/health/ready`` report
it, a client that leaves aborts its engine request, and bad sampling values are 400s.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.cli import main
from app.providers.vllm_engine import VLLMEngineProvider
from tests.hostile import assert_openai_error, wait_for
from tests.support import GatewayServer, gateway
from tests.vllm_support import ENGINE, MAX_MODEL_LEN

KEY = "sk-agent-local-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: long enough that a request is still generating while the test looks at it
LONG = {"max_tokens": 400, "ignore_eos": True}


def config(model_dir: Path | str) -> dict[str, Any]:
    return {
        "keys": [{"key": KEY, "agent": "local-agent"}],
        "providers": {"local": {"kind": "vllm", "model": str(model_dir), "engine": ENGINE}},
        "models": {"tiny": ["local/tiny"]},
        "routing": {"default": "tiny"},
        "retry": {"attempts": 1},
    }


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class LoadedGateway:
    """The module's gateway, and what it answered while its engine was still loading."""

    server: GatewayServer
    ready_while_loading: httpx.Response
    chat_while_loading: httpx.Response

    @property
    def provider(self) -> VLLMEngineProvider:
        provider = self.server.services.providers["local"]
        assert isinstance(provider, VLLMEngineProvider)
        return provider

    def running(self) -> int:
        """Requests alive in the engine, read on the gateway's own loop."""

        async def count() -> int:
            return self.provider.running_requests()

        return int(self.server.call(count()))

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.server.base_url}/chat/completions", headers=AUTH, json=body, timeout=120)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of ``/metrics`` as Prometheus reads it, summed over the series matching ``labels``."""
        text = httpx.get(f"{self.server.url}/metrics").text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def gw(tiny_model: Path) -> Iterator[LoadedGateway]:
    with gateway(config(tiny_model)) as server:
        # the engine loads in the background for seconds: these answers come before it is up
        ready_while_loading = httpx.get(f"{server.url}/health/ready")
        chat_while_loading = httpx.post(f"{server.base_url}/chat/completions", headers=AUTH, json=chat("too early"))
        loaded = LoadedGateway(server, ready_while_loading, chat_while_loading)
        server.call(loaded.provider.wait_ready(), timeout=600)
        yield loaded
        wait_for(lambda: loaded.running() == 0, what="no request left in the engine")


@pytest.fixture
def client(gw: LoadedGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.server.base_url, api_key=KEY, max_retries=0)


def prompt_tokens(model_dir: Path, messages: list[dict[str, str]]) -> int:
    """The prompt's length as the model's own tokenizer and chat template count it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.vllm
def test_not_ready_until_the_engine_has_loaded(gw: LoadedGateway) -> None:
    early = gw.ready_while_loading
    assert early.status_code == 503
    assert early.json()["checks"]["backends"] == {"ok": False, "ready": []}
    # skipped uncalled while loading: the client is told when to come back
    err = assert_openai_error(gw.chat_while_loading, 503, contains="still loading")
    assert err["code"] == "backends_unavailable"
    assert gw.chat_while_loading.headers["retry-after"] == "5"

    ready = httpx.get(f"{gw.server.url}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["backends"]["ready"] == ["local"]


@pytest.mark.vllm
def test_completion_through_the_openai_sdk(gw: LoadedGateway, client: openai.OpenAI, tiny_model: Path) -> None:
    messages: Any = [{"role": "user", "content": "Report on the fleet, plainly."}]
    tokens_before = gw.metric("admiral_tokens_total", backend="local")
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=12, extra_body={"ignore_eos": True})
    assert raw.headers["x-admiral-backend"] == "local"
    assert raw.headers["x-admiral-route"] == "tiny"
    assert raw.headers["x-admiral-cache"] == "miss"
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.model == "tiny"
    [choice] = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_tokens(tiny_model, messages)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    # the gateway counts the tokens the engine reported
    assert gw.metric("admiral_tokens_total", backend="local") - tokens_before == reply.usage.total_tokens


@pytest.mark.vllm
def test_stream_through_the_openai_sdk(gw: LoadedGateway, client: openai.OpenAI, tiny_model: Path) -> None:
    messages: Any = [{"role": "user", "content": "Stream a report on the fleet."}]
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    *choice_chunks, last = chunks
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert choice_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == prompt_tokens(tiny_model, messages)
    assert last.usage.completion_tokens == 16
    assert last.usage.total_tokens == last.usage.prompt_tokens + 16


@pytest.mark.vllm
def test_repeated_request_is_a_cache_hit(gw: LoadedGateway) -> None:
    body = chat("Cache this report.", max_tokens=8)
    first = gw.post(body)
    assert first.status_code == 200 and first.headers["x-admiral-cache"] == "miss"
    again = gw.post(body)
    assert again.status_code == 200 and again.headers["x-admiral-cache"] == "hit"
    # the same completion (its id is new for every generation), not a second one
    assert again.json() == first.json()
    assert gw.metric("admiral_requests_total", backend="local", cache="hit", status="200") >= 1


@pytest.mark.vllm
def test_identical_concurrent_requests_share_one_generation(gw: LoadedGateway) -> None:
    # sampled at temperature 1 over hundreds of tokens: two generations would differ
    body = chat("Everyone asks for this report at once.", **LONG)
    coalesced_before = gw.metric("admiral_dedupe_coalesced_total")
    leader_lines: list[str] = []
    with httpx.stream("POST", f"{gw.server.base_url}/chat/completions", headers=AUTH, json={**body, "stream": True}, timeout=120) as leader:
        assert leader.status_code == 200
        lines = leader.iter_lines()
        leader_lines.append(next(line for line in lines if line.startswith("data:")))
        # the leader is generating now: identical requests join it
        followers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: followers.append(gw.post(body))) for _ in range(3)]
        for t in threads:
            t.start()
        leader_lines += [line for line in lines if line.startswith("data:")]
        for t in threads:
            t.join()
    assert leader_lines[-1] == "data: [DONE]"
    text = "".join(c["delta"].get("content") or "" for line in leader_lines[:-1] for c in json.loads(line[5:])["choices"])
    assert len(followers) == 3
    for r in followers:
        assert r.status_code == 200
        assert r.headers["x-admiral-dedupe"] == "follower"
        assert r.json()["choices"][0]["message"]["content"] == text
    assert gw.metric("admiral_dedupe_coalesced_total") - coalesced_before == 3


@pytest.mark.vllm
def test_metrics_show_the_engine_backend(gw: LoadedGateway) -> None:
    assert gw.post(chat("Count me.", max_tokens=4)).status_code == 200
    assert gw.post(chat("Count me too.", max_tokens=4, stream=True)).status_code == 200
    assert gw.metric("admiral_requests_total", agent="local-agent", model="tiny", backend="local", status="200") >= 2
    assert gw.metric("admiral_upstream_duration_seconds_count", backend="local") >= 2
    assert gw.metric("admiral_time_to_first_token_seconds_count", backend="local") >= 1
    assert gw.metric("admiral_tokens_total", backend="local", direction="completion") >= 8
    assert gw.metric("admiral_backend_up", backend="local") == 1
    assert gw.metric("admiral_circuit_state", backend="local") == 0


@pytest.mark.vllm
def test_client_leaving_a_stream_aborts_its_engine_request(gw: LoadedGateway) -> None:
    with httpx.stream("POST", f"{gw.server.base_url}/chat/completions", headers=AUTH, json=chat("Leave midway.", stream=True, **LONG), timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
        assert gw.running() == 1
    # the connection is closed here, with hundreds of tokens still to come
    wait_for(lambda: gw.running() == 0, what="the engine request to be aborted")
    wait_for(lambda: len(gw.server.services.inflight) == 0, what="no shared call left")
    wait_for(lambda: gw.metric("admiral_requests_total", backend="local", status="499") >= 1, what="the request counted as 499")


@pytest.mark.vllm
def test_client_leaving_a_plain_request_aborts_its_engine_request(gw: LoadedGateway) -> None:
    payload = json.dumps(chat("Leave before the answer.", **LONG)).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.server.port)) as sock:
        sock.sendall(head.encode() + payload)
        wait_for(lambda: gw.running() == 1, timeout=30, what="the request to reach the engine")
    wait_for(lambda: gw.running() == 0, what="the engine request to be aborted")


@pytest.mark.vllm
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        # refused by the gateway's request schema
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        # refused by the provider or by vLLM's own checks
        ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"stop_token_ids": "eos"}, "stop_token_ids"),
    ],
)
def test_bad_sampling_values_are_400s(gw: LoadedGateway, extra: dict[str, Any], param: str, stream: bool) -> None:
    r = gw.post(chat("Sample badly.", stream=stream, **extra))
    assert_openai_error(r, 400, param=param)
    assert gw.running() == 0
    assert gw.metric("admiral_requests_total", status="500") == 0


def test_serve_refuses_several_workers_with_an_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config("/models/tiny")))
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--workers 2" in err and "'local'" in err and "one worker" in err


@pytest.mark.vllm
def test_requests_fail_over_while_the_engine_cannot_answer(tmp_path: Path) -> None:
    settings = config(tmp_path / "no-such-model")
    settings["providers"]["demo"] = {"kind": "demo"}
    settings["models"]["tiny"] = ["local/tiny", "demo/echo"]
    with gateway(settings) as server:
        # still loading or failed to load (the directory is missing): either way the next deployment answers
        r = httpx.post(f"{server.base_url}/chat/completions", headers=AUTH, json=chat("Anyone there?"))
        assert r.status_code == 200
        assert r.headers["x-admiral-backend"] == "demo"
