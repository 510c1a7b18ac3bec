"""Single flight across replicas: one upstream call per key for the whole deployment.

Requests on one replica still meet in a local :class:`~app.pipeline.inflight.Flight` first; the
flight's call then goes through Redis (:mod:`app.state.redis_channels`) and runs as one of:

- *leader*: it takes the key's lease, runs the real call while keeping the lease alive, publishes
  a head (backend, deployment, and the body of a plain answer), then each chunk of a stream, then
  the end marker or the error, and releases the lease;
- *follower*: another replica holds the lease; the head and the chunks are read from its stream
  (from the first entry, then live) and handed to this replica's waiters as if the call ran here;
- *alone*: Redis is unavailable; the call runs here, exactly as with
  :class:`~app.pipeline.inflight.LocalInflight`, and the state store goes degraded (it logs the
  outage, sets ``admiral_state_degraded`` and probes until Redis answers; meanwhile flights skip
  Redis altogether).

A leader's :class:`~app.errors.GatewayError` is the answer for everyone: followers raise a
:class:`RelayedError` with its status and body, as local followers share an error (calling
upstream again would repeat the failover the leader just ran against backends that just failed).
Any other end of a leader (its waiters all left, its replica died, its lease lapsed, Redis failed)
leaves its followers without an answer: a follower that has handed on nothing yet takes the lease
itself or follows whoever did; one in the middle of a stream ends with an error, as a cut stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import orjson

from app.errors import GatewayError, UpstreamError
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, RequestContext
from app.pipeline.inflight import LocalInflight, SharedAnswers, SharedCall, Ticket
from app.shapes import ChatCompletion, ChatCompletionChunk
from app.state.redis_channels import CHUNK, END, ERROR, ChannelError, ChannelUnavailable, LeaderFailed, LeaderLost, RedisChannels

log = logging.getLogger("admiral.inflight")

#: tries to lead or follow before calling upstream regardless (when leaders keep vanishing)
_ROUNDS = 3


class RelayedError(GatewayError):
    """The leader replica's error, answered again with the same status, type, code and message."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__(str(fields["message"]), param=fields.get("param"), code=fields.get("code"), retry_after=fields.get("retry_after"))
        self.status = int(fields["status"])
        self.error_type = str(fields["type"])


class ChannelStore(Protocol):
    """What single flight needs of the state store (:class:`~app.state.redis.RedisStateStore`, which builds it)."""

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable: flights then skip Redis altogether."""
        ...

    @property
    def channels(self) -> RedisChannels:
        """The single-flight primitives on the store's Redis and key prefix."""
        ...

    async def ping(self) -> bool:
        """Check Redis, going degraded (and probing until it answers) when it does not."""
        ...

    def stored_key(self, key: str) -> str:
        """The Redis key of ``key``'s answer in the shared cache."""
        ...

    def take_writes(self) -> list[tuple[str, bytes, int]]:
        """The shared-cache writes not sent yet (key, value, PX ms): a lease's release carries them."""
        ...

    def followed(self, stream: str) -> bool:
        """Whether another replica follows the flight ``stream`` (True when that cannot be told)."""
        ...


class RedisInflight:
    """Single flight across every replica on the same Redis and key prefix."""

    def __init__(self, store: ChannelStore, *, lease_ttl_s: float = 10.0) -> None:
        """``lease_ttl_s`` bounds how long followers wait for a leader whose replica died."""
        self._store = store
        self._ttl = lease_ttl_s
        self._local = LocalInflight()
        self._answers: SharedAnswers | None = None

    def __len__(self) -> int:
        return len(self._local)

    def share_answers(self, answers: SharedAnswers | None) -> None:
        self._answers = answers

    async def aclose(self) -> None:
        await self._local.aclose()

    async def join(self, key: str, ctx: RequestContext, call: SharedCall) -> Ticket:
        leads: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        ticket = await self._local.join(key, ctx, lambda shared: self._run(key, shared, call, leads))
        if ticket.leader:
            try:
                # the request that started the local flight is a follower when another replica leads
                ticket.leader = await asyncio.shield(leads)
            except BaseException:
                ticket.leave()
                raise
        return ticket

    async def _run(self, key: str, ctx: RequestContext, call: SharedCall, leads: asyncio.Future[bool]) -> Answer:
        """The local flight's call: lead the key across replicas, follow the replica that does, or run alone."""
        try:
            for _ in range(_ROUNDS):
                if self._store.degraded:
                    break
                channels = self._store.channels
                try:
                    token, holder, stored = await channels.claim(key, self._ttl, self._store.stored_key(key))
                    if holder is not None:
                        _settle(leads, False)
                        return await self._follow(channels, key, holder, ctx)
                except ChannelUnavailable as exc:
                    await self._outage(exc)
                    break
                except ChannelError as exc:
                    log.info("single flight %s: the leading replica gave no answer (%s); trying again", key[:12], exc)
                    continue
                assert token is not None
                _settle(leads, True)
                # the flight before this one may have ended just after this request missed the cache
                found = await self._stored(channels, key, token, ctx) if stored else None
                if found is not None:
                    return found
                return await self._lead(channels, key, token, ctx, call)
            _settle(leads, True)
            return await call(ctx)
        finally:
            _settle(leads, True)

    async def _stored(self, channels: RedisChannels, key: str, token: str, ctx: RequestContext) -> Answer | None:
        """A leader's answer from the shared store, the lease given back; None (lease kept) when there is none."""
        if self._answers is None:
            return None
        try:
            found = await self._answers.lookup(key, ctx)
        except Exception as exc:
            log.warning("single flight %s: reading the shared answers failed (%s: %s); calling upstream", key[:12], type(exc).__name__, exc)
            return None
        if found is not None:
            try:
                await channels.release(key, token)
            except ChannelUnavailable as exc:
                await self._outage(exc)  # the lease lapses by itself
        return found

    async def _lead(self, channels: RedisChannels, key: str, token: str, ctx: RequestContext, call: SharedCall) -> Answer:
        lease = _Lease(channels, key, token, self._ttl, self._outage, self._store)
        try:
            answer = await call(ctx)
            head = {"backend": ctx.backend, "deployment": str(ctx.deployment) if ctx.deployment else None}
            if not answer.is_stream:
                # stored before the lease goes (in the same round trip): a request arriving after the end reads it there
                await self._publish(key, ctx, answer.body)
        except BaseException as exc:
            await lease.close(exc)
            raise
        if not answer.is_stream:
            await lease.close(None, last={**head, "body": answer.body})
            return answer
        folded = answer.fold() if self._answers is not None else None

        async def publish() -> None:
            if folded is not None and folded.finished:
                await self._publish(key, ctx, folded.result())

        return Answer(chunks=_broadcast(head, answer, lease, publish))

    async def _publish(self, key: str, ctx: RequestContext, body: ChatCompletion) -> None:
        if self._answers is None:
            return
        try:
            await self._answers.publish(key, ctx, body)
        except Exception as exc:
            # the answer still reaches everyone waiting; only a request arriving right after the end may call again
            log.warning("single flight %s: storing the answer for other replicas failed: %s: %s", key[:12], type(exc).__name__, exc)

    async def _follow(self, channels: RedisChannels, key: str, token: str, ctx: RequestContext) -> Answer:
        """The leading replica's answer; raises :class:`ChannelError` while none of it was handed on."""
        entries = channels.read(key, token)
        try:
            head = await _entry(entries)
            ctx.backend = head["backend"]
            ctx.deployment = Deployment.parse(head["deployment"]) if head["deployment"] else None
            if "body" in head:
                await entries.aclose()
                return Answer(body=head["body"])
            first = await _entry(entries)
        except LeaderFailed as exc:
            await entries.aclose()
            raise _relayed(exc) or exc from None
        except BaseException:
            await entries.aclose()
            raise
        return Answer(chunks=_relay(first, entries))

    async def _outage(self, exc: ChannelUnavailable) -> None:
        log.warning("single flight: %s; identical requests meet on this replica only", exc)
        # the store checks for itself: when Redis is down it turns degraded, which keeps flights off Redis
        await self._store.ping()


class _Lease:
    """A leader's hold on a key, renewed while its call runs; what it sends reaches every follower.

    Entries wait here until another replica follows the flight (its claim's notice): from then on
    they are published as they come, a batch per round trip; the rest, the end marker and the
    release go in one last round trip (the stream written only when someone followed).
    """

    def __init__(
        self, channels: RedisChannels, key: str, token: str, ttl_s: float, on_outage: Callable[[ChannelUnavailable], Awaitable[None]], store: ChannelStore
    ) -> None:
        self._channels = channels
        self._key = key
        self._token = token
        self._on_outage = on_outage
        self._store = store
        self._publisher = channels.publisher(key, token)
        self._keeper = asyncio.create_task(channels.keep_alive(key, token, ttl_s), name=f"lease-{key[:12]}")
        self._open = True
        self._pending: list[tuple[bytes, bytes]] = []
        self._live = False
        self._sending: asyncio.Task[None] | None = None

    def send(self, entry: dict[str, Any]) -> None:
        """Queue one entry for followers; when Redis fails the lease lapses (followers go elsewhere), the call goes on."""
        if not self._open:
            return
        self._pending.append((CHUNK, orjson.dumps(entry)))
        if not self._live:
            self._live = self._store.followed(self._publisher.stream)
        if self._live and self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._drain(), name=f"flight-publish-{self._key[:12]}")

    async def _drain(self) -> None:
        try:
            while self._pending and self._open:
                batch, self._pending = self._pending, []
                await self._channels.append(self._publisher, batch)
        except ChannelUnavailable as exc:
            self._lost()
            await self._on_outage(exc)
        finally:
            self._sending = None

    def _lost(self) -> None:
        self._open = False
        self._keeper.cancel()

    async def close(self, error: BaseException | None, last: dict[str, Any] | None = None) -> None:
        """In one round trip: what followers still lack, ``last`` and the end marker (or ``error``), the
        shared cache's pending writes, the lease released."""
        if self._sending is not None:
            await asyncio.shield(self._sending)  # what is on its way lands first
        if not self._open:
            return
        self._lost()
        entries, self._pending = self._pending, []
        if last is not None:
            entries.append((CHUNK, orjson.dumps(last)))
        entries.append((END, b"") if error is None else (ERROR, _failure(error).encode()))
        try:
            await self._channels.finish(self._publisher, self._key, self._token, entries, self._store.take_writes())
        except ChannelUnavailable as exc:
            await self._on_outage(exc)  # the lease lapses by itself: followers then stop waiting


async def _broadcast(head: dict[str, Any], chunks: Answer, lease: _Lease, publish: Callable[[], Awaitable[None]]) -> AsyncIterator[ChatCompletionChunk]:
    """The leader's stream, each chunk queued for followers as it is handed on; the whole answer stored before the lease goes."""
    error: BaseException | None = None
    try:
        lease.send(head)
        async for chunk in chunks:
            lease.send(chunk)
            yield chunk
        await publish()
    except BaseException as exc:
        error = exc
        raise
    finally:
        await chunks.aclose()
        await lease.close(error)


async def _relay(first: ChatCompletionChunk, entries: AsyncGenerator[bytes, None]) -> AsyncIterator[ChatCompletionChunk]:
    """The rest of the leading replica's stream; a failure now is this stream's error."""
    try:
        yield first
        async for data in entries:
            yield orjson.loads(data)
    except LeaderFailed as exc:
        raise _relayed(exc) or UpstreamError("The shared upstream call ended on another replica without an answer.") from exc
    except ChannelError as exc:
        raise UpstreamError(f"The shared stream from another replica broke off: {exc}") from exc
    finally:
        await entries.aclose()


async def _entry(entries: AsyncIterator[bytes]) -> Any:
    data = await anext(entries, None)
    if data is None:
        raise LeaderLost("the flight ended without an answer")
    return orjson.loads(data)


def _failure(error: BaseException) -> str:
    """The error marker: a gateway error in full (followers answer with it), else only that there is no answer."""
    if isinstance(error, GatewayError):
        fields = {"status": error.status, "type": error.error_type, "code": error.code, "param": error.param, "message": error.message, "retry_after": error.retry_after}
        return orjson.dumps(fields).decode()
    return orjson.dumps({"abandoned": type(error).__name__}).decode()


def _relayed(exc: LeaderFailed) -> RelayedError | None:
    """The leader's error to answer with, or None when it left no answer."""
    try:
        fields = orjson.loads(str(exc))
    except orjson.JSONDecodeError:
        return None
    return RelayedError(fields) if isinstance(fields, dict) and "status" in fields else None


def _settle(leads: asyncio.Future[bool], value: bool) -> None:
    if not leads.done():
        leads.set_result(value)
