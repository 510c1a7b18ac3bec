"""What the embeddings endpoint costs: a batch asked of the demo provider, then answered from the per-item cache.

    .venv/bin/python bench/embeddings.py [--items 100] [--dimensions 1536] [--rounds 30]

One gateway in this process (embedded default: SQLite, in-process state, the demo provider) on a
loopback port; sequential requests from httpx, median wall time per request as the client sees
it (the client's own time included, the JSON not parsed). Figures go to README.md (Embeddings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--dimensions", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    config = {"providers": {"demo": {"kind": "demo"}}, "models": {"vectors": ["demo/embed"]}}
    texts = [f"document number {i} about the fleet" for i in range(args.items)]
    body = {"model": "vectors", "input": texts, "dimensions": args.dimensions}
    with gateway(config) as gw, httpx.Client(timeout=60) as http:
        url = gw.base_url + "/embeddings"

        def median_ms(payload: dict[str, object], headers: dict[str, str] | None = None, rounds: int = args.rounds) -> tuple[float, httpx.Response]:
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                response = http.post(url, json=payload, headers=headers or {})
                times.append(time.perf_counter() - started)
                response.raise_for_status()
            return statistics.median(times) * 1000, response

        shape = f"{args.items} x {args.dimensions}"
        ms, _ = median_ms({**body, "encoding_format": "base64"}, {"Cache-Control": "no-cache, no-store"}, rounds=max(3, args.rounds // 3))
        print(f"uncached (the demo provider computes {shape}), base64: {ms:.1f} ms")
        http.post(url, json=body).raise_for_status()
        for encoding in ("base64", "float"):
            ms, response = median_ms({**body, "encoding_format": encoding})
            print(f"cached {shape}, {encoding}: {ms:.1f} ms, {len(response.content)} bytes ({response.headers['x-admiral-cache']})")
        ms, _ = median_ms({"model": "vectors", "input": texts[0], "dimensions": args.dimensions, "encoding_format": "base64"}, rounds=args.rounds * 3)
        print(f"cached 1 x {args.dimensions}, base64: {ms:.2f} ms")


if __name__ == "__main__":
    main()
