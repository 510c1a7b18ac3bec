"""Redis round trips and commands per cache miss and per cache hit, counted from outside the gateway.

``python bench/redis_trips.py [--requests 200] [--streams 50] [--redis redis://127.0.0.1:6379/11] [--database-url URL] [--tree PATH]``
starts the benchmark's gateway (bench/gateway.yaml: agent limits, cache, dedupe) on Redis through a
counting proxy, sends the misses one at a time, then the hits, and prints the counts. The bench's
``--shared`` mode can use :class:`TripCounter` and :func:`measure` on a gateway it started itself.

What is counted:

- a **round trip** is one send from the gateway to Redis that it then waits on: a command, a
  pipeline or a Lua script is one each (a blocked XREAD too). :class:`TripCounter` is a loopback
  TCP proxy in front of Redis that counts the reads on the gateway's side of every connection;
  with requests sent one at a time the gateway never has two sends on one connection at once, so
  each send arrives as one read (a send over 64 KiB would count twice; none is that big here);
- **commands** are the deltas of Redis's ``INFO commandstats``: server-wide, so other clients of
  the same Redis add to them (run it on a quiet Redis, or read them as an upper bound); a Lua script
  counts as its EVALSHA plus every command it runs.

Both include what the gateway sends meanwhile in the background (a lease renewal every 3.3 s of a
long call, the cache's batched writes, which land up to 50 ms after the requests: the phases wait
0.5 s before counting so each gets its own writes).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["PhaseCount", "TripCounter", "commandstats", "measure"]

SETTLE_S = 0.5
#: misses sent before counting (enough to open the gateway's connections)
WARMUP = 5


class TripCounter:
    """A loopback proxy to Redis that counts the gateway's sends (its round trips)."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sends = 0
        self._closed = False
        threading.Thread(target=self._accept, name="redis-trips-accept", daemon=True).start()

    @property
    def url(self) -> str:
        """The URL to give the gateway (same database number as the target URL)."""
        return f"redis://127.0.0.1:{self.port}{self._db}"

    @property
    def sends(self) -> int:
        with self._lock:
            return self._sends

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self._sends += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def commandstats(redis_url: str) -> Counter[str]:
    """Calls per command name from ``INFO commandstats`` (server-wide)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


@dataclass
class PhaseCount:
    """What ``requests`` requests of one kind sent to Redis."""

    requests: int
    sends: int
    commands: Counter[str] = field(default_factory=Counter)

    @property
    def trips_per_request(self) -> float:
        return self.sends / self.requests

    @property
    def commands_per_request(self) -> float:
        return sum(self.commands.values()) / self.requests

    def describe(self) -> str:
        top = ", ".join(f"{name} {calls / self.requests:.2f}" for name, calls in self.commands.most_common())
        return f"{self.trips_per_request:.2f} round trips, {self.commands_per_request:.2f} commands per request ({top})"


def _post(gateway_url: str, key: str, prompt: str, model: str = "bench") -> dict[str, str]:
    """One request, its body read to the end; the response's headers. A ``-stream`` model is asked for a stream."""
    request_body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "stream": model.endswith("-stream")}
    body = json.dumps(request_body).encode()
    request = urllib.request.Request(
        gateway_url.rstrip("/") + "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return {k.lower(): v for k, v in response.headers.items()}


def _phase(gateway_url: str, key: str, counter: TripCounter, redis_url: str, prompts: list[str], expect: str, model: str = "bench") -> PhaseCount:
    sends, stats = counter.sends, commandstats(redis_url)
    for prompt in prompts:
        status = _post(gateway_url, key, prompt, model).get("x-admiral-cache")
        if status != expect:
            raise RuntimeError(f"expected a cache {expect}, the gateway said {status!r}")
    time.sleep(SETTLE_S)  # the cache's batched writes belong to this phase
    after = commandstats(redis_url)
    after.subtract(stats)
    after.pop("info", None)  # ours
    return PhaseCount(len(prompts), counter.sends - sends, +after)


def measure(gateway_url: str, key: str, counter: TripCounter, redis_url: str, requests: int = 200, streams: int = 0) -> dict[str, PhaseCount]:
    """After a few misses to warm up, send ``requests`` misses one at a time, then one more and ``requests``
    hits of it; counts per phase ("miss", "hit"), and for ``streams`` streamed misses ("stream") when asked.

    The gateway must reach Redis through ``counter`` (``counter.url``); ``redis_url`` is Redis itself.
    Streams ask model ``bench-stream`` (bench/gateway.yaml), the rest model ``bench``.
    """
    run = uuid.uuid4().hex[:8]
    for i in range(WARMUP):  # the gateway's connections to Redis open now, not in the counts
        _post(gateway_url, key, f"redis trips {run} warm-up {i}")
    time.sleep(SETTLE_S)
    misses = _phase(gateway_url, key, counter, redis_url, [f"redis trips {run} miss {i}" for i in range(requests)], "miss")
    _post(gateway_url, key, f"redis trips {run} hit")
    time.sleep(SETTLE_S)
    hits = _phase(gateway_url, key, counter, redis_url, [f"redis trips {run} hit"] * requests, "hit")
    counts = {"miss": misses, "hit": hits}
    if streams:
        counts["stream"] = _phase(gateway_url, key, counter, redis_url, [f"redis trips {run} stream {i}" for i in range(streams)], "miss", "bench-stream")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=50, help="streamed misses (0: none)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11", help="a Redis database of its own (emptied first)")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--tree", type=Path, default=None, help="run the gateway from this checkout (default: the installed one)")
    args = parser.parse_args(argv)

    bench = Path(__file__).resolve().parent
    sys.path.insert(0, str(bench))
    import redis
    import servers
    import tools
    from procs import free_port
    from upstream import nginx_server

    redis.Redis.from_url(args.redis).flushdb()
    counter = TripCounter(args.redis)
    with tempfile.TemporaryDirectory(prefix="redis-trips-") as tmp:
        workdir = Path(tmp)
        command = tools.tree_command(workdir, args.tree, "tree") if args.tree else str(Path(sys.executable).parent / "admiral-optimizer")
        with (
            nginx_server(workdir / "nginx", free_port(), None) as upstream,
            servers.gateway(command, workdir, upstream.port, None, database_url=args.database_url, state_url=counter.url) as gateway,
        ):
            counts = measure(f"http://127.0.0.1:{gateway.port}", servers.GATEWAY_KEY, counter, args.redis, args.requests, args.streams)
    counter.close()
    for kind, count in counts.items():
        print(f"{kind}: {count.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
