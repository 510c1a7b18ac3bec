"""``GET /metrics``: every PRODUCT.md metric after real traffic, multiprocess mode, and the ops files
(alert rules through promtool, the dashboard's queries against a real Prometheus)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_upstream import FakeUpstream
from tests.serve import serve
from tests.support import GatewayServer, free_port, gateway

ROOT = Path(__file__).resolve().parent.parent
AGENT_KEY = "sk-agent-metrics-0001"
TIGHT_KEY = "sk-agent-tight-00001"

#: PRODUCT.md "Metrics", as the sample names Prometheus stores
PRODUCT_SAMPLES = {
    "admiral_requests_total",
    "admiral_request_duration_seconds_bucket",
    "admiral_upstream_duration_seconds_bucket",
    "admiral_time_to_first_token_seconds_bucket",
    "admiral_overhead_seconds_bucket",
    "admiral_cache_hits_total",
    "admiral_cache_misses_total",
    "admiral_dedupe_coalesced_total",
    "admiral_ratelimit_rejections_total",
    "admiral_circuit_state",
    "admiral_backend_up",
    "admiral_tokens_total",
    "admiral_inflight_requests",
    "admiral_retries_total",
    "admiral_failovers_total",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def dead_url() -> str:
    dead = FakeUpstream()
    dead.start()
    url = dead.base_url
    dead.stop()  # nothing listens there any more
    return url


def traffic_config(up: FakeUpstream) -> str:
    return f"""
keys:
  - {{key: {AGENT_KEY}, agent: quality}}
  - {{key: {TIGHT_KEY}, agent: tight, rpm: 1}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: k, timeout_s: 5}}
  dead: {{kind: openai, base_url: "{dead_url()}", api_key: k, timeout_s: 2}}
  demo: {{kind: demo}}
models:
  fast: [dead/m, up/fake-model]
  solid: [up/fake-model]
  demo: [demo/echo]
retry: {{attempts: 1}}
circuit_breaker: {{failure_threshold: 2}}
"""


def drive(gw: GatewayServer, upstream: FakeUpstream, tag: str = "") -> None:
    """Plain, stream, a cache hit, coalesced duplicates, failovers, a rate-limit refusal, a 5xx."""
    agent = {"Authorization": f"Bearer {AGENT_KEY}"}

    def ask(content: str, *, model: str = "solid", key: dict[str, str] = agent, **extra: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content + tag}], **extra}
        return httpx.post(f"{gw.base_url}/chat/completions", headers=key, json=body, timeout=30)

    assert ask("plain").status_code == 200
    assert ask("plain").headers["x-admiral-cache"] == "hit"
    assert ask("stream", stream=True, stream_options={"include_usage": True}).status_code == 200
    assert ask("demo", model="demo").status_code == 200
    for i in range(3):
        assert ask(f"failover {i}", model="fast").headers["x-admiral-backend"] == "up"
    tight = {"Authorization": f"Bearer {TIGHT_KEY}"}
    codes = [ask(f"tight {i}", key=tight).status_code for i in range(2)]
    assert codes[-1] == 429  # rpm 1: the second in a minute is refused
    upstream.latency = 0.3
    threads = [threading.Thread(target=ask, args=("same",)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    upstream.latency = 0.0
    upstream.script(["500"])
    assert ask("fails").status_code == 502


def test_every_product_metric_after_traffic(upstream: FakeUpstream) -> None:
    with gateway(traffic_config(upstream)) as gw:
        drive(gw, upstream)
        r = httpx.get(f"{gw.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(r.text)
    names = {name for name, _ in found}
    assert PRODUCT_SAMPLES <= names, sorted(PRODUCT_SAMPLES - names)
    assert value(found, "admiral_cache_hits_total") >= 1
    assert value(found, "admiral_dedupe_coalesced_total") >= 1
    assert value(found, "admiral_failovers_total", from_backend="dead") >= 1
    assert value(found, "admiral_ratelimit_rejections_total", scope="agent") == 1
    assert value(found, "admiral_requests_total", status="429", agent="tight") == 1
    assert value(found, "admiral_requests_total", status="502") == 1
    assert value(found, "admiral_circuit_state", backend="dead") == 2
    assert value(found, "admiral_backend_up", backend="dead") == 0
    assert value(found, "admiral_backend_up", backend="up") == 1
    assert value(found, "admiral_time_to_first_token_seconds_count", backend="up") == 1
    assert value(found, "admiral_tokens_total", agent="quality", backend="up", direction="completion") > 0
    assert value(found, "admiral_inflight_requests") == 0
    # bounded labels: no request ids, keys or prompts anywhere
    assert AGENT_KEY not in r.text and "plain" not in r.text


def test_overhead_is_request_minus_upstream(upstream: FakeUpstream) -> None:
    upstream.latency = 0.2
    with gateway(traffic_config(upstream)) as gw:
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "solid", "messages": [{"role": "user", "content": "timed"}]})
        assert r.status_code == 200
        found = samples(httpx.get(f"{gw.url}/metrics").text)
    total = value(found, "admiral_request_duration_seconds_sum")
    upstream_s = value(found, "admiral_upstream_duration_seconds_sum")
    overhead = value(found, "admiral_overhead_seconds_sum")
    assert upstream_s >= 0.2
    assert value(found, "admiral_overhead_seconds_count") == 1
    assert overhead == pytest.approx(total - upstream_s, abs=1e-6)


def test_multiprocess_workers_share_one_view(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"keys: [{{key: {AGENT_KEY}, agent: quality}}]\nproviders: {{demo: {{kind: demo}}}}\nmodels: {{demo: [demo/echo]}}\ndatabase: {{url: 'sqlite+aiosqlite:///{tmp_path}/mp.db'}}\n")
    with serve(config, workers=2) as gw:
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {AGENT_KEY}"}) as client:
            for i in range(12):
                assert client.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": f"n{i}"}]}).status_code == 200
        # whichever worker answers the scrape, it reports every worker's counts
        for _ in range(4):
            with httpx.Client(base_url=gw.url) as fresh:
                found = samples(fresh.get("/metrics").text)
            assert value(found, "admiral_requests_total", agent="quality", status="200") == 12
            assert value(found, "admiral_request_duration_seconds_count") == 12
            assert ("admiral_inflight_requests", ()) in found


def test_dashboard_json_is_generated_from_its_builder() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "grafana" / "build_dashboard.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian: apt-get install prometheus)")
    return path


@pytest.mark.prometheus
def test_alert_rules_pass_promtool() -> None:
    promtool = _need("promtool")
    r = subprocess.run([promtool, "check", "rules", str(ROOT / "prometheus" / "alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", str(ROOT / "prometheus" / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[object]:
    binary = _need("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{ROOT / 'prometheus' / 'alerts.yml'}']\n"
            f"scrape_configs: [{{job_name: admiral-optimizer, static_configs: [{{targets: ['{target}']}}]}}]\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        args = [binary, f"--config.file={config}", f"--storage.tsdb.path={tempfile.mkdtemp(dir=tmp_path)}", f"--web.listen-address=127.0.0.1:{port}"]
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError((tmp_path / "prometheus.log").read_text())
            time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def panels_without_numbers(prom: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("check_dashboard", ROOT / "grafana" / "check_dashboard.py")
    assert spec is not None and spec.loader is not None
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "admiral-optimizer.json").read_text())
    empty = []
    for row, panel in checker.iter_panels(dashboard["panels"]):
        numbers = []
        for t in panel["targets"]:
            result = httpx.get(f"{prom}/api/v1/query", params={"query": checker.substitute(t["expr"])}).json()["data"]["result"]
            numbers += [float(series["value"][1]) for series in result]
        if not any(math.isfinite(n) for n in numbers):
            empty.append(f"{row} / {panel['title']}")
    return empty


def _scrapes(prom: str) -> int:
    result = httpx.get(f"{prom}/api/v1/query", params={"query": 'count_over_time(up{job="admiral-optimizer"}[1m])'}).json()["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


@pytest.mark.prometheus
def test_dashboard_queries_return_data_on_a_real_prometheus(upstream: FakeUpstream, prometheus_for: object) -> None:
    with gateway(traffic_config(upstream)) as gw:
        prom = prometheus_for(f"127.0.0.1:{gw.port}")  # type: ignore[operator]
        drive(gw, upstream, " first")
        deadline = time.monotonic() + 30
        while _scrapes(prom) < 2:
            assert time.monotonic() < deadline, "Prometheus did not scrape the gateway"
            time.sleep(0.2)
        start = _scrapes(prom)
        drive(gw, upstream, " second")  # between scrapes, so every rate() sees an increase
        while _scrapes(prom) < start + 2:
            assert time.monotonic() < deadline + 30, "Prometheus stopped scraping"
            time.sleep(0.2)
        r = subprocess.run([sys.executable, str(ROOT / "grafana" / "check_dashboard.py"), prom], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "FAIL" not in r.stdout and "EMPTY" not in r.stdout
        # stricter than the checker: every panel shows at least one real number (no NaN-only quantiles)
        assert not panels_without_numbers(prom), r.stdout
        rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
        assert {rule["name"] for g in rules for rule in g["rules"]} == {"AdmiralCacheDegraded", "AdmiralBackendDown", "AdmiralAllBackendsDown", "AdmiralHighErrorRate", "AdmiralRateLimiting", "AdmiralStateDegraded"}
        assert all(rule["health"] == "ok" for g in rules for rule in g["rules"]), json.dumps(rules)


def test_the_tally_folds_into_the_same_samples_as_direct_updates() -> None:
    """What the recorder keeps in plain numbers reads, once the registry is read, as the updates made one by one."""
    from prometheus_client import generate_latest

    from app.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, Metrics

    values = [0.0, 0.0001, *LATENCY_BUCKETS, *OVERHEAD_BUCKETS, 0.0123, 119.9, 500.0]
    direct, tallied = Metrics(), Metrics()
    for v in values:
        direct.request_duration.observe(v)
        direct.upstream_duration.labels("b1").observe(v)
        direct.overhead.observe(v)
        direct.requests.labels("a", "m", "b1", "200", "hit", "chat").inc()
        direct.tokens.labels("a", "b1", "prompt").inc(7)
        with tallied.tally.lock:
            tallied.tally.observe(tallied.request_duration, v)
            tallied.tally.observe(tallied.upstream_duration.labels("b1"), v)
            tallied.tally.observe(tallied.overhead, v)
            tallied.tally.add(tallied.requests.labels("a", "m", "b1", "200", "hit", "chat"))
            tallied.tally.add(tallied.tokens.labels("a", "b1", "prompt"), 7)

    def lines(metrics: Metrics) -> list[str]:
        return [line for line in generate_latest(metrics.registry).decode().splitlines() if "_created" not in line]

    assert lines(tallied) == lines(direct)
    assert tallied.registry.get_sample_value("admiral_requests_total", {"agent": "a", "model": "m", "backend": "b1", "status": "200", "cache": "hit", "endpoint": "chat"}) == len(values)
    with pytest.raises(ValueError):
        tallied.tally.add(tallied.cache_hits, -1)  # refused at once, as Counter.inc refuses it
