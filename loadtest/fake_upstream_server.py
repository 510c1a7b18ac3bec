"""Run the test suite's fake OpenAI-compatible upstream on a fixed loopback port until Ctrl-C.

    python loadtest/fake_upstream_server.py --port 8090 --latency 0.2

It is ``tests/fake_upstream.py``'s ``FakeUpstream`` (every chat request sleeps ``--latency``
seconds, then answers ``"echo: <last user text>"``, as JSON or as SSE when ``stream: true``),
bound to ``127.0.0.1:PORT`` instead of a random port so a gateway config can name it. On exit
(Ctrl-C or SIGTERM) it prints how many chat requests reached it: with the gateway's cache and
dedupe on, that is fewer than the load generator sent.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tests/

from tests.fake_upstream import Behaviour, FakeUpstream  # noqa: E402

# the fake keeps every request it saw; a long soak would otherwise grow without bound
_MAX_RECORDED = 50_000


class FixedPortFakeUpstream(FakeUpstream):
    """``FakeUpstream`` on a port chosen by the caller (the test fixture always asks for port 0)."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fixed_port = port

    async def _serve(self) -> None:
        # FakeUpstream._serve with the port as the only difference
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._fixed_port, backlog=2048).start()
        self.port = self._fixed_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds slept on every request (default 0.2)")
    parser.add_argument("--behaviour", default="ok", help="fake behaviour, e.g. ok, dribble:0.05, 500 (default ok)")
    parser.add_argument("--by-model", action="append", default=[], metavar="MODEL=BEHAVIOUR", help="a behaviour for requests naming MODEL (repeatable), e.g. broken=500")
    args = parser.parse_args(argv)
    by_model: dict[str, str] = {}
    try:
        Behaviour.parse(args.behaviour)
        for item in args.by_model:
            model, sep, behaviour = item.partition("=")
            if not sep or not model:
                raise ValueError(f"--by-model wants MODEL=BEHAVIOUR, not {item!r}")
            Behaviour.parse(behaviour)
            by_model[model] = behaviour
    except ValueError as exc:
        parser.error(str(exc))

    up = FixedPortFakeUpstream(args.port, behaviour=args.behaviour, latency=args.latency)
    up.by_model = by_model
    try:
        up.start()
    except OSError as exc:
        print(f"fake upstream: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"fake upstream: {up.base_url} (latency {args.latency:g} s, behaviour {args.behaviour}); Ctrl-C stops it", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    earlier_calls = 0
    while not stop.wait(5.0):
        if up.calls > _MAX_RECORDED:
            earlier_calls += up.calls
            up.reset(behaviours=False)
    total = earlier_calls + up.calls
    peak = up.peak_inflight
    up.stop()
    print(f"fake upstream: stopped after {total} chat requests (peak {peak} in flight)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
