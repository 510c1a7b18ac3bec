"""The learned task router's cost: time to classify a prompt of about 200 tokens, alone and
with prompts arriving together (batched), and the held-out accuracy, on this machine.

    python bench/classifier.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.classifier import Encoders, RouteClassifier  # noqa: E402
from app.config import ClassifierConfig  # noqa: E402
from tests.route_prompts import HELD_OUT  # noqa: E402

#: about 200 tokens of a code question (the tokenizer counts 197)
PROMPT = (
    "I have a Python service that reads orders from a message queue, validates them against a JSON schema, "
    "enriches each one with customer data from PostgreSQL and writes the result to an S3 bucket. Under load the "
    "consumer falls behind: the queue grows to millions of messages and memory climbs until the process is killed. "
    "I use asyncio with aiohttp and asyncpg, one connection pool of twenty connections, and I acknowledge each "
    "message after the upload finishes. How should I restructure the consumer so that it keeps up, bounds its "
    "memory, and never loses or duplicates an order if it crashes halfway? Please show the code for the main loop, "
    "the batching of database lookups and the acknowledgement logic, and explain where backpressure belongs."
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(rounds: int) -> None:
    routes = ["code", "reasoning", "long", "fast"]
    started = time.perf_counter()
    encoders = Encoders()
    classifier = await RouteClassifier.open(ClassifierConfig(), "fast", routes, encoders)
    print(f"load: {time.perf_counter() - started:.1f} s")
    for _ in range(10):
        await classifier.classify(PROMPT)
    alone = []
    for _ in range(rounds):
        t = time.perf_counter()
        await classifier.classify(PROMPT)
        alone.append((time.perf_counter() - t) * 1000)
    print(f"one at a time, ~200 tokens: p50 {statistics.median(alone):.1f} ms, p95 {percentile(alone, 0.95):.1f} ms")
    for together in (8, 32):
        t = time.perf_counter()
        waves = max(1, rounds // together)
        for _ in range(waves):
            await asyncio.gather(*(classifier.classify(PROMPT) for _ in range(together)))
        per = (time.perf_counter() - t) * 1000 / (waves * together)
        print(f"{together} arriving together: {per:.1f} ms of model time per prompt")
    right = 0
    for prompt, label in HELD_OUT:
        decision = await classifier.classify(prompt)
        route = decision.route if decision is not None and decision.confident else "fast"
        right += route == ("fast" if label == "general" else label)
    print(f"held-out accuracy: {right}/{len(HELD_OUT)} = {right / len(HELD_OUT):.1%}")
    await encoders.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    asyncio.run(main(parser.parse_args().rounds))
