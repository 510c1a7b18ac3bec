"""The shared Redis connection (app.state.redis_link): replies reach their callers, failures reach every waiting call."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.state.redis_link import RedisLink, _buffered
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


@pytest.mark.asyncio
async def test_the_commands_of_one_event_loop_turn_go_in_one_write() -> None:
    link = RedisLink(REDIS_URL, timeout_s=2.0)
    prefix = f"test-link:{secrets.token_hex(4)}:"
    try:
        assert await link.call("PING") == b"PONG"  # connected
        conn = link._conn
        assert conn is not None and conn._writer is not None
        assert _buffered(conn) is not None  # replies after a read's first come from hiredis's buffer
        transport = conn._writer.transport
        writes: list[bytes] = []
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        # 100 calls made in one turn (each reaches its first await before the next starts)
        values = await asyncio.gather(*(link.call("SET", f"{prefix}{i}", f"v{i}", "PX", 10_000, "GET") for i in range(100)))
        assert values == [None] * 100
        assert len(writes) == 1
        assert writes[0].count(b"\r\nSET\r\n") == 100
        # a later turn's calls go in a write of their own, replies still to their own callers; an
        # error reply among them (read with the others, from the parser's buffer) fails its call only
        first, failing, last = (
            asyncio.ensure_future(link.call(*command)) for command in (("GET", f"{prefix}7"), ("INCR", f"{prefix}7"), ("GET", f"{prefix}8"))
        )
        assert await first == b"v7"
        with pytest.raises(ResponseError):
            await failing
        assert await last == b"v8"
        assert len(writes) == 2
    finally:
        await link.aclose()
