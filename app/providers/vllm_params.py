"""How an OpenAI chat request becomes what the in-process vLLM engine is given.

Sampling values, ``logprobs``, ``logit_bias``, ``response_format`` and the tool fields are read
here; what the engine cannot serve is a 400 naming the field, never dropped. vLLM is imported only
inside functions (see ``vllm_engine``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import BadRequestError

#: vLLM's own default is 16 tokens, far too short for a chat answer
DEFAULT_MAX_TOKENS = 256

#: request field -> the JSON kind it must have; vLLM's own checks then bound the values
SAMPLING_FIELDS: dict[str, str] = {
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

#: OpenAI fields this engine has no way to serve, with what to say about each
UNSUPPORTED_FIELDS: dict[str, str] = {
    "audio": "audio output is not supported by this in-process vLLM provider",
    "prediction": "predicted outputs are not supported by this in-process vLLM provider",
    "web_search_options": "web search is not supported by this in-process vLLM provider",
    "functions": "the legacy 'functions' field is not supported: send 'tools'",
    "function_call": "the legacy 'function_call' field is not supported: send 'tool_choice'",
}

#: what OpenAI allows; the engine's own ``max_logprobs`` may be lower
MAX_TOP_LOGPROBS = 20

#: fields the vLLM request model checks for us (tool and structured-output validation)
_PLAN_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs")

_KNOWN_PARAMS = {*SAMPLING_FIELDS, "max_tokens", "max_completion_tokens", "logit_bias", "logprobs", "top_logprobs", *_PLAN_FIELDS}

ToolMode = Literal["off", "auto", "named", "required"]


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What a request asks of the engine beyond sampling: logprobs, tools and structured outputs."""

    #: top alternatives to report per token (0: the chosen one only); None: no logprobs
    logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    #: off: nothing is parsed out of the text; auto: the tool parser reads it; named/required:
    #: the text is a JSON tool call, forced by structured outputs
    mode: ToolMode = "off"
    function: str | None = None
    single_call: bool = False
    structured: Any = None
    #: the field the structured-outputs constraint came from, named when vLLM refuses it
    structured_param: str | None = None
    #: vLLM's own request object, handed to its tool parser
    vllm_request: Any = None


def check_kind(name: str, value: Any, kind: str) -> None:
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


def param_of(exc: BaseException, payload: dict[str, Any], plan: RequestPlan | None = None) -> str | None:
    """The request field a vLLM validation error is about, when it can be told."""
    candidates: list[str] = [str(getattr(exc, "parameter", None)), *re.findall(r"[a-z_]+", str(exc))[:1]]
    for name in candidates:
        if name == "max_tokens" and "max_completion_tokens" in payload:
            return "max_completion_tokens"
        if name == "logprobs" and payload.get("top_logprobs") is not None:
            return "top_logprobs"
        if name in _KNOWN_PARAMS:
            return name
        if name in ("input_tokens", "prompt"):
            return "messages"
    # a schema or grammar the structured-output backend cannot compile
    if plan is not None and plan.structured is not None and re.search(r"grammar|schema|json|structured", str(exc), re.IGNORECASE):
        return plan.structured_param
    return None


def reject_unsupported(payload: dict[str, Any]) -> None:
    for name, why in UNSUPPORTED_FIELDS.items():
        if payload.get(name) is not None:
            raise BadRequestError(why, param=name)
    modalities = payload.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequestError(f"only text output is supported by this in-process vLLM provider, not {modalities!r}", param="modalities")


def logprobs_wanted(payload: dict[str, Any]) -> int | None:
    """How many top alternatives to report per token (0: the chosen one only), or None for no logprobs."""
    wanted, top = payload.get("logprobs"), payload.get("top_logprobs")
    if wanted is not None:
        check_kind("logprobs", wanted, "bool")
    if top is not None:
        check_kind("top_logprobs", top, "int")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
        if not wanted:
            raise BadRequestError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    return (top or 0) if wanted else None


def logit_bias(payload: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's token-id strings -> bias, as the engine's token ids; values outside OpenAI's range are refused, not clamped."""
    bias = payload.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise BadRequestError(f"'logit_bias' must be an object of token id -> bias, got {bias!r}", param="logit_bias")
    out: dict[int, float] = {}
    for token, value in bias.items():
        if not (isinstance(token, str) and token.isascii() and token.isdigit()):
            raise BadRequestError(f"'logit_bias' keys must be token ids, got {token!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequestError(f"'logit_bias' values must be numbers between -100 and 100, got {value!r} for token {token}", param="logit_bias")
        out[int(token)] = float(value)
    return out


def plan_request(payload: dict[str, Any], provider: str, tool_parser: str | None) -> RequestPlan:
    """Check what needs no engine, the tool and structured-output fields as vLLM's own server does, and decide how to serve them.

    Needing no engine, a request the provider can never serve is a 400 even while the engine loads.
    """
    reject_unsupported(payload)
    logprobs = logprobs_wanted(payload)
    present = {k: payload[k] for k in _PLAN_FIELDS if payload.get(k) is not None}
    if not present:
        return RequestPlan(logprobs=logprobs)
    if "parallel_tool_calls" in present:
        # vLLM's request model would take "no" for False
        check_kind("parallel_tool_calls", present["parallel_tool_calls"], "bool")
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam, ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    try:
        # messages are rendered separately: only the fields above are checked here
        request = ChatCompletionRequest.model_validate({"model": provider, "messages": [], **present})
    except VLLMValidationError as exc:
        raise BadRequestError(str(exc.args[0]), param=exc.parameter or next(iter(present))) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else next(iter(present))
        raise BadRequestError(f"invalid '{field}': {error['msg']}", param=field) from None

    choice = request.tool_choice
    mode: ToolMode = "off"
    if request.tools and choice != "none":
        mode = "named" if isinstance(choice, ChatCompletionNamedToolChoiceParam) else "required" if choice == "required" else "auto"
    if mode != "off" and tool_parser is None:
        # as vLLM's own server: without a parser only tool_choice "none" can be served
        raise BadRequestError(
            f"provider {provider!r} has no tool-call parser configured (engine.tool_parser), so it serves 'tools' only with tool_choice 'none'",
            param="tools",
        )
    if mode in ("named", "required"):
        # the answer is the call itself, as JSON constrained by the tools' parameter schemas
        try:
            schema = get_json_schema_from_tools(tool_choice=choice, tools=request.tools, parallel_tool_calls=request.parallel_tool_calls)
        except (VLLMValidationError, ValueError) as exc:
            raise BadRequestError(str(exc.args[0]), param="tools") from None
        structured, structured_param = StructuredOutputsParams(json=schema), "tools"
    else:
        structured = request.extract_structured_outputs()
        structured_param = "response_format" if "response_format" in present else "structured_outputs"
    return RequestPlan(
        logprobs=logprobs,
        tools=payload.get("tools"),
        mode=mode,
        function=choice.function.name if mode == "named" else None,
        single_call=request.parallel_tool_calls is False,
        structured=structured,
        structured_param=structured_param,
        vllm_request=request,
    )


def sampling_params(engine: Any, payload: dict[str, Any], prompt_len: int, plan: RequestPlan, *, stream: bool, skip_special_tokens: bool) -> Any:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {}
    for field, kind in SAMPLING_FIELDS.items():
        value = payload.get(field)
        if value is not None:
            check_kind(field, value, kind)
            kwargs[field] = value
    kwargs["logprobs"] = plan.logprobs
    kwargs["logit_bias"] = logit_bias(payload)
    kwargs["structured_outputs"] = plan.structured

    context = engine.model_config.max_model_len
    room = context - prompt_len
    if room < 1:
        # coded as OpenAI codes it: failover tries the model's next deployment, which may have room
        raise BadRequestError(f"the prompt is {prompt_len} tokens, which leaves no room in the model's {context}-token context", param="messages", code="context_length_exceeded")
    limit_field = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    limit = payload.get(limit_field)
    if limit is None:
        kwargs["max_tokens"] = min(DEFAULT_MAX_TOKENS, room)
    else:
        check_kind(limit_field, limit, "int")
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
        return SamplingParams(**kwargs, output_kind=output_kind, skip_special_tokens=skip_special_tokens)
    except (VLLMClientError, ValueError, TypeError) as exc:
        raise BadRequestError(str(exc), param=param_of(exc, payload, plan)) from None
