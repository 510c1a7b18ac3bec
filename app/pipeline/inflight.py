"""Single flight: identical requests in progress share one upstream call.

The first request for a key starts a :class:`Flight`, whose upstream call runs in a task the
flight owns (not the leader's request task), so a leader whose client leaves does not cancel the
call while others still wait; the last waiter to leave does. Every waiter holds a :class:`Ticket`
and gets the same body, the same chunks (a late joiner first gets those already sent, then the
rest live) or the same error.

:class:`InflightCoordinator` is the seam; :class:`LocalInflight` is the in-process coordinator and
:class:`~app.pipeline.inflight_redis.RedisInflight` the cross-replica one built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from app.errors import UpstreamBadResponseError, UpstreamError
from app.pipeline.answer import Answer, Batch
from app.pipeline.base import RequestContext
from app.shapes import ChatCompletion, Events

#: runs the shared upstream call with the leader's context
SharedCall = Callable[[RequestContext], Awaitable[Answer]]


class Ticket(Protocol):
    """One waiter's place in a shared call."""

    #: this waiter's request makes the upstream call (the others follow it, on any replica)
    leader: bool

    @property
    def followers(self) -> int:
        """How many joined after the leader (so far)."""
        ...

    @property
    def context(self) -> RequestContext:
        """The context the shared call ran with: backend, deployment, timings."""
        ...

    async def result(self) -> Answer:
        """The complete answer, or the stream once its first chunk is there; raises the call's error.

        A returned stream must be read to its end or closed (``aclose``) to release the place.
        """
        ...

    def leave(self) -> None:
        """Give up the place (idempotent); the call is cancelled when nobody is left."""
        ...


class InflightCoordinator(Protocol):
    """Where identical in-flight requests find each other."""

    async def join(self, key: str, ctx: RequestContext, call: SharedCall) -> Ticket:
        """Follow the flight for ``key``, or lead a new one that runs ``call(ctx)``."""
        ...

    def __len__(self) -> int:
        """Flights in progress."""
        ...

    def share_answers(self, answers: SharedAnswers | None) -> None:
        """Where a finished flight's answer waits for identical requests that come after it (the response cache)."""
        ...

    async def aclose(self) -> None: ...


class SharedAnswers(Protocol):
    """A store every replica reads (the response cache), written before a flight ends and read before one starts.

    Between the end of a flight and the cache's usual write, an identical request on another
    replica would find neither the flight nor the answer: the leader stores its answer here before
    it lets the flight go, and a request about to lead a new flight looks here first.
    """

    async def publish(self, key: str, ctx: RequestContext, body: ChatCompletion) -> None:
        """Store a leader's complete answer (when its request may be stored) where every replica reads it, now."""
        ...

    async def lookup(self, key: str, ctx: RequestContext) -> Answer | None:
        """The stored answer for ``key`` (when its request may read the cache), or None; sets ``ctx`` as a hit does."""
        ...


class Flight:
    """One shared upstream call and everything it has produced so far."""

    def __init__(self, key: str, ctx: RequestContext, forget: Callable[[Flight], None], loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.ctx = ctx
        self.body: ChatCompletion | None = None
        #: the stream's batches as they were read (each handed to every waiter whole)
        self.batches: list[Batch] = []
        self.error: BaseException | None = None
        self.done = False
        self.waiters = 0
        self.followers = 0
        self._forget = forget
        # the registry's, read once for all its flights (asyncio.get_running_loop() is a system call: see Services.loop)
        self._loop = loop
        #: one future per waiting waiter, resolved at the next change
        self._waiting: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self, call: SharedCall) -> None:
        self.task = self._loop.create_task(self._run(call))

    async def _run(self, call: SharedCall) -> None:
        try:
            answer = await call(self.ctx)
            if not answer.is_stream:
                self.body = answer.body
            else:
                try:
                    # a batch at a time: a burst from the provider wakes the waiters once
                    while chunks := await answer.batch():
                        self.batches.append(chunks)
                        self._notify()
                finally:
                    await answer.aclose()
        except asyncio.CancelledError:
            self.error = UpstreamError("The shared upstream call was cancelled.")
            raise
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self._notify()
            # waiters woken just now run first (and store the answer in the cache) before the key is
            # free again, so a request arriving in between joins this flight rather than a new one
            self._loop.call_soon(self._forget, self)

    def _notify(self) -> None:
        # waiters that looked before the change wake; later ones look again before they wait
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():  # a waiter cancelled meanwhile cancelled its own future
                future.set_result(None)

    async def changed(self) -> None:
        future = self._loop.create_future()
        self._waiting.append(future)
        await future

    def release(self) -> None:
        self.waiters -= 1
        if self.waiters == 0 and not self.done and self.task is not None:
            # nobody wants the answer any more: stop paying for it, and let new requests start afresh
            self._forget(self)
            self.task.cancel()


class LocalTicket:
    """A waiter's place in an in-process :class:`Flight`."""

    def __init__(self, flight: Flight, leader: bool) -> None:
        self.leader = leader
        self._flight = flight
        self._left = False
        flight.waiters += 1
        if not leader:
            flight.followers += 1

    @property
    def followers(self) -> int:
        return self._flight.followers

    @property
    def context(self) -> RequestContext:
        return self._flight.ctx

    async def result(self) -> Answer:
        flight = self._flight
        try:
            while flight.body is None and not flight.batches and not flight.done:
                await flight.changed()
        except BaseException:
            self.leave()
            raise
        if flight.body is not None:
            self.leave()
            return Answer(body=flight.body)
        if flight.batches:
            return Answer(chunks=SharedStream(self, flight))
        self.leave()
        raise flight.error or UpstreamBadResponseError("The shared upstream call ended without an answer.")

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self._flight.release()


class SharedStream:
    """The flight's batches from the first, then live; releases the ticket at the end or on close."""

    def __init__(self, ticket: LocalTicket, flight: Flight) -> None:
        self._ticket = ticket
        self._flight = flight
        self._next = 0

    async def batch(self) -> Batch:
        """The batches there are and not yet read (one as it was read, several joined), waiting for
        the next when there are none; [] at the end."""
        flight = self._flight
        while self._next >= len(flight.batches):
            if flight.done:
                self._ticket.leave()
                if flight.error is not None:
                    raise flight.error
                return []
            try:
                await flight.changed()
            except BaseException:
                self._ticket.leave()
                raise
        at, self._next = self._next, len(flight.batches)
        if self._next - at == 1:
            return flight.batches[at]
        batches = flight.batches[at:]
        if all(type(batch) is Events for batch in batches):
            return Events.joined(batches)  # type: ignore[arg-type]
        return [chunk for batch in batches for chunk in batch]  # type: ignore[misc]

    async def aclose(self) -> None:
        self._ticket.leave()


class LocalInflight:
    """The in-process registry of flights, one per key; an entry lives only while its call runs."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        #: the tasks of flights given up while they ran: the loop keeps only weak references to tasks,
        #: and a cancelled flight must still finish closing (a running flight is held by ``_flights``)
        self._closing: set[asyncio.Task[None]] = set()
        #: the loop the flights run on, read at the first join (the registry may be built before the loop runs)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._flights)

    def share_answers(self, answers: SharedAnswers | None) -> None:
        # one process: waiters store the answer in the cache's memory before the key is free again (Flight._run)
        return

    async def join(self, key: str, ctx: RequestContext, call: SharedCall) -> Ticket:
        flight = self._flights.get(key)
        if flight is not None:
            return LocalTicket(flight, leader=False)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        flight = Flight(key, ctx, self._forget, loop)
        self._flights[key] = flight
        ticket = LocalTicket(flight, leader=True)
        flight.start(call)
        return ticket

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        task = flight.task
        if not flight.done and task is not None:
            # given up by its last waiter (Flight.release cancels it next)
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        tasks = [f.task for f in self._flights.values() if f.task is not None] + list(self._closing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
