"""Starting, probing, measuring and stopping the servers under test (all on 127.0.0.1)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"


@dataclass(frozen=True)
class CpuPlan:
    """Which cores the load side (wrk, nginx, the TTFB client) and the server under test may use.

    On 2 cores the server gets one core to itself and everything that only exists to feed it
    shares the other, so a figure is the server's own and not a fight for the scheduler.
    """

    load: str | None
    server: str | None
    every: str

    @classmethod
    def detect(cls) -> CpuPlan:
        cpus = sorted(os.sched_getaffinity(0))
        every = ",".join(map(str, cpus))
        if len(cpus) < 2:
            return cls(None, None, every)
        return cls(str(cpus[0]), ",".join(map(str, cpus[1:])), every)

    def describe(self) -> str:
        if self.load is None:
            return "no pinning (fewer than 2 cores)"
        return f"load generator + upstream on CPU {self.load}, server under test on CPU {self.server}"


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """``cmd`` run under ``taskset`` when there are cores to pin to."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, lower-cased headers, body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass
class Server:
    """A server process started in its own session, so stopping it takes its workers along."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health"
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                if http_call(self.port, "GET", self.ready_path, timeout=2)[0] < 500:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready on port {self.port} after {timeout:.0f}s; see {self.log}")

    def rss_mb(self) -> float:
        """Resident memory of the process and all its descendants, in MiB."""
        assert self.proc is not None
        return sum(_vm_rss_kb(pid) for pid in _tree(self.proc.pid)) / 1024

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _vm_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPU time spent busy over ``seconds``: other work on the machine skews figures."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)
