"""Legacy text completions (``/v1/completions``) on the in-process vLLM engine: what a request asks
of the engine, and the engine's outputs as ``text_completion`` choices and events.

A request's prompts (a text, texts, a token array or several) each become one engine request with
``n`` samples; choice ``i * n + j`` is sample ``j`` of prompt ``i``, as in OpenAI's API. ``echo``
puts the prompt before the answer (with ``logprobs``, the prompt's tokens are scored too: the
first has no logprob, ``null``). vLLM is imported only inside functions (see ``vllm_engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import BadRequestError
from app.providers.vllm_params import MAX_TOP_LOGPROBS, RequestPlan, check_kind

#: OpenAI's default for a legacy completion (a chat answer gets vllm_params.DEFAULT_MAX_TOKENS)
TEXT_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class TextRequest:
    """A completions request as the engine serves it."""

    #: the body with ``max_tokens`` filled in
    payload: dict[str, Any]
    plan: RequestPlan
    #: per prompt: ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``, for the engine's renderer
    prompts: list[dict[str, Any]]
    echo: bool
    n: int


def text_request(payload: dict[str, Any], provider: str) -> TextRequest:
    """Check what needs no engine (a request it can never serve is a 400 even while it loads)."""
    if payload.get("suffix"):
        raise BadRequestError(f"'suffix' (fill in the middle) is not supported by the in-process vLLM provider {provider!r}", param="suffix")
    n = payload.get("n")
    if n is not None:
        check_kind("n", n, "int")
    best_of = payload.get("best_of")
    if best_of is not None:
        check_kind("best_of", best_of, "int")
        if best_of != (n or 1):
            raise BadRequestError(f"'best_of' larger than 'n' is not supported by the in-process vLLM provider {provider!r}", param="best_of")
    echo = payload.get("echo")
    if echo is not None:
        check_kind("echo", echo, "bool")
    logprobs = payload.get("logprobs")
    if logprobs is not None:
        check_kind("logprobs", logprobs, "int")
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}", param="logprobs")
    if payload.get("max_tokens") is None:
        payload = {**payload, "max_tokens": TEXT_DEFAULT_MAX_TOKENS}
    return TextRequest(payload=payload, plan=RequestPlan(logprobs=logprobs), prompts=_prompts(payload.get("prompt")), echo=bool(echo), n=n or 1)


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if _is_tokens(prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p} for p in prompt]
        if all(_is_tokens(p) for p in prompt):
            return [{"prompt_token_ids": p} for p in prompt]
    raise BadRequestError("'prompt' must be a string, a list of strings, a token array or a list of token arrays", param="prompt")


@dataclass(slots=True)
class TextChoice:
    """One choice as it is written: its text so far (for ``text_offset``), whether the prompt went out."""

    index: int
    offset: int = 0
    echoed: bool = False


class TextWriter:
    """Turns engine outputs into ``text_completion`` choices: a delta at a time (streaming) or whole."""

    def __init__(self, request: TextRequest, tokenizer: Any, prompt_texts: list[str]) -> None:
        self._request = request
        self._tokenizer = tokenizer
        self._prompt_texts = prompt_texts
        self._choices: dict[int, TextChoice] = {}

    def piece(self, prompt_index: int, output: Any, out: Any) -> tuple[int, str, dict[str, Any] | None]:
        """(choice index, text, logprobs) for what ``out`` (one sample of ``output``) brought."""
        request = self._request
        index = prompt_index * request.n + out.index
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = TextChoice(index)
        text = out.text
        token_ids: list[int] = list(out.token_ids)
        logprobs: list[Any] = list(out.logprobs or ()) if request.plan.logprobs is not None else []
        if request.echo and not choice.echoed:
            choice.echoed = True
            text = self._prompt_texts[prompt_index] + text
            token_ids = [*output.prompt_token_ids, *token_ids]
            if request.plan.logprobs is not None:
                logprobs = [*(output.prompt_logprobs or [None] * len(output.prompt_token_ids)), *logprobs]
        entries = self._logprobs(choice, token_ids, logprobs) if request.plan.logprobs is not None else None
        return index, text, entries

    def _logprobs(self, choice: TextChoice, token_ids: list[int], steps: list[Any]) -> dict[str, Any]:
        top = self._request.plan.logprobs or 0
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, step in zip(token_ids, steps, strict=False):
            chosen = step.get(token_id) if step else None
            token = self._decoded(token_id, chosen)
            tokens.append(token)
            offsets.append(choice.offset)
            choice.offset += len(token)
            if step is None:
                # the prompt's first token: nothing came before it to score it by
                values.append(None)
                tops.append(None)
                continue
            values.append(_floor(chosen.logprob) if chosen is not None else None)
            ranked = sorted((a for a in step.items() if a[0] == token_id or (a[1].rank is not None and a[1].rank <= top)), key=lambda a: a[1].rank or 0)
            tops.append({self._decoded(tid, lp): _floor(lp.logprob) for tid, lp in ranked})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _decoded(self, token_id: int, logprob: Any) -> str:
        token = logprob.decoded_token if logprob is not None else None
        if token is None:
            token = self._tokenizer.decode([token_id])
        return str(token)


def _floor(value: float) -> float:
    # vLLM's floor for -inf, which JSON cannot carry
    return max(value, -9999.0)


def text_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
