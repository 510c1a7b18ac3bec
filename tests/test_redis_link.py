"""The shared Redis connection (app.state.redis_link): replies reach their callers, failures reach every waiting call."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.state.redis_link import RedisLink
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.mark.asyncio
async def test_concurrent_calls_each_get_their_own_reply() -> None:
    link = RedisLink(REDIS_URL, timeout_s=2.0)
    prefix = f"test-link:{secrets.token_hex(4)}:"
    try:
        await asyncio.gather(*(link.call("SET", f"{prefix}{i}", f"v{i}", "PX", 10_000) for i in range(200)))
        values = await asyncio.gather(*(link.call("GET", f"{prefix}{i}") for i in range(200)))
        assert values == [f"v{i}".encode() for i in range(200)]
        # an error reply fails its own call only; the connection goes on
        with pytest.raises(ResponseError):
            await link.call("INCR", f"{prefix}0")
        assert await link.call("GET", f"{prefix}1") == b"v1"
    finally:
        await link.aclose()


@pytest.mark.asyncio
async def test_a_script_unknown_to_redis_is_loaded_and_run() -> None:
    link = RedisLink(REDIS_URL, timeout_s=2.0)
    sha = link.script(f"return {{ARGV[1], '{secrets.token_hex(4)}'}}")  # a source Redis has not seen
    try:
        reply = await link.evalsha(sha, [], ["x"])
        assert reply[0] == b"x"
        assert await link.call("SCRIPT", "EXISTS", sha) == [1]
    finally:
        await link.aclose()


@pytest.mark.asyncio
async def test_a_server_that_stops_answering_fails_every_waiting_call() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):  # answers the handshake's commands with nothing
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    link = RedisLink(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=0.1)
    try:
        with pytest.raises(RedisTimeoutError):
            await link.call("GET", "k")
    finally:
        await link.aclose()
        server.close()


@pytest.mark.asyncio
async def test_a_connection_closed_while_idle_is_replaced_and_a_broken_one_fails_its_calls() -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    link = RedisLink(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=2.0)
    try:
        assert await link.call("PING") == b"PONG"
        await proxy.stop()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await link.call("PING")
        await proxy.start()
        assert await link.call("PING") == b"PONG"  # connected anew
        await proxy.stop()
        await proxy.start()
        assert await link.call("PING") == b"PONG"  # the idle connection the proxy closed is replaced, not used
    finally:
        await link.aclose()
        await proxy.stop()
