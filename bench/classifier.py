"""The learned task router's cost: time to classify a prompt of over 200 tokens, alone and
with prompts arriving together, its parts (tokenizer, model), the semantic cache's longer window,
and the held-out accuracy, on this machine.

    flock /tmp/bench.lock taskset -c 1 python bench/classifier.py [--rounds 200]

Wall-clock times grow with the machine's load (printed before and after); the CPU time per
prompt (the process's, for one classification) barely does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.classifier import MAX_TOKENS, ROUTE_TOKENS, Encoders, RouteClassifier
from app.config import ClassifierConfig
from tests.route_prompts import HELD_OUT

#: a code question of over 200 tokens (the count is printed)
PROMPT = (
    "I have a Python service that reads orders from a message queue, validates them against a JSON schema, "
    "enriches each one with customer data from PostgreSQL and writes the result to an S3 bucket. Under load the "
    "consumer falls behind: the queue grows to millions of messages and memory climbs until the process is killed. "
    "I use asyncio with aiohttp and asyncpg, one connection pool of twenty connections, and I acknowledge each "
    "message after the upload finishes. How should I restructure the consumer so that it keeps up, bounds its "
    "memory, and never loses or duplicates an order if it crashes halfway? Please show the code for the main loop, "
    "the batching of database lookups and the acknowledgement logic, and explain where backpressure belongs. "
    "The service runs on Kubernetes with three replicas behind a horizontal pod autoscaler, and each replica "
    "must shut down cleanly within thirty seconds when the cluster drains a node during an upgrade."
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(wall: list[float], cpu: list[float]) -> str:
    return f"p50 {statistics.median(wall):.2f} ms, p90 {percentile(wall, 0.9):.2f} ms (CPU p50 {statistics.median(cpu):.2f} ms)"


def blocking(rounds: int, step: Callable[[], object]) -> str:
    """Times ``step`` in this thread: wall clock and this thread's CPU time."""
    wall, cpu = [], []
    for _ in range(rounds):
        c, t = time.thread_time(), time.perf_counter()
        step()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return summary(wall, cpu)


def load() -> str:
    return Path("/proc/loadavg").read_text().strip()


async def main(rounds: int) -> None:
    print(f"load average: {load()}")
    routes = ["code", "reasoning", "long", "fast"]
    started = time.perf_counter()
    encoders = Encoders()
    classifier = await RouteClassifier.open(ClassifierConfig(), "fast", routes, encoders)
    encoder = encoders.loaded(ClassifierConfig().model).encoder
    print(f"load: {time.perf_counter() - started:.1f} s ({encoder.dtype}, ONNX Runtime, one thread)")
    print(f"the prompt: {len(encoder.tokenize([PROMPT], 100_000)['input_ids'][0])} tokens")
    inputs = encoder.tokenize([PROMPT], ROUTE_TOKENS)
    for _ in range(10):
        await classifier.classify(PROMPT)
    print(f"tokenizer, {ROUTE_TOKENS} tokens: {blocking(rounds, lambda: encoder.tokenize([PROMPT], ROUTE_TOKENS))}")
    print(f"model, {ROUTE_TOKENS} tokens: {blocking(rounds, lambda: encoder.run(inputs))}")
    wall, cpu = [], []
    for _ in range(rounds):
        c, t = time.process_time(), time.perf_counter()
        await classifier.classify(PROMPT)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    print(f"classify one at a time, the whole prompt (reads {ROUTE_TOKENS}): {summary(wall, cpu)}")
    print(f"encode for the semantic cache ({MAX_TOKENS} tokens): {blocking(rounds, lambda: encoder.encode([PROMPT], MAX_TOKENS))}")
    for together in (8, 32):
        t = time.perf_counter()
        waves = max(1, rounds // together)
        for _ in range(waves):
            await asyncio.gather(*(classifier.classify(PROMPT) for _ in range(together)))
        per = (time.perf_counter() - t) * 1000 / (waves * together)
        print(f"{together} arriving together: {per:.1f} ms per prompt")
    right = 0
    for prompt, label in HELD_OUT:
        decision = await classifier.classify(prompt)
        route = decision.route if decision is not None and decision.confident else "fast"
        right += route == ("fast" if label == "general" else label)
    print(f"held-out accuracy: {right}/{len(HELD_OUT)} = {right / len(HELD_OUT):.1%}")
    await encoders.aclose()
    print(f"load average: {load()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    asyncio.run(main(parser.parse_args().rounds))
