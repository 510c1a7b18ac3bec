"""The user's scenario: a fleet of agents, each making a few chat calls through the gateway, then stopping.

    locust -f loadtest/locustfile.py --headless -u 100 -r 50 --host http://127.0.0.1:8000 \\
        --run-time 3m --only-summary --csv loadtest/results/run

Each locust user is one agent (``-u`` agents in all). An agent makes ``--calls-per-agent`` calls
(5) with ``model: auto``, a think time of 0.5-2 s between them, and then stops; when every agent
has stopped the run ends by itself (``--run-time`` only bounds a hang). Of each agent's calls,
``--shared-fraction`` (40 %, i.e. 2 of 5) ask a question drawn from a small pool shared by the
whole fleet (``--shared-pool`` prompts) and the rest are unique to the agent; ``--stream-fraction``
(30 %) of calls stream. Streams are parsed as SSE: the ``chat stream`` entry is the whole stream,
``chat stream TTFT`` the time to the first content token.

Environment: ``ADMIRAL_KEY`` (gateway key, optional), ``ADMIRAL_ADMIN_KEY`` (admin key, to read
``GET /admin/stats``).

At the end the gateway's cache hit rate is read from ``/admin/stats?hours=1`` (the difference
between a reading taken at the start and one at the end, so earlier traffic in the window does
not count) and the run exits non-zero when a call failed (1), when the hit rate is at or below
``--min-hit-rate`` (2), or when it could not be read (3); ``--min-hit-rate 0`` skips that check.

This file talks HTTP only: it must not import the gateway (``app``), which runs on asyncio while
locust runs on gevent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from locust import User, between, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsEntry

log = logging.getLogger("admiral.loadtest")

CHAT_PATH = "/v1/chat/completions"
PLAIN, STREAM, TTFT = "chat plain", "chat stream", "chat stream TTFT"
TIMEOUT = (5.0, 60.0)  # connect, read (between bytes)
STATS_WAIT_S = 15.0  # how long to wait for the request log to catch up with what was sent

# Questions several agents of a fleet ask in the same hour, word for word.
SHARED_PROMPTS = [
    "Summarise the on-call runbook for the payments service in five bullet points.",
    "What is the difference between a process and a thread? Answer in two sentences.",
    "List the HTTP status codes a REST API should return for validation errors and why.",
    "Explain what an idempotency key is and when a client should send one.",
    "Give three common causes of a Kubernetes pod stuck in CrashLoopBackOff.",
    "Write a one-paragraph release note for a bug fix in the login form.",
    "What does p95 latency mean, and why is it preferred over the average?",
    "Translate 'the deployment finished successfully' into French, German and Spanish.",
    "Name the fields of a good incident postmortem, one line each.",
    "Explain exponential backoff with jitter in plain words.",
    "What are the SOLID principles? One line per principle.",
    "Suggest a naming convention for feature flags in a large codebase.",
]
TOPICS = [
    "the nightly ETL job", "a flaky integration test", "customer ticket triage", "the billing export",
    "a slow SQL query", "the search index rebuild", "a failed canary deploy", "API rate limits",
    "the mobile release checklist", "log retention costs", "an expired TLS certificate", "cache eviction",
]
TASKS = [
    "Summarise the status of {topic} for ticket {ref}.",
    "Draft a reply to the customer about {topic} (case {ref}).",
    "List the next three actions on {topic}, reference {ref}.",
    "Review this plan for {topic} and point out risks; tracking id {ref}.",
    "Write a short standup update about {topic} ({ref}).",
]


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument("--calls-per-agent", type=int, default=5, help="chat calls each agent makes before it stops (5)")
    parser.add_argument("--shared-fraction", type=float, default=0.4, help="share of each agent's calls drawn from the shared pool (0.4)")
    parser.add_argument("--shared-pool", type=int, default=8, help=f"how many shared prompts the fleet draws from (8, at most {len(SHARED_PROMPTS)})")
    parser.add_argument("--stream-fraction", type=float, default=0.3, help="share of calls made with stream: true (0.3)")
    parser.add_argument("--min-hit-rate", type=float, default=0.30, help="fail unless /admin/stats reports a cache hit rate above this (0.30); 0 skips the check")
    parser.add_argument("--stats-hours", type=int, default=1, help="the hours= window asked of /admin/stats (1)")
    parser.add_argument("--scenario-seed", type=int, default=None, help="seed for the agents' plans (default: random)")


class CallFailed(Exception):
    """A chat call that did not produce a complete, well-formed answer."""


@dataclass
class Verdict:
    """What the run ends with: the process exit code and the report."""

    exit_code: int
    lines: list[str]


@dataclass
class Fleet:
    """The run's bookkeeping, shared by all agents of this process."""

    agents: int
    calls_per_agent: int
    shared_per_agent: int
    pool: list[str]
    stream_fraction: float
    seed: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    started: int = 0
    finished: int = 0
    sent: int = 0
    shared_sent: int = 0
    shared_seen: set[str] = field(default_factory=set)
    cache_header: Counter[str] = field(default_factory=Counter)
    dedupe_header: Counter[str] = field(default_factory=Counter)
    stats_before: dict[str, Any] | None = None
    verdict: Verdict | None = None

    def claim(self) -> int | None:
        """A slot for a new agent, or None once the whole fleet has been started."""
        if self.started >= self.agents:
            return None
        self.started += 1
        return self.started - 1

    def plan(self, slot: int) -> list[tuple[str, bool, bool]]:
        """(user prompt, stream?, shared?) for each of the agent's calls."""
        rng = random.Random(f"{self.seed}-{slot}")
        shared_at = set(rng.sample(range(self.calls_per_agent), self.shared_per_agent))
        calls = []
        for i in range(self.calls_per_agent):
            if i in shared_at:
                prompt = rng.choice(self.pool)
            else:
                ref = f"{self.run_id}-{slot:04d}-{i}"
                prompt = rng.choice(TASKS).format(topic=rng.choice(TOPICS), ref=ref)
            calls.append((prompt, rng.random() < self.stream_fraction, i in shared_at))
        return calls

    def system_prompt(self) -> str:
        # the run id keeps one run's answers out of the next run's cache: each run starts cold
        return f"You are a concise assistant working for a team of engineers. Session {self.run_id}."


FLEET: Fleet | None = None


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, (MasterRunner, WorkerRunner)):
        log.warning("this scenario counts agents in one process: run it without --processes/--master/--worker")


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    global FLEET
    opts = environment.parsed_options
    calls = max(1, opts.calls_per_agent)
    pool = SHARED_PROMPTS[: max(1, min(opts.shared_pool, len(SHARED_PROMPTS)))]
    seed = opts.scenario_seed if opts.scenario_seed is not None else random.randrange(1 << 30)
    FLEET = Fleet(
        agents=max(1, environment.runner.target_user_count),
        calls_per_agent=calls,
        shared_per_agent=min(calls, max(0, round(calls * opts.shared_fraction))),
        pool=pool,
        stream_fraction=opts.stream_fraction,
        seed=seed,
    )
    FLEET.stats_before, _ = fetch_stats(environment)
    log.info(
        "fleet: %d agents x %d calls, %d of them from a pool of %d shared prompts, ~%d%% streamed (run %s, seed %d)",
        FLEET.agents, calls, FLEET.shared_per_agent, len(pool), round(100 * opts.stream_fraction), FLEET.run_id, seed,
    )


class Agent(User):
    """One agent: a few chat calls with think time in between, then it stops for good."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        assert FLEET is not None
        self.slot = FLEET.claim()
        self.calls = FLEET.plan(self.slot) if self.slot is not None else []
        self.done = 0
        self.session = requests.Session()
        self.headers = {"Content-Type": "application/json"}
        if key := os.environ.get("ADMIRAL_KEY"):
            self.headers["Authorization"] = f"Bearer {key}"

    def on_stop(self) -> None:
        self.session.close()

    @task
    def call(self) -> None:
        assert FLEET is not None
        if self.slot is None:
            # locust replaces users that stop while it is still ramping up; the fleet is complete
            raise StopUser()
        prompt, stream, shared = self.calls[self.done]
        body: dict[str, Any] = {
            "model": "auto",
            "messages": [{"role": "system", "content": FLEET.system_prompt()}, {"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 256,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        FLEET.sent += 1
        if shared:
            FLEET.shared_sent += 1
            FLEET.shared_seen.add(prompt)
        try:
            (self._stream if stream else self._plain)(body)
        finally:
            self.done += 1
        if self.done >= len(self.calls):
            FLEET.finished += 1
            if FLEET.finished >= FLEET.agents:
                gevent.spawn(_end_run, self.environment)
            raise StopUser()

    def _post(self, body: dict[str, Any], stream: bool) -> requests.Response:
        resp = self.session.post(f"{self.host.rstrip('/')}{CHAT_PATH}", json=body, headers=self.headers, stream=stream, timeout=TIMEOUT)
        assert FLEET is not None
        FLEET.cache_header[resp.headers.get("x-admiral-cache", "absent")] += 1
        FLEET.dedupe_header[resp.headers.get("x-admiral-dedupe", "none")] += 1
        return resp

    def _plain(self, body: dict[str, Any]) -> None:
        start = time.perf_counter()
        size, error = 0, None
        try:
            resp = self._post(body, stream=False)
            size = len(resp.content)
            if resp.status_code != 200:
                raise CallFailed(_http_error(resp))
            message = resp.json()["choices"][0]["message"]
            if not isinstance(message.get("content"), str):
                raise CallFailed("answer without message content")
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError, AttributeError, CallFailed) as exc:
            error = exc if isinstance(exc, CallFailed) else CallFailed(f"{type(exc).__name__}: {exc}")
        self._report("POST", PLAIN, start, size, error)

    def _stream(self, body: dict[str, Any]) -> None:
        start = time.perf_counter()
        size, error, first_token = 0, None, None
        try:
            with self._post(body, stream=True) as resp:
                if resp.status_code != 200:
                    size = len(resp.content)
                    raise CallFailed(_http_error(resp))
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    raise CallFailed(f"stream answered with content-type {resp.headers.get('content-type')!r}")
                finished = done = False
                pending = b""
                for chunk in resp.iter_content(chunk_size=None):
                    size += len(chunk)
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue  # blank separators, comments, event:/id: fields
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if event.get("error"):
                            raise CallFailed(f"error event in stream: {event['error'].get('message', event['error'])}")
                        for choice in event.get("choices") or []:
                            if first_token is None and (choice.get("delta") or {}).get("content"):
                                first_token = time.perf_counter()
                            finished = finished or bool(choice.get("finish_reason"))
                    if done:
                        break
                if not done:
                    raise CallFailed("stream ended without data: [DONE]")
                if not finished:
                    raise CallFailed("stream without a finish_reason")
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError, CallFailed) as exc:
            error = exc if isinstance(exc, CallFailed) else CallFailed(f"{type(exc).__name__}: {exc}")
        self._report("POST", STREAM, start, size, error)
        if first_token is not None:
            self._report("SSE", TTFT, start, 0, None, end=first_token)

    def _report(self, kind: str, name: str, start: float, size: int, error: Exception | None, end: float | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=((end or time.perf_counter()) - start) * 1000,
            response_length=size,
            exception=error,
            context={},
        )


def _http_error(resp: requests.Response) -> str:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return f"HTTP {resp.status_code}: {message}"


def _end_run(environment: Environment) -> None:
    runner = environment.runner
    if runner is None:
        return
    log.info("all %d agents made their calls; ending the run", FLEET.agents if FLEET else 0)
    if environment.parsed_options.headless:
        runner.quit()
    else:
        runner.stop()


# -- the end-of-run check ---------------------------------------------------------------------


def fetch_stats(environment: Environment) -> tuple[dict[str, Any] | None, str]:
    """``GET /admin/stats`` as a dict with a numeric ``cache_hit_rate``, or None and the reason."""
    key = os.environ.get("ADMIRAL_ADMIN_KEY")
    if not key:
        return None, "ADMIRAL_ADMIN_KEY is not set"
    url = f"{(environment.host or '').rstrip('/')}/admin/stats"
    try:
        resp = requests.get(url, params={"hours": environment.parsed_options.stats_hours}, headers={"Authorization": f"Bearer {key}"}, timeout=5)
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__} from {url}"
    if resp.status_code != 200:
        return None, f"HTTP {resp.status_code} from {url}"
    try:
        data = resp.json()
    except ValueError:
        return None, f"{url} did not answer JSON"
    if not isinstance(data, dict) or not _is_number(data.get("cache_hit_rate")):
        return None, f"{url} has no numeric cache_hit_rate"
    return data, ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _counts(stats: dict[str, Any] | None) -> tuple[float, float] | None:
    if stats and _is_number(stats.get("total_requests")) and _is_number(stats.get("cache_hits")):
        return float(stats["total_requests"]), float(stats["cache_hits"])
    return None


def _stats_after(environment: Environment, fleet: Fleet) -> tuple[dict[str, Any] | None, str]:
    """Reads /admin/stats once the request log holds this run's calls (it is written in batches)."""
    deadline = time.monotonic() + STATS_WAIT_S
    before = _counts(fleet.stats_before)
    while True:
        stats, why = fetch_stats(environment)
        now = _counts(stats)
        if stats is None or now is None or time.monotonic() >= deadline:
            return stats, why
        if now[0] - (before[0] if before else 0) >= fleet.sent:
            return stats, why
        gevent.sleep(0.5)


def _hit_rate(fleet: Fleet, stats: dict[str, Any]) -> tuple[float, str]:
    before, after = _counts(fleet.stats_before), _counts(stats)
    if before and after and after[0] > before[0]:
        total, hits = after[0] - before[0], after[1] - before[1]
        return hits / total, f"this run: {hits:.0f} hits in {total:.0f} logged requests"
    return float(stats["cache_hit_rate"]), "the whole window, earlier traffic included"


def savings_lines(savings: Any) -> list[str]:
    """The savings section of /admin/stats (whole window), as report lines."""
    total = savings.get("total") if isinstance(savings, dict) else None
    if not isinstance(total, dict):
        return []
    avoided = total.get("calls_avoided") or {}
    return [
        f"savings (whole window): calls avoided {sum(avoided.values())} (cache {avoided.get('cache', 0)}, semantic {avoided.get('semantic', 0)}, "
        f"dedupe {avoided.get('dedupe', 0)}), tokens avoided {total.get('tokens_avoided', 0)}",
        f"money: spent ${total.get('spent_usd', 0):.4f}, saved ${total.get('saved_usd', 0):.4f} at the deployments' prices, "
        f"${total.get('saved_vs_reference_usd', 0):.4f} against the reference price",
    ]


def _chat_summary(environment: Environment) -> StatsEntry:
    total = StatsEntry(environment.stats, "chat (all)", "")
    for entry in environment.stats.entries.values():
        if entry.name in (PLAIN, STREAM):
            total.extend(entry)
    return total


def _row(entry: StatsEntry) -> str:
    if not entry.num_requests:
        return f"  {entry.name:<18} {0:>6} calls"
    p = entry.get_response_time_percentile
    return (
        f"  {entry.name:<18} {entry.num_requests:>6} calls {entry.num_failures:>4} failed   "
        f"p50 {p(0.5):>6.0f} ms  p95 {p(0.95):>6.0f} ms  p99 {p(0.99):>6.0f} ms"
    )


def judge(environment: Environment) -> Verdict:
    """Prints nothing; returns the exit code and the report lines."""
    fleet = FLEET
    opts = environment.parsed_options
    lines = ["", "=== Admiral load test ==="]
    if fleet is None:
        return Verdict(1, [*lines, "the test never started"])
    entries = {e.name: e for e in environment.stats.entries.values()}
    chat = _chat_summary(environment)
    lines += [_row(chat)] + [_row(entries[n]) for n in (PLAIN, STREAM, TTFT) if n in entries]
    error_rate = chat.num_failures / chat.num_requests if chat.num_requests else 0.0
    repeats = fleet.shared_sent - len(fleet.shared_seen)
    lines += [
        f"agents finished: {fleet.finished}/{fleet.agents}; calls sent: {fleet.sent} "
        f"({fleet.shared_sent} from the shared pool, {repeats} of them repeats)",
        f"error rate: {error_rate:.2%} ({chat.num_failures} of {chat.num_requests})",
        "x-admiral-cache: " + (", ".join(f"{k} {v}" for k, v in sorted(fleet.cache_header.items())) or "-")
        + "; x-admiral-dedupe: " + (", ".join(f"{k} {v}" for k, v in sorted(fleet.dedupe_header.items())) or "-"),
    ]
    code, reasons = 0, []
    if chat.num_failures or environment.runner.exceptions:
        code, reasons = 1, [*reasons, f"{chat.num_failures} failed calls, {len(environment.runner.exceptions)} errors in the locustfile"]
    if fleet.finished < fleet.agents:
        code, reasons = 1, [*reasons, f"only {fleet.finished} of {fleet.agents} agents finished"]

    stats, why = _stats_after(environment, fleet)
    if stats is None:
        lines.append(f"gateway cache hit rate: stats unavailable ({why})")
        if opts.min_hit_rate > 0:
            code, reasons = code or 3, [*reasons, "the cache hit rate could not be read"]
    else:
        rate, basis = _hit_rate(fleet, stats)
        extra = f", dedupe_savings {stats['dedupe_savings']}" if "dedupe_savings" in stats else ""
        lines.append(
            f"gateway cache hit rate: {rate:.1%} ({basis}); /admin/stats?hours={opts.stats_hours}: "
            f"cache_hit_rate {stats['cache_hit_rate']}, total_requests {stats.get('total_requests')}{extra}"
        )
        if _is_number(stats.get("dedupe_savings")) and _is_number(stats.get("total_requests")) and stats["total_requests"]:
            saved = float(stats.get("cache_hits") or 0) + float(stats["dedupe_savings"])
            lines.append(
                f"served without an upstream call (cache hits + dedupe savings, whole window): "
                f"{saved:.0f} of {stats['total_requests']} ({saved / stats['total_requests']:.1%})"
            )
        lines.extend(savings_lines(stats.get("savings")))
        if opts.min_hit_rate > 0 and rate <= opts.min_hit_rate:
            code, reasons = code or 2, [*reasons, f"cache hit rate {rate:.1%} is not above {opts.min_hit_rate:.0%}"]
    lines.append("PASS" if code == 0 else f"FAIL (exit {code}): " + "; ".join(reasons))
    return Verdict(code, lines)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if FLEET is not None and FLEET.verdict is None:
        FLEET.verdict = judge(environment)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    # Ctrl-C reaches here with the users still running: stop them first (test_stop then judges)
    if environment.runner is not None:
        environment.runner.stop()
    if FLEET is not None and FLEET.verdict is None:
        FLEET.verdict = judge(environment)
    if FLEET is not None and FLEET.verdict is not None:
        environment.process_exit_code = FLEET.verdict.exit_code


@events.quit.add_listener
def _on_quit(**_: Any) -> None:
    # after locust's own tables, so the verdict is the last thing printed
    if FLEET is not None and FLEET.verdict is not None:
        print("\n".join(FLEET.verdict.lines), flush=True)
