"""Single-flight primitives on the real Redis: leases with expiry and renewal, chunk streams per flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.state.redis import RedisStateStore
from app.state.redis_channels import ChannelUnavailable, LeaderFailed, LeaderLost, RedisChannels, StreamPublisher, StreamTruncated
from tests.tcp_proxy import free_port

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"



@pytest_asyncio.fixture
async def channels(prefix: str) -> AsyncIterator[RedisChannels]:
    ch = RedisChannels.from_url(REDIS_URL, prefix, poll_s=0.05)
    yield ch
    await ch.aclose()


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in it]


async def lead(channels: RedisChannels, key: str) -> tuple[str, StreamPublisher]:
    """Take ``key``'s lease (5 s) and open its stream: the lease token and the publisher."""
    token = await channels.acquire(key, ttl_s=5)
    assert token is not None
    return token, channels.publisher(key, token)


@pytest.mark.asyncio
async def test_lease_is_exclusive_renewable_and_only_its_holder_releases(channels: RedisChannels) -> None:
    token = await channels.acquire("k", ttl_s=0.2)
    assert token is not None
    assert await channels.acquire("k", ttl_s=0.2) is None
    assert await channels.holder("k") == token

    assert await channels.renew("k", token, ttl_s=0.5) is True
    await asyncio.sleep(0.3)  # past the first ttl: the renewal kept it
    assert await channels.holder("k") == token
    assert await channels.renew("k", "not-the-token", ttl_s=5) is False
    assert await channels.release("k", "not-the-token") is False
    assert await channels.holder("k") == token

    assert await channels.release("k", token) is True
    assert await channels.holder("k") is None
    assert await channels.renew("k", token, ttl_s=5) is False
    assert await channels.acquire("k", ttl_s=1) not in (None, token)


@pytest.mark.asyncio
async def test_lease_expires_unless_kept_alive(channels: RedisChannels) -> None:
    dead = await channels.acquire("dead", ttl_s=0.1)
    alive = await channels.acquire("alive", ttl_s=0.1)
    assert dead and alive
    keeper = asyncio.create_task(channels.keep_alive("alive", alive, ttl_s=0.1))
    await asyncio.sleep(0.3)
    assert await channels.holder("dead") is None
    assert await channels.holder("alive") == alive
    # someone else takes it over after a release: keep_alive notices and returns
    await channels.release("alive", alive)
    assert await channels.acquire("alive", ttl_s=5) is not None
    await asyncio.wait_for(keeper, 1.0)


@pytest.mark.asyncio
async def test_late_joiner_gets_everything_then_live_chunks(channels: RedisChannels, prefix: str) -> None:
    token, pub = await lead(channels, "q")
    await pub.send(b"one")
    await pub.send(b"two")

    early = asyncio.create_task(collect(channels.read("q", token)))
    await asyncio.sleep(0.1)
    await pub.send(b"three")
    late = asyncio.create_task(collect(channels.read("q", token)))  # joins after three chunks
    await asyncio.sleep(0.1)
    await pub.send(b"")
    await pub.send(b"four")
    await pub.end()
    await channels.release("q", token)

    expected = [b"one", b"two", b"three", b"", b"four"]
    assert await asyncio.wait_for(early, 2) == expected
    assert await asyncio.wait_for(late, 2) == expected
    # after the flight, a reader holding its token still gets the whole answer
    assert await collect(channels.read("q", token)) == expected
    with pytest.raises(RuntimeError):
        await pub.send(b"after the end")

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        ttl = await client.pttl(channels.stream_key("q", token))
        assert 0 < ttl <= 60_000  # the finished stream expires by itself
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_reader_waits_for_a_stream_not_yet_written(channels: RedisChannels) -> None:
    token = await channels.acquire("slow", ttl_s=5)
    assert token is not None
    reader = asyncio.create_task(collect(channels.read("slow", token)))
    await asyncio.sleep(0.2)  # several empty polls while the lease is held
    pub = channels.publisher("slow", token)
    await pub.send(b"x")
    await pub.end()
    assert await asyncio.wait_for(reader, 2) == [b"x"]


@pytest.mark.asyncio
async def test_a_new_flight_on_the_same_key_has_its_own_stream(channels: RedisChannels) -> None:
    first, pub = await lead(channels, "k")
    await pub.send(b"old")
    await pub.end()
    await channels.release("k", first)

    second = await channels.acquire("k", ttl_s=5)
    assert second is not None and second != first
    pub2 = channels.publisher("k", second)
    await pub2.send(b"new")
    await pub2.end()
    assert await collect(channels.read("k", second)) == [b"new"]


@pytest.mark.asyncio
async def test_leader_failure_and_death_reach_followers(channels: RedisChannels) -> None:
    token, pub = await lead(channels, "fails")
    await pub.send(b"partial")
    await pub.fail("upstream 502")
    chunks: list[bytes] = []
    with pytest.raises(LeaderFailed, match="upstream 502"):
        async for chunk in channels.read("fails", token):
            chunks.append(chunk)
    assert chunks == [b"partial"]

    dying = await channels.acquire("dies", ttl_s=0.15)
    assert dying is not None
    await channels.publisher("dies", dying).send(b"half")
    with pytest.raises(LeaderLost):
        await asyncio.wait_for(collect(channels.read("dies", dying)), 2)

    silent = await channels.acquire("silent", ttl_s=5)
    assert silent is not None
    with pytest.raises(LeaderLost, match="no chunk"):
        await asyncio.wait_for(collect(channels.read("silent", silent, idle_timeout_s=0.2)), 2)


@pytest.mark.asyncio
async def test_a_trimmed_stream_is_reported_not_silently_shortened(prefix: str) -> None:
    ch = RedisChannels.from_url(REDIS_URL, prefix, poll_s=0.05, maxlen=3)
    try:
        token, pub = await lead(ch, "long")
        for i in range(5):
            await pub.send(str(i).encode())
        with pytest.raises(StreamTruncated):
            await collect(ch.read("long", token))
    finally:
        await ch.aclose()


@pytest.mark.asyncio
async def test_redis_down_is_a_channel_error(prefix: str) -> None:
    ch = RedisChannels.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix)
    try:
        with pytest.raises(ChannelUnavailable):
            await ch.acquire("k", ttl_s=1)
        with pytest.raises(ChannelUnavailable):
            await collect(ch.read("k", "token"))
    finally:
        await ch.aclose()


@pytest.mark.asyncio
async def test_the_state_store_hands_out_channels_on_its_redis(prefix: str) -> None:
    store = RedisStateStore(REDIS_URL, prefix)
    try:
        token = await store.channels.acquire("k", ttl_s=5)
        assert token is not None
        client = aioredis.Redis.from_url(REDIS_URL)
        assert await client.get(prefix + "lock:k") == token.encode()
        await client.aclose()
    finally:
        await store.aclose()
