"""Embeddings from the in-process vLLM engine run as a pooling model (``engine.runner: pooling``),
on a tiny random-weight BERT built here, through the gateway and the OpenAI SDK."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.cli import main
from app.providers.vllm_engine import VLLMEngineProvider, validate_engine_args
from app.vectors import base64_to_floats
from tests.fake_upstream import FakeUpstream, fake_vector
from tests.support import GatewayServer, gateway

KEY = "sk-agent-embed-local1"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: the tiny model's vector length (its hidden size)
WIDTH = 128
MAX_LEN = 512
ENGINE: dict[str, Any] = {"runner": "pooling", "dtype": "float32", "max_model_len": MAX_LEN, "kv_cache_memory_bytes": 1 << 28, "enforce_eager": True}

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built as a user would: admiral-optimizer tiny-model --embedding DIR
    path = tmp_path_factory.mktemp("tiny-embedding-model")
    assert main(["tiny-model", "--embedding", str(path)]) == 0
    assert (path / "modules.json").is_file() and json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    return path


@pytest.fixture(scope="module")
def gw(embedding_model: Path, up: FakeUpstream) -> Iterator[GatewayServer]:
    cfg = {
        "keys": [{"key": KEY, "agent": "embedder"}],
        "providers": {
            "local": {"kind": "vllm", "model": str(embedding_model), "engine": ENGINE},
            "roomy": {"kind": "openai", "base_url": up.base_url, "api_key": "sk-roomy-secret"},
        },
        # an input longer than the engine's context goes on to a provider with room
        "models": {"vectors": ["local/tiny-embed"], "fallback": ["local/tiny-embed", "roomy/big-embed"]},
        "retry": {"attempts": 1},
    }
    with gateway(cfg) as server:
        provider = server.services.providers["local"]
        assert isinstance(provider, VLLMEngineProvider)
        server.call(provider.wait_ready(), timeout=600)
        yield server


@pytest.fixture
def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


def token_count(model_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


def test_the_runner_is_validated_at_start() -> None:
    validate_engine_args({"runner": "pooling"})
    with pytest.raises(ValueError, match="'runner' must be one of .*pooling.*got 'embed'"):
        validate_engine_args({"runner": "embed"})


def test_sdk_embeddings_from_the_pooling_engine(client: openai.OpenAI, embedding_model: Path) -> None:
    text = "The admiral reviewed the fleet at dawn."
    raw = client.embeddings.with_raw_response.create(model="vectors", input=text)
    answer = raw.parse()
    assert raw.headers["x-admiral-cache"] == "miss" and raw.headers["x-admiral-backend"] == "local"
    vector = answer.data[0].embedding
    assert len(vector) == WIDTH and abs(norm(vector) - 1.0) < 1e-4
    assert answer.model == "tiny-embed"
    assert answer.usage.prompt_tokens == token_count(embedding_model, text)
    # the engine is deterministic: computed again (cache skipped) it is the same vector
    again = client.embeddings.create(model="vectors", input=text, encoding_format="float", extra_headers={"Cache-Control": "no-cache"})
    assert close(again.data[0].embedding, vector)
    hit = client.embeddings.with_raw_response.create(model="vectors", input=text, encoding_format="base64")
    assert hit.headers["x-admiral-cache"] == "hit"
    assert base64_to_floats(hit.parse().data[0].embedding) == vector  # type: ignore[arg-type]


def test_a_batch_with_cached_items_asks_the_engine_for_the_rest(client: openai.OpenAI, gw: GatewayServer) -> None:
    texts = ["Caching identical prompts saves tokens.", "Continuous batching serves many requests.", "Hello! How are you today?"]
    singles = [client.embeddings.create(model="vectors", input=t, extra_headers={"Cache-Control": "no-store"}).data[0].embedding for t in texts]
    assert not close(singles[0], singles[1])
    client.embeddings.create(model="vectors", input=texts[1])
    raw = client.embeddings.with_raw_response.create(model="vectors", input=texts)
    assert raw.headers["x-admiral-cache"] == "partial"
    answer = raw.parse()
    assert all(close(d.embedding, s) for d, s in zip(answer.data, singles, strict=True))
    # usage: the two inputs the engine embedded for this request
    assert 0 < answer.usage.prompt_tokens < sum(len(t.split()) * 4 + 2 for t in texts)


def test_token_arrays_and_matryoshka_dimensions(client: openai.OpenAI) -> None:
    tokens = client.embeddings.create(model="vectors", input=[[5, 6, 7, 8], [9, 10]])
    assert [len(d.embedding) for d in tokens.data] == [WIDTH, WIDTH]
    assert tokens.usage.prompt_tokens == 6
    short = client.embeddings.create(model="vectors", input="Numbers like 0 1 2 3", dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16 and abs(norm(short.data[0].embedding) - 1.0) < 1e-4


def test_what_the_engine_refuses_is_a_400_naming_the_param(gw: GatewayServer) -> None:
    url = f"{gw.base_url}/embeddings"
    too_wide = httpx.post(url, headers=AUTH, json={"model": "vectors", "input": "x", "dimensions": WIDTH * 2}, timeout=60)
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "dimensions"
    too_long = httpx.post(url, headers=AUTH, json={"model": "vectors", "input": [list(range(5, 5 + MAX_LEN + 10))]}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    chat = httpx.post(f"{gw.base_url}/chat/completions", headers=AUTH, json={"model": "vectors", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 400
    assert chat.json()["error"]["param"] == "model" and "embedding model" in chat.json()["error"]["message"]


def test_an_input_too_long_for_the_engine_goes_to_the_next_deployment(client: openai.OpenAI, up: FakeUpstream) -> None:
    up.reset()
    text = "word " * (MAX_LEN + 10)
    raw = client.embeddings.with_raw_response.create(model="fallback", input=[text, "short"], encoding_format="float")
    assert raw.headers["x-admiral-backend"] == "roomy" and raw.parse().model == "big-embed"
    # both from the provider that took the long one: one answer, one model's vectors
    assert [d.embedding for d in raw.parse().data] == [pytest.approx(fake_vector(text), abs=1e-6), pytest.approx(fake_vector("short"), abs=1e-6)]
    assert up.calls == 1
