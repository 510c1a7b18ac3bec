"""Config reload: keys, models, limits, cache and providers change without a restart; streams in flight finish.

In-process tests run the app behind uvicorn (tests/support.py) with its config in a real file and
call the reloader the way SIGHUP does; process tests send SIGHUP to ``admiral-optimizer serve``
(one worker and several) and run ``admiral-optimizer reload``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from app.config import load_settings
from app.providers.openai_compat import OpenAICompatibleProvider
from tests.fake_upstream import FakeUpstream
from tests.serve import cli_command, serve
from tests.support import GatewayServer

KEY_OLD = "sk-reload-old-0123456789"
KEY_NEW = "sk-reload-new-0123456789"
ADMIN = "sk-reload-admin-0123456789"
HELLO = [{"role": "user", "content": "hello"}]


def write_config(
    path: Path,
    up: FakeUpstream,
    *,
    keys: tuple[str, ...] = (KEY_OLD,),
    extra_models: str = "",
    rpm: int = 100000,
    cache: bool = True,
    up2: FakeUpstream | None = None,
) -> Path:
    key_lines = "\n".join(f"  - {{key: {k}, agent: agent-{i}, rpm: {rpm}}}" for i, k in enumerate(keys))
    second = f'\n  up2: {{kind: openai, base_url: "{up2.base_url}", api_key: sk-provider2, timeout_s: 10}}' if up2 is not None else ""
    second_model = "\n  other: [up2/other-model]" if up2 is not None else ""
    path.write_text(
        f"""
keys:
{key_lines}
admin_key: {ADMIN}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider, timeout_s: 10}}{second}
models:
  fast: [up/fake-model]{second_model}{extra_models}
routing: {{default: fast}}
retry: {{attempts: 1}}
cache: {{enabled: {str(cache).lower()}}}
database: {{url: "sqlite+aiosqlite:///{path.parent}/admiral.db"}}
"""
    )
    return path


@contextmanager
def gateway_from(path: Path) -> Iterator[GatewayServer]:
    with GatewayServer(load_settings(path)) as gw:
        yield gw


def reload(gw: GatewayServer) -> bool:
    return bool(gw.call(gw.app.state.reloader.reload()))


def ask(gw: GatewayServer, key: str, model: str = "fast", content: str = "hello") -> httpx.Response:
    return httpx.post(
        f"{gw.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": content}]},
        timeout=20,
    )


def admin_config(url: str) -> dict[str, object]:
    response = httpx.get(f"{url}/admin/config", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# -- in process ------------------------------------------------------------------------------


def test_a_stream_in_flight_survives_a_reload_that_removes_its_key(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "dribble:0.1"
    path = write_config(tmp_path / "gateway.yaml", upstream)
    with gateway_from(path) as gw:
        assert admin_config(gw.url)["version"] == 1

        async def run() -> tuple[list[str], bool]:
            client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY_OLD, max_retries=0)
            async with client:
                stream = await client.chat.completions.create(model="fast", messages=HELLO, stream=True)  # type: ignore[arg-type]
                texts: list[str] = []
                reloaded = False
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        texts.append(chunk.choices[0].delta.content)
                    if not reloaded:
                        # the first chunk is here: the key goes away under this stream
                        write_config(path, upstream, keys=(KEY_NEW,))
                        reloaded = await asyncio.to_thread(reload, gw)
                return texts, reloaded

        texts, reloaded = asyncio.run(run())
        assert reloaded
        assert "".join(texts) == "echo: hello"
        assert ask(gw, KEY_OLD).status_code == 401
        assert ask(gw, KEY_NEW).status_code == 200
        status = admin_config(gw.url)
        assert status["version"] == 2 and status["last_reload"]["ok"] is True  # type: ignore[index]


def test_a_bad_config_is_refused_with_its_key_path_and_the_running_one_kept(upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path / "gateway.yaml", upstream)
    with gateway_from(path) as gw:
        before = admin_config(gw.url)
        path.write_text(path.read_text().replace("routing: {default: fast}", "routing: {default: fast, colour: blue}"))
        assert not reload(gw)
        assert any(f"{path}: routing.colour" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
        assert ask(gw, KEY_OLD).status_code == 200
        after = admin_config(gw.url)
        assert after["version"] == before["version"] == 1 and after["digest"] == before["digest"]
        assert after["last_reload"]["ok"] is False and "routing.colour" in after["last_reload"]["error"]  # type: ignore[index]
        path.write_text("providers: [not, a, mapping]\n")
        assert not reload(gw)
        assert ask(gw, KEY_OLD).status_code == 200


def test_models_limits_and_cache_change_on_reload(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", upstream)
    with gateway_from(path) as gw:
        assert ask(gw, KEY_OLD, model="smart").status_code == 404
        assert ask(gw, KEY_OLD, content="twice").headers["x-admiral-cache"] == "miss"
        assert ask(gw, KEY_OLD, content="twice").headers["x-admiral-cache"] == "hit"

        write_config(path, upstream, extra_models="\n  smart: [up/smart-model]", rpm=2, cache=False)
        assert reload(gw)
        assert ask(gw, KEY_OLD, model="smart").status_code == 200
        assert upstream.chat_requests[-1].body["model"] == "smart-model"
        calls = upstream.calls
        assert ask(gw, KEY_OLD, content="twice").headers["x-admiral-cache"] != "hit"  # the cache is off now
        assert upstream.calls == calls + 1
        assert ask(gw, KEY_OLD).status_code == 429  # rpm: 2 now, and two went through since


def test_a_removed_provider_serves_its_stream_to_the_end_then_is_closed(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream2.behaviour = "dribble:0.1"
    path = write_config(tmp_path / "gateway.yaml", upstream, up2=upstream2)
    with gateway_from(path) as gw:
        old = gw.services.providers["up2"]
        assert isinstance(old, OpenAICompatibleProvider)

        async def run() -> list[str]:
            client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY_OLD, max_retries=0)
            async with client:
                stream = await client.chat.completions.create(model="other", messages=HELLO, stream=True)  # type: ignore[arg-type]
                texts: list[str] = []
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        texts.append(chunk.choices[0].delta.content)
                    if len(texts) == 1:
                        write_config(path, upstream)  # up2 and its model go
                        assert await asyncio.to_thread(reload, gw)
                        assert old.ready()  # still serving this stream
                return texts

        assert "".join(asyncio.run(run())) == "echo: hello"
        deadline = time.monotonic() + 10
        while old.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not old.ready()  # closed once its last request ended
        assert "up2" not in gw.services.providers
        assert ask(gw, KEY_OLD, model="other").status_code == 404
        assert gw.services.providers["up"].ready()  # the unchanged provider is the same, open one


# -- the served process ----------------------------------------------------------------------


def test_sighup_and_the_reload_command_change_keys_in_a_served_process(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", upstream)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    with serve(path, env=env) as proc:
        assert (
            httpx.post(f"{proc.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_OLD}"}, json={"model": "fast", "messages": HELLO}).status_code
            == 200
        )
        write_config(path, upstream, keys=(KEY_NEW,))
        proc.proc.send_signal(signal.SIGHUP)
        _until(lambda: admin_config(proc.url)["version"] == 2)
        assert (
            httpx.post(f"{proc.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_OLD}"}, json={"model": "fast", "messages": HELLO}).status_code
            == 401
        )

        write_config(path, upstream, keys=(KEY_OLD, KEY_NEW))
        done = subprocess.run(
            [*cli_command(), "reload", "--config", str(path), "--port", str(proc.port)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "reloaded: version 3" in done.stdout
        for key in (KEY_OLD, KEY_NEW):
            assert (
                httpx.post(f"{proc.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={"model": "fast", "messages": HELLO}).status_code
                == 200
            )

        path.write_text(path.read_text().replace("retry: {attempts: 1}", "retry: {attempts: 0}"))
        refused = subprocess.run(
            [*cli_command(), "reload", "--config", str(path), "--port", str(proc.port)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 2 and "retry.attempts" in refused.stderr
        proc.proc.send_signal(signal.SIGHUP)  # the server refuses it too, and says why in its log
        _until(lambda: "config reload refused" in proc.output())
        assert f"{path}: retry.attempts" in proc.output()
        assert admin_config(proc.url)["version"] == 3
        assert proc.proc.poll() is None


def test_every_worker_reloads(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", upstream)
    with serve(path, workers=2, env={"XDG_RUNTIME_DIR": str(tmp_path)}) as proc:
        _until(lambda: len(_versions(proc.url)) == 2, timeout=30)  # both workers answer
        write_config(path, upstream, keys=(KEY_NEW,))
        proc.proc.send_signal(signal.SIGHUP)
        _until(lambda: set(_versions(proc.url).values()) == {2} and len(_versions(proc.url)) == 2, timeout=30)
        for _ in range(10):  # new connections land on either worker
            with httpx.Client() as client:
                assert (
                    client.post(
                        f"{proc.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_NEW}"}, json={"model": "fast", "messages": HELLO}
                    ).status_code
                    == 200
                )
                assert (
                    client.post(
                        f"{proc.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_OLD}"}, json={"model": "fast", "messages": HELLO}
                    ).status_code
                    == 401
                )
        assert proc.proc.poll() is None


def _versions(url: str, tries: int = 40) -> dict[int, int]:
    """pid -> loaded config version, over ``tries`` fresh connections (each may reach either worker).

    A connection the kernel handed to a worker just as it swapped its config may be reset; that
    poll is skipped (a worker that restarted instead of reloading would show version 1 again, so
    the callers' checks still see it).
    """
    seen: dict[int, int] = {}
    for _ in range(tries):
        try:
            status = admin_config(url)
        except httpx.TransportError:
            continue
        seen[int(status["pid"])] = int(status["version"])  # type: ignore[call-overload]
    return seen


def _until(condition: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")
