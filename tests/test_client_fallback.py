"""``admiral_client`` (client/): agents keep working while the gateway is down and return to it.

The gateway is the real ``admiral-optimizer serve`` (stopped mid-run, started again on its port,
frozen with SIGSTOP); the fallback is the fake upstream. The client package is not part of the
gateway's install: these tests import it from ``client/`` in the repository.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))

import admiral_client
from admiral_client import Fallback, Outage, load_fallbacks
from admiral_client._routing import httpx as sdk_httpx

from tests.fake_upstream import FakeUpstream
from tests.hostile import wait_for
from tests.serve import ServeProcess
from tests.support import free_port

KEY = "sk-agent-client-0001"
LIMITED_KEY = "sk-agent-limited-0001"
PROVIDER_KEY = "sk-provider-direct-0001"
HI = [{"role": "user", "content": "hi"}]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gateway_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"""
keys:
  - {{key: {KEY}, agent: client}}
  - {{key: {LIMITED_KEY}, agent: limited, rpm: 1}}
providers: {{demo: {{kind: demo}}}}
models: {{fast: [demo/echo]}}
cache: {{enabled: false}}
database: {{url: "sqlite+aiosqlite:///{tmp_path}/gateway.db"}}
"""
    )
    return path


@pytest.fixture
def gateway(gateway_config: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(gateway_config)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def fallbacks(up: FakeUpstream) -> list[dict[str, Any]]:
    return [{"base_url": up.base_url, "api_key": PROVIDER_KEY, "models": {"fast": "fake-model"}}]


def restart(gateway: ServeProcess, config: Path) -> ServeProcess:
    """The gateway started again on the port the clients know."""
    again = ServeProcess(config, port=gateway.port)
    again.wait_ready()
    return again


def who_answered(response: Any) -> str:
    return str(response.headers.get("x-admiral-fallback") or "gateway:" + response.headers["x-admiral-backend"])


# -- the real gateway, stopped and started ------------------------------------------------------


def test_gateway_up_then_stopped_then_back(gateway: ServeProcess, gateway_config: Path, up: FakeUpstream) -> None:
    up.reset()
    outage = Outage(base_s=0.2, max_s=0.5)
    client = admiral_client.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, fallbacks=fallbacks(up), outage=outage, max_retries=0)
    chat = client.chat.completions

    # up: the gateway answers, the provider is not called
    r = chat.with_raw_response.create(model="fast", messages=HI)
    assert who_answered(r) == "gateway:demo" and r.parse().choices[0].message.content
    assert up.calls == 0

    # stopped: the same calls reach the provider directly, under its own model id and key
    gateway.stop()
    r = chat.with_raw_response.create(model="fast", messages=HI)
    assert who_answered(r) == "127.0.0.1"
    assert r.parse().choices[0].message.content == "echo: hi"
    sent = up.chat_requests[-1]
    assert sent.body["model"] == "fake-model" and sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert outage.failures >= 1
    stream = chat.create(model="fast", messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hi"
    assert up.calls == 2

    # back: once the short down time is over the gateway is tried again and takes the calls back
    gateway = restart(gateway, gateway_config)
    try:
        wait_for(lambda: who_answered(chat.with_raw_response.create(model="fast", messages=HI)).startswith("gateway:"), timeout=20, what="the gateway back")
        assert outage.failures == 0
        calls = up.calls
        stream = chat.create(model="fast", messages=HI, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert chat.create(model="fast", messages=HI).choices[0].message.content
        assert up.calls == calls
    finally:
        gateway.stop()


def test_async_client_gateway_up_then_stopped_then_back(gateway: ServeProcess, gateway_config: Path, up: FakeUpstream) -> None:
    up.reset()
    outage = Outage(base_s=0.2, max_s=0.5)

    async def ask(client: admiral_client.AsyncOpenAI) -> str:
        r = await client.chat.completions.with_raw_response.create(model="fast", messages=HI)
        return who_answered(r)

    async def streamed(client: admiral_client.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(model="fast", messages=HI, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> None:
        nonlocal gateway
        client = admiral_client.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, fallbacks=fallbacks(up), outage=outage, max_retries=0)
        assert await ask(client) == "gateway:demo"
        assert up.calls == 0
        await asyncio.to_thread(gateway.stop)
        assert await ask(client) == "127.0.0.1"
        assert await streamed(client) == "echo: hi"
        assert up.calls == 2
        gateway = await asyncio.to_thread(restart, gateway, gateway_config)
        deadline = time.monotonic() + 20
        while await ask(client) != "gateway:demo":
            assert time.monotonic() < deadline, "the gateway did not take the calls back"
            await asyncio.sleep(0.05)
        calls = up.calls
        assert await streamed(client)
        assert up.calls == calls
        await client.close()

    try:
        asyncio.run(run())
    finally:
        gateway.stop()


def test_a_frozen_gateway_is_left_after_the_first_byte_timeout(gateway: ServeProcess, up: FakeUpstream) -> None:
    # SIGSTOP: the kernel still accepts connections, nothing answers; a second later the call goes on
    up.reset()
    client = admiral_client.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=KEY, fallbacks=fallbacks(up), first_byte_timeout=1.0, outage=Outage(0.2, 0.5), max_retries=0
    )
    assert who_answered(client.chat.completions.with_raw_response.create(model="fast", messages=HI)) == "gateway:demo"
    gateway.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert who_answered(client.chat.completions.with_raw_response.create(model="fast", messages=HI)) == "127.0.0.1"
        assert 0.9 < time.monotonic() - started < 10
    finally:
        gateway.proc.send_signal(signal.SIGCONT)
    wait_for(
        lambda: who_answered(client.chat.completions.with_raw_response.create(model="fast", messages=HI)) == "gateway:demo", timeout=20, what="the gateway back"
    )


def test_an_answer_from_the_gateway_is_never_a_reason_to_fall_back(gateway: ServeProcess, up: FakeUpstream) -> None:
    up.reset()
    outage = Outage()
    common = {"base_url": f"{gateway.url}/v1", "fallbacks": fallbacks(up), "outage": outage, "max_retries": 0}
    with pytest.raises(openai.AuthenticationError) as refused:
        admiral_client.OpenAI(api_key="sk-wrong-key-000000", **common).chat.completions.create(model="fast", messages=HI)
    assert refused.value.response.headers["x-request-id"]  # how the client tells the gateway's answers from a proxy's
    client = admiral_client.OpenAI(api_key=KEY, **common)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fast", messages=[])
    limited = admiral_client.OpenAI(api_key=LIMITED_KEY, **common)
    limited.chat.completions.create(model="fast", messages=HI)
    with pytest.raises(openai.RateLimitError):  # a 429 is the gateway's decision: no provider call behind its back
        limited.chat.completions.create(model="fast", messages=HI)
    assert up.calls == 0 and outage.failures == 0


def test_down_gateway_and_no_fallback_for_the_model_is_a_connection_error(up: FakeUpstream) -> None:
    up.reset()
    client = admiral_client.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=KEY, fallbacks=fallbacks(up), max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="code", messages=HI)  # only "fast" is mapped
    assert up.calls == 0


def test_fallbacks_are_tried_in_order(up: FakeUpstream) -> None:
    up.reset()
    dead = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "k-dead", "models": {"fast": "x"}, "name": "dead"}
    client = admiral_client.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=KEY, fallbacks=[dead, *fallbacks(up)], max_retries=0)
    assert who_answered(client.chat.completions.with_raw_response.create(model="fast", messages=HI)) == "127.0.0.1"
    embeddings = client.embeddings.with_raw_response.create(model="fast", input="hello")
    assert who_answered(embeddings) == "127.0.0.1" and up.embedding_requests[-1].body["model"] == "fake-model"


# -- the routing rules, with the SDK's own mock transport -----------------------------------------


class Scripted:
    """The gateway (``gw``) refusing connections or answering, a provider (``prov``) answering.

    ``gateway_answer``: a status and headers the gateway (or a proxy in front of it) answers with.
    """

    def __init__(self) -> None:
        self.gateway_up = False
        self.gateway_answer: tuple[int, dict[str, str]] | None = None
        self.gateway_tries = 0
        self.provider_models: list[str] = []

    def __call__(self, request: Any) -> Any:
        if request.url.host == "gw":
            self.gateway_tries += 1
            if self.gateway_answer is not None:
                status, headers = self.gateway_answer
                return sdk_httpx.Response(status, headers=headers, text="<html>502 Bad Gateway</html>")
            if not self.gateway_up:
                raise sdk_httpx.ConnectError("refused", request=request)
            return sdk_httpx.Response(200, json=_completion("from gateway"))
        import json

        self.provider_models.append(json.loads(request.content)["model"])
        return sdk_httpx.Response(200, json=_completion("from provider"))


def _completion(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def test_the_gateway_is_skipped_for_a_growing_time_then_tried_again() -> None:
    clock = ManualClock()
    script = Scripted()
    outage = Outage(base_s=1.0, max_s=4.0, clock=clock)
    client = admiral_client.OpenAI(
        base_url="http://gw/v1",
        api_key=KEY,
        fallbacks=[Fallback("http://prov/v1", "pk", {"fast": "p-fast"})],
        outage=outage,
        transport=sdk_httpx.MockTransport(script),
        max_retries=0,
    )

    def ask() -> str:
        return str(client.chat.completions.create(model="fast", messages=HI).choices[0].message.content)

    assert ask() == "from provider" and script.gateway_tries == 1  # tried, refused, fell back
    assert ask() == "from provider" and script.gateway_tries == 1  # skipped for 1 s
    clock.now += 1.0
    assert ask() == "from provider" and script.gateway_tries == 2  # tried again, still down: 2 s now
    clock.now += 1.5
    assert ask() == "from provider" and script.gateway_tries == 2
    clock.now += 0.5
    assert ask() == "from provider" and script.gateway_tries == 3  # 4 s now, the cap
    clock.now += 4.0
    assert ask() == "from provider" and script.gateway_tries == 4  # capped at 4 s, not 8
    script.gateway_up = True
    clock.now += 4.0
    assert ask() == "from gateway" and outage.failures == 0
    assert script.provider_models == ["p-fast"] * 6


def test_a_skipped_gateway_is_still_tried_for_a_model_no_fallback_takes() -> None:
    clock = ManualClock()
    script = Scripted()
    client = admiral_client.OpenAI(
        base_url="http://gw/v1",
        api_key=KEY,
        fallbacks=[Fallback("http://prov/v1", "pk", {"fast": "p-fast"})],
        outage=Outage(clock=clock),
        transport=sdk_httpx.MockTransport(script),
        max_retries=0,
    )
    client.chat.completions.create(model="fast", messages=HI)
    script.gateway_up = True
    assert client.chat.completions.create(model="code", messages=HI).choices[0].message.content == "from gateway"


def test_a_proxys_502_for_an_absent_gateway_falls_back_the_gateways_own_does_not() -> None:
    # nginx or a cloud load balancer in front answers 502/503/504 when no gateway replica is up;
    # the gateway's own answers always carry x-request-id, a proxy's do not
    script = Scripted()
    outage = Outage(clock=ManualClock())
    client = admiral_client.OpenAI(
        base_url="http://gw/v1",
        api_key=KEY,
        fallbacks=[Fallback("http://prov/v1", "pk", {"fast": "p-fast"})],
        outage=outage,
        transport=sdk_httpx.MockTransport(script),
        max_retries=0,
    )
    for status in (502, 503, 504):
        script.gateway_answer = (status, {})
        outage.answered("gw")  # a fresh start each time
        assert client.chat.completions.create(model="fast", messages=HI).choices[0].message.content == "from provider"
        assert outage.failures == 1
    with pytest.raises(openai.InternalServerError) as proxied:  # nobody takes "code": the proxy's answer is the answer
        client.chat.completions.create(model="code", messages=HI)
    assert proxied.value.status_code == 504
    outage.answered("gw")
    script.gateway_answer = (502, {"x-request-id": "abc123"})  # the gateway's own 502: a provider failed
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fast", messages=HI)
    assert outage.failures == 0 and script.provider_models == ["p-fast"] * 3


def test_with_options_keeps_the_fallbacks() -> None:
    script = Scripted()
    client = admiral_client.OpenAI(
        base_url="http://gw/v1", api_key=KEY, fallbacks=[Fallback("http://prov/v1", "pk")], transport=sdk_httpx.MockTransport(script), max_retries=0
    )
    other = client.with_options(timeout=5)
    assert other.admiral_route is client.admiral_route
    assert other.chat.completions.create(model="fast", messages=HI).choices[0].message.content == "from provider"
    assert script.provider_models == ["fast"]  # no models map: the name goes as it is
    with pytest.raises(TypeError, match="transport="):
        admiral_client.OpenAI(api_key=KEY, http_client=openai.DefaultHttpxClient())


# -- configuration --------------------------------------------------------------------------------


def test_fallbacks_from_yaml_with_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fallbacks.yaml"
    path.write_text(
        """
fallbacks:
  - base_url: https://api.groq.com/openai/v1
    api_key: ${GROQ_API_KEY}
    models: {fast: llama-3.1-8b-instant}
  - {base_url: "http://127.0.0.1:11434/v1", api_key: ollama, name: local}
"""
    )
    loaded = load_fallbacks(path, env={"GROQ_API_KEY": "gsk-123"})
    assert loaded == [
        Fallback("https://api.groq.com/openai/v1", "gsk-123", {"fast": "llama-3.1-8b-instant"}, "api.groq.com"),
        Fallback("http://127.0.0.1:11434/v1", "ollama", None, "local"),
    ]
    assert "gsk-123" not in repr(loaded)
    with pytest.raises(ValueError, match="GROQ_API_KEY"):
        load_fallbacks(path, env={})
    monkeypatch.setenv("ADMIRAL_FALLBACKS", str(path))
    monkeypatch.setenv("GROQ_API_KEY", "gsk-from-env")
    client = admiral_client.OpenAI(api_key=KEY)
    assert [f.api_key for f in client.admiral_route.fallbacks] == ["gsk-from-env", "ollama"]
    assert str(client.base_url) == "http://127.0.0.1:8000/v1/"


def test_fallbacks_from_json_and_mistakes_said(tmp_path: Path) -> None:
    path = tmp_path / "fallbacks.json"
    path.write_text('{"fallbacks": [{"base_url": "http://p/v1", "api_key": "k", "models": {"fast": "m"}}]}')
    assert load_fallbacks(path) == [Fallback("http://p/v1", "k", {"fast": "m"})]
    with pytest.raises(ValueError, match="unknown fallback keys: model"):
        Fallback.of({"base_url": "http://p/v1", "api_key": "k", "model": {}})
    with pytest.raises(ValueError, match="base_url"):
        Fallback.of({"api_key": "k"})
    with pytest.raises(ValueError, match="http"):
        Fallback("p/v1", "k")


def test_the_package_depends_only_on_openai(tmp_path: Path) -> None:
    # built from a copy: setuptools leaves build/ and *.egg-info/ beside the sources it builds
    source = shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("admiral_optimizer_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["openai>=1.40"]
    assert "admiral_client/__init__.py" in names and not any(n.startswith("app/") for n in names)


def test_httpx_is_the_sdks_own() -> None:
    # the transports must be built from the httpx the installed SDK uses (httpx2 for openai 3)
    assert sdk_httpx.Client in openai.DefaultHttpxClient.__mro__
