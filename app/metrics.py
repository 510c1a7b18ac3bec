"""Every Prometheus metric of the gateway, built on a registry given at start (never at import)."""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

#: 5 ms … 120 s: gateway overhead at the low end, slow LLM answers at the high end
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    """The ``admiral_*`` collectors; label sets are bounded (agents, backends, statuses)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # registered before the collectors it adds to: reading the registry folds it first
        self.tally = Tally(r, immediate=bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")))
        self.requests = Counter("admiral_requests", "Model requests answered, by endpoint (chat, completions, embeddings, responses, messages).", ["agent", "model", "backend", "status", "cache", "endpoint"], registry=r)
        self.request_duration = Histogram("admiral_request_duration_seconds", "Whole request time as the client saw it.", buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("admiral_upstream_duration_seconds", "Time spent in upstream calls.", ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("admiral_time_to_first_token_seconds", "Time from the upstream call to its first streamed chunk.", ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("admiral_overhead_seconds", "Gateway time excluding the upstream call.", buckets=OVERHEAD_BUCKETS, registry=r)
        self.cache_hits = Counter("admiral_cache_hits", "Answers served from the cache.", registry=r)
        self.cache_misses = Counter("admiral_cache_misses", "Cache lookups that found nothing.", registry=r)
        self.embedding_cache_items = Counter("admiral_embedding_cache_items", "Embedding inputs looked up in the per-item cache, by result (hit, miss).", ["result"], registry=r)
        self.dedupe_coalesced = Counter("admiral_dedupe_coalesced", "Requests answered by joining an identical in-flight call.", registry=r)
        self.ratelimit_rejections = Counter("admiral_ratelimit_rejections", "Requests refused or deployments skipped by rate limits.", ["scope"], registry=r)
        self.circuit_state = Gauge("admiral_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["backend"], registry=r, multiprocess_mode="max")
        self.backend_up = Gauge("admiral_backend_up", "1 when the backend is usable (circuit not open), else 0.", ["backend"], registry=r, multiprocess_mode="min")
        self.tokens = Counter("admiral_tokens", "Tokens by direction (prompt, completion).", ["agent", "backend", "direction"], registry=r)
        self.inflight = Gauge("admiral_inflight_requests", "Chat completion requests in progress.", registry=r, multiprocess_mode="livesum")
        if not self.tally.immediate:
            self.inflight.set_function(lambda: self.tally.inflight)
        self.retries = Counter("admiral_retries", "Upstream calls retried after a failure.", ["backend"], registry=r)
        self.failovers = Counter("admiral_failovers", "Moves from a failing backend to the next.", ["from_backend"], registry=r)
        self.events = Counter("admiral_events", "Operational events emitted.", ["event"], registry=r)
        self.log_dropped = Counter("admiral_request_log_dropped", "Request log rows dropped because the queue was full.", registry=r)
        self.webhook_deliveries = Counter("admiral_webhook_deliveries", "Event webhook POSTs by outcome (ok, failed after retries, dropped on a full queue).", ["outcome"], registry=r)
        self.calls_avoided = Counter("admiral_calls_avoided", "Upstream calls avoided, by agent and how (cache, semantic, dedupe).", ["agent", "via"], registry=r)
        self.tokens_avoided = Counter("admiral_tokens_avoided", "Tokens not spent upstream because the cache or a leader answered.", ["agent", "via"], registry=r)
        self.spend_usd = Counter("admiral_spend_usd", "US dollars spent upstream at the deployments' prices.", ["agent"], registry=r)
        self.saved_usd = Counter(
            "admiral_saved_usd", "US dollars saved: at the deployments' prices by avoided calls (basis=price), or against the reference price (basis=reference).", ["agent", "basis"], registry=r
        )
        self.semantic_lookups = Counter("admiral_semantic_cache_lookups", "Semantic cache lookups after an exact miss, by result (hit, miss).", ["result"], registry=r)
        self.budget_remaining = Gauge(
            "admiral_budget_remaining", "Units left in a budget window (rpm, tpm, rpd, tpd) of an agent or provider.", ["scope", "name", "window"], registry=r, multiprocess_mode="mostrecent"
        )
        self.state_degraded = Gauge("admiral_state_degraded", "1 while the shared state store is unreachable.", registry=r, multiprocess_mode="max")
        self.spans_dropped = Counter("admiral_spans_dropped", "Trace spans dropped because the export queue was full.", registry=r)
        self.amqp_publishes = Counter("admiral_amqp_publishes", "Events published to RabbitMQ by outcome (ok: confirmed, failed: refused by the broker, dropped: queue full).", ["outcome"], registry=r)


class Children(Generic[M]):
    """A labelled metric's children, each looked up once: ``labels()`` costs microseconds a call.

    Only for label sets that are bounded already (the metric keeps every child it ever made).
    """

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Tally:
    """The request path's metric updates, kept as plain numbers and added to the collectors when
    the registry is read (a scrape, ``get_sample_value``): the values read are exact.

    Each prometheus_client update runs several Python calls and takes a lock; a request's end
    makes about nine. Here the recorder holds :attr:`lock` once and each update is a dict update
    (:meth:`add`, :meth:`observe`); the requests in progress are a plain count, :attr:`inflight`,
    which the gauge reads. With ``PROMETHEUS_MULTIPROC_DIR`` set, ``/metrics`` reads the
    workers' sample files and never this registry, so the updates go to the collectors at once
    (``immediate``).
    """

    def __init__(self, registry: CollectorRegistry, *, immediate: bool = False) -> None:
        self.immediate = immediate
        #: held around a batch of :meth:`add` and :meth:`observe` calls (the registry may be read from another thread)
        self.lock = threading.Lock()
        self._counts: dict[Counter, float] = {}
        #: a histogram child -> [the sum of its observations, then one count per bucket]
        self._observed: dict[Histogram, list[float]] = {}
        #: requests in progress (not ``immediate``), changed on the event loop only: the gauge reads it
        self.inflight = 0
        registry.register(self)

    def add(self, counter: Counter, amount: float = 1.0) -> None:
        """``counter.inc(amount)``, for a counter without labels or a labelled one's child."""
        if self.immediate:
            counter.inc(amount)
            return
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")  # now, as counter.inc would
        counts = self._counts
        counts[counter] = counts.get(counter, 0.0) + amount

    def observe(self, histogram: Histogram, value: float) -> None:
        """``histogram.observe(value)``, for a histogram without labels or a labelled one's child."""
        if self.immediate:
            histogram.observe(value)
            return
        pending = self._observed.get(histogram)
        if pending is None:
            pending = self._observed[histogram] = [0.0] * (len(histogram._upper_bounds) + 1)
        pending[0] += value
        # the first bucket whose bound is at least the value, as Histogram.observe picks it
        pending[1 + bisect_left(histogram._upper_bounds, value)] += 1

    def fold(self) -> None:
        """Add what was kept to the collectors."""
        with self.lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for histogram, pending in observed.items():
            histogram._sum.inc(pending[0])
            for bucket, n in zip(histogram._buckets, pending[1:], strict=True):
                if n:
                    bucket.inc(n)

    def describe(self) -> Iterable[Metric]:
        return ()  # no metric of its own (and the registry need not collect it to learn so)

    def collect(self) -> Iterable[Metric]:
        self.fold()
        return ()
