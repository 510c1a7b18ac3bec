"""Recent measured latency per deployment, for ``strategy: latency`` and for operators."""

from __future__ import annotations

from collections.abc import Iterable

from app.pipeline.base import Deployment


class LatencyTracker:
    """An EWMA of each configured deployment's latency (whole answer, or first chunk of a stream).

    In-process: each replica orders by what it measured itself. Read API: ``latency(deployment)``
    (seconds, None until measured) and ``snapshot()`` (deployment text → seconds).
    """

    def __init__(self, deployments: Iterable[Deployment], alpha: float = 0.3) -> None:
        self._alpha = alpha
        self._tracked = {str(d) for d in deployments}
        self._ewma: dict[str, float] = {}

    def observe(self, deployment: Deployment, seconds: float) -> None:
        key = str(deployment)
        if key not in self._tracked:
            return
        old = self._ewma.get(key)
        self._ewma[key] = seconds if old is None else old + self._alpha * (seconds - old)

    def latency(self, deployment: Deployment) -> float | None:
        return self._ewma.get(str(deployment))

    def snapshot(self) -> dict[str, float]:
        return dict(self._ewma)

    def order(self, deployments: list[Deployment]) -> list[Deployment]:
        """Fastest first; a deployment not measured yet goes first so it gets measured; ties keep config order."""
        rank = {d: i for i, d in enumerate(deployments)}
        return sorted(deployments, key=lambda d: (self._ewma.get(str(d), 0.0), rank[d]))
