"""How the semantic cache's threshold was chosen: on the paraphrase and near-miss pairs of the
tests, the share of paraphrases served (a hit) and of near misses wrongly served, per threshold,
with and without the second check (numbers, negations, names, quoted strings, dates, languages).

    python bench/semantic_threshold.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.classifier import Encoders  # noqa: E402
from dataclasses import replace  # noqa: E402

from app.semantic import agree, features  # noqa: E402
from tests.semantic_pairs import NEAR_MISSES, PARAPHRASES  # noqa: E402

THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96)


def without_names(text: str):  # type: ignore[no-untyped-def]
    """The check as if it could not see names (a lower-cased prompt has none to see)."""
    return replace(features(text), entities=())


async def similarities(pairs: list[tuple[str, str]], encoders: Encoders) -> list[tuple[float, bool, bool]]:
    encoder = await encoders.get("all-MiniLM-L6-v2")
    out = []
    for a, b in pairs:
        va, vb = await asyncio.gather(encoder.encode(a), encoder.encode(b))
        out.append((float(va @ vb), agree(features(a), features(b)), agree(without_names(a), without_names(b))))
    return out


async def main() -> None:
    encoders = Encoders()
    para = await similarities(PARAPHRASES, encoders)
    near = await similarities(NEAR_MISSES, encoders)
    await encoders.aclose()
    print(f"{len(para)} paraphrase pairs, {len(near)} near-miss pairs")
    print("threshold  paraphrases served (checked / similarity only)  near misses served (checked / check blind to names / similarity only)")
    for t in THRESHOLDS:
        p_checked = sum(s >= t and ok for s, ok, _ in para)
        p_plain = sum(s >= t for s, _, _ in para)
        n_checked = sum(s >= t and ok for s, ok, _ in near)
        n_blind = sum(s >= t and blind for s, _, blind in near)
        n_plain = sum(s >= t for s, _, _ in near)
        print(f"{t:9.2f}  {p_checked:3d} / {p_plain:3d} of {len(para)}  ({p_checked / len(para):5.1%})          {n_checked:3d} / {n_blind:3d} / {n_plain:3d} of {len(near)}")
    print("paraphrases the check refuses:", [(round(s, 3), PARAPHRASES[i]) for i, (s, ok, _) in enumerate(para) if not ok])
    print("near misses that pass the check:", [(round(s, 3), NEAR_MISSES[i]) for i, (s, ok, _) in enumerate(near) if ok])
    print("near misses only names tell apart:", [(round(s, 3), NEAR_MISSES[i]) for i, (s, ok, blind) in enumerate(near) if blind and not ok])


if __name__ == "__main__":
    asyncio.run(main())
