"""Answers shaped like real providers' ones: a plain ``chat.completion`` and the chunks streamed for it.

Each :class:`ProviderAnswer` holds

- ``completion`` (P): the ``chat.completion`` the provider answers a plain request with;
- ``chunks`` (C): the ``chat.completion.chunk`` list the same provider streams for the same answer
  when asked ``stream_options.include_usage`` (its last chunk has ``choices: []`` and the usage;
  :func:`tests.fake_upstream.streamed_as` gives the stream without it);
- ``request``: the request fields that would make a provider answer so (``n``, ``logprobs``, tools).

P and C are written out independently, the way each provider sends them (C is not derived from P):
the self-check in ``tests/test_fidelity.py`` proves ``fold(C) == P`` modulo :func:`normalise`.

The comparison rules, defined once here and used by every fidelity test:

- :func:`fold` is the reference fold of a chunk stream into a ``chat.completion``: deltas are
  accumulated into the message (strings concatenated; ``role``, ``id`` and ``type`` set, not
  concatenated; dicts merged the same way; tool calls merged by their ``index``, which the whole
  message does not carry), ``logprobs`` lists concatenated, and every other field of a choice or of
  the chunk itself taken from the latest chunk that has it not null. ``object`` becomes
  ``chat.completion``; ``obfuscation`` (OpenAI's per-chunk padding) is not part of the answer.
- :func:`normalise` is the only leniency: a key whose value is ``null`` is the same as an absent
  key, and so is ``annotations: []`` (OpenAI's plain message has it, its stream never says it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.fake_upstream import streamed_as


@dataclass(frozen=True)
class ProviderAnswer:
    name: str
    completion: dict[str, Any]
    chunks: list[dict[str, Any]]
    request: dict[str, Any] = field(default_factory=dict)
    about: str = ""


# -- the comparison rules ------------------------------------------------------------------------

#: delta keys whose value replaces the one before instead of being appended to
_SET_KEYS = frozenset({"role", "id", "type"})


def normalise(value: Any) -> Any:
    """``value`` with every ``null``-valued key dropped, and ``annotations: []`` too (see module doc)."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if v is not None and not (k == "annotations" and v == [])}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def _accumulate(into: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if key == "tool_calls" and isinstance(value, list):
            calls = into.setdefault("tool_calls", {})
            if not isinstance(calls, dict):  # a null before
                calls = into["tool_calls"] = {}
            for piece in value:
                slot = calls.setdefault(piece["index"], {})
                _accumulate(slot, {k: v for k, v in piece.items() if k != "index"})
            continue
        current = into.get(key)
        if value is None:
            into.setdefault(key, None)
        elif current is None or key in _SET_KEYS:
            into[key] = _copy(value)
        elif isinstance(current, str) and isinstance(value, str):
            into[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            _accumulate(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            current.extend(_copy(value))
        else:
            into[key] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge_logprobs(into: dict[str, Any] | None, logprobs: dict[str, Any]) -> dict[str, Any]:
    into = {} if into is None else into
    for key, value in logprobs.items():
        if isinstance(value, list):
            current = into.get(key)
            into[key] = (current if isinstance(current, list) else []) + _copy(value)
        elif value is not None or key not in into:
            into[key] = _copy(value)
    return into


def fold(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The reference fold of a ``chat.completion.chunk`` stream into one ``chat.completion``."""
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            if key in ("object", "choices", "obfuscation"):
                continue
            if value is not None or key not in top:
                top[key] = _copy(value)
        for choice in chunk.get("choices") or ():
            state = choices.setdefault(choice["index"], {"index": choice["index"], "message": {}, "logprobs": None, "finish_reason": None})
            for key, value in choice.items():
                if key == "index":
                    continue
                if key == "delta":
                    _accumulate(state["message"], value or {})
                elif key == "logprobs":
                    if value is not None:
                        state["logprobs"] = _merge_logprobs(state["logprobs"], value)
                elif value is not None or key not in state:
                    state[key] = _copy(value)
    for state in choices.values():
        calls = state["message"].get("tool_calls")
        if isinstance(calls, dict):
            state["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {**top, "object": "chat.completion", "choices": [choices[i] for i in sorted(choices)]}


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where ``got`` and ``want`` differ, one line per place (for assertion messages)."""
    if isinstance(got, dict) and isinstance(want, dict):
        out: list[str] = []
        for key in [*want, *(k for k in got if k not in want)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in got:
                out.append(f"{where}: missing (want {_short(want[key])})")
            elif key not in want:
                out.append(f"{where}: unexpected {_short(got[key])}")
            else:
                out += differences(got[key], want[key], where)
        return out
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, want {len(want)}: {_short(got)} != {_short(want)}"]
        return [line for n, (g, w) in enumerate(zip(got, want, strict=True)) for line in differences(g, w, f"{path}[{n}]")]
    return [] if got == want else [f"{path}: {_short(got)} != {_short(want)}"]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def assert_same(got: Any, want: Any, what: str) -> None:
    """``got == want``, or an AssertionError listing the differences."""
    if got != want:
        lines = differences(got, want)
        shown = "\n  ".join(lines[:12]) + (f"\n  ... {len(lines) - 12} more" if len(lines) > 12 else "")
        raise AssertionError(f"{what} differs:\n  {shown}")


def expected(answer: ProviderAnswer, *, include_usage: bool = True) -> dict[str, Any]:
    """P as a stream folds to, normalised: without ``usage`` when the stream did not include it."""
    completion = answer.completion
    if not include_usage:
        completion = {k: v for k, v in completion.items() if k != "usage"}
    return normalise(completion)


def client_chunks(answer: ProviderAnswer, *, include_usage: bool) -> list[dict[str, Any]]:
    """The chunks a client streaming straight from the provider receives."""
    return streamed_as(answer.chunks, include_usage)


def stream_problems(chunks: list[dict[str, Any]], *, include_usage: bool, choices: int) -> list[str]:
    """What makes ``chunks`` not a valid ``chat.completion.chunk`` stream (empty: valid).

    Valid: every event is a chunk with an ``id``, ``created`` and ``model``, one ``id`` for all;
    the first has choices; each of ``choices`` choice indexes appears, its first delta says
    ``role: assistant`` and no later one has a role, it gets exactly one ``finish_reason``, in its
    last appearance; a usage chunk (``choices: []`` and a ``usage``) comes last iff
    ``include_usage``, and no other chunk has a non-null ``usage``.
    """
    problems: list[str] = []
    if not chunks:
        return ["no chunks"]
    for n, chunk in enumerate(chunks):
        if chunk.get("object") != "chat.completion.chunk":
            problems.append(f"chunk {n}: object is {chunk.get('object')!r}")
        for key in ("id", "created", "model"):
            if key not in chunk:
                problems.append(f"chunk {n}: no {key}")
    if len({c.get("id") for c in chunks}) != 1:
        problems.append(f"chunk ids differ: {sorted({str(c.get('id')) for c in chunks})}")
    if not chunks[0].get("choices"):
        problems.append("the first chunk has no choices")
    seen: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for n, chunk in enumerate(chunks):
        for choice in chunk.get("choices") or ():
            seen.setdefault(choice.get("index"), []).append((n, choice))
    indexes = sorted(seen, key=repr)
    if indexes != list(range(choices)):
        problems.append(f"choice indexes {indexes}, want {list(range(choices))}")
    for index, appearances in seen.items():
        roles = [(n, (c.get("delta") or {}).get("role")) for n, c in appearances]
        if roles[0][1] != "assistant":
            problems.append(f"choice {index}: first delta (chunk {roles[0][0]}) has role {roles[0][1]!r}")
        if any(role is not None for _, role in roles[1:]):
            problems.append(f"choice {index}: a role after its first delta")
        finishes = [n for n, c in appearances if c.get("finish_reason")]
        if len(finishes) != 1:
            problems.append(f"choice {index}: {len(finishes)} finish_reasons")
        elif finishes[0] != appearances[-1][0]:
            problems.append(f"choice {index}: deltas after its finish_reason")
    usage_chunks = [n for n, c in enumerate(chunks) if c.get("usage") is not None]
    if include_usage:
        last = chunks[-1]
        if last.get("choices") != [] or last.get("usage") is None:
            problems.append("include_usage, but the last chunk is not a usage chunk (choices: [] and usage)")
        if usage_chunks != [len(chunks) - 1]:
            problems.append(f"usage on chunks {usage_chunks}, want only the last")
    else:
        if usage_chunks:
            problems.append(f"no include_usage, but usage on chunks {usage_chunks}")
        if any(c.get("choices") == [] for c in chunks):
            problems.append("no include_usage, but a chunk without choices")
    return problems


# -- the OpenAI SDK's view -----------------------------------------------------------------------


def sdk_fold(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``chunks`` accumulated by the OpenAI SDK's ``ChatCompletionStreamState`` (its snapshot, as a dict).

    The snapshot, not ``get_final_completion()``: that one raises on ``finish_reason: length`` and
    leaves out tool calls that are not of type ``function``.
    """
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for chunk in chunks:
        for _ in state.handle_chunk(ChatCompletionChunk.construct(**chunk)):
            pass
    return state.current_completion_snapshot.to_dict()


def sdk_view(completion: dict[str, Any]) -> dict[str, Any]:
    """What of a completion the SDK's accumulator keeps, normalised.

    The SDK takes the top level from the first chunk (``usage`` and ``system_fingerprint`` from the
    last), a choice's own fields from its first chunk, and leaves ``index`` in the tool calls; so
    the view is the top-level ``id``, ``model``, ``created``, ``service_tier``,
    ``system_fingerprint``, ``usage``, and per choice ``index``, ``finish_reason``, ``logprobs`` and
    the whole message (tool calls without ``index``).
    """
    top = {k: completion.get(k) for k in ("id", "model", "created", "service_tier", "system_fingerprint", "usage")}
    choices = []
    for choice in completion.get("choices") or ():
        message = {k: v for k, v in (choice.get("message") or {}).items() if k != "parsed"}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in message["tool_calls"]]
        choices.append({"index": choice.get("index"), "finish_reason": choice.get("finish_reason"), "logprobs": choice.get("logprobs"), "message": message})
    return normalise({**top, "choices": choices})


# -- the answers ---------------------------------------------------------------------------------


def _lp(token: str, logprob: float, *alternatives: tuple[str, float]) -> dict[str, Any]:
    """One OpenAI token logprob, with ``top_logprobs`` (the token itself first)."""
    top = [(token, logprob), *alternatives]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
    }


def _choice(index: int, delta: dict[str, Any], *, finish: str | None = None, logprobs: Any = None, **extra: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}


# (a) OpenAI, gpt-4o, with logprobs (top_logprobs: 2), system_fingerprint, service_tier, detailed usage

_A_ID = "chatcmpl-BQ8x1fVb4cWzNtQ2oR7sTj9kLmPaE"
_A_HEAD = {
    "id": _A_ID,
    "object": "chat.completion.chunk",
    "created": 1745930101,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_f5bdcc3276",
    "usage": None,
}
_A_TOKENS = [
    _lp("Hello", -0.0001, ("Hi", -9.2)),
    _lp(" there", -0.31, ("!", -1.4)),
    _lp(",", -0.0021, (" friend", -6.8)),
    _lp(" friend", -0.74, (" traveler", -1.9)),
    _lp("!", -0.0005, (".", -7.7)),
]
_A_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 5,
    "total_tokens": 24,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}

OPENAI_LOGPROBS = ProviderAnswer(
    name="openai-logprobs",
    about="OpenAI gpt-4o with logprobs, system_fingerprint, service_tier, usage details, refusal: null, annotations: []",
    request={"logprobs": True, "top_logprobs": 2},
    completion={
        "id": _A_ID,
        "object": "chat.completion",
        "created": 1745930101,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, friend!", "refusal": None, "annotations": []},
                "logprobs": {"content": _A_TOKENS, "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": _A_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_f5bdcc3276",
    },
    chunks=[
        {**_A_HEAD, "choices": [_choice(0, {"role": "assistant", "content": "", "refusal": None})], "obfuscation": "q1Xr"},
        {**_A_HEAD, "choices": [_choice(0, {"content": "Hello"}, logprobs={"content": [_A_TOKENS[0]], "refusal": None})], "obfuscation": "7"},
        {**_A_HEAD, "choices": [_choice(0, {"content": " there"}, logprobs={"content": [_A_TOKENS[1]], "refusal": None})], "obfuscation": "Zk3"},
        {**_A_HEAD, "choices": [_choice(0, {"content": ","}, logprobs={"content": [_A_TOKENS[2]], "refusal": None})], "obfuscation": "pQ0w1"},
        {**_A_HEAD, "choices": [_choice(0, {"content": " friend"}, logprobs={"content": [_A_TOKENS[3]], "refusal": None})], "obfuscation": "a"},
        {**_A_HEAD, "choices": [_choice(0, {"content": "!"}, logprobs={"content": [_A_TOKENS[4]], "refusal": None})], "obfuscation": "Yt8"},
        {**_A_HEAD, "choices": [_choice(0, {}, finish="stop")], "obfuscation": "cV"},
        {**_A_HEAD, "choices": [], "usage": _A_USAGE, "obfuscation": "m2EfS"},
    ],
)

# (b) OpenAI gpt-5-mini, parallel tool calls: two function calls streamed interleaved, one custom tool call

_B_ID = "chatcmpl-C1yHq2mJt5ZbR8wVnXe0sKp3dLfGu"
_B_HEAD = {
    "id": _B_ID,
    "object": "chat.completion.chunk",
    "created": 1755000777,
    "model": "gpt-5-mini-2025-08-07",
    "service_tier": "default",
    "system_fingerprint": None,
    "usage": None,
}
_B_USAGE = {
    "prompt_tokens": 142,
    "completion_tokens": 87,
    "total_tokens": 229,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 20, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}
_B_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
    {"type": "custom", "custom": {"name": "run_sql", "description": "Runs one SQL statement"}},
]


def _tc(index: int, **fields: Any) -> dict[str, Any]:
    return {"index": index, **fields}


OPENAI_TOOLS = ProviderAnswer(
    name="openai-tools",
    about="OpenAI parallel tool calls, arguments streamed in pieces with interleaved indexes, one custom tool call",
    request={"tools": _B_TOOLS, "parallel_tool_calls": True},
    completion={
        "id": _B_ID,
        "object": "chat.completion",
        "created": 1755000777,
        "model": "gpt-5-mini-2025-08-07",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_Wq2v8bXy1RzT0aLm", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "call_Hn5kQ3pJ7sVd2cEo", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}},
                        {"id": "call_Zr9mB4tY6uGf1wXi", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT city FROM trips LIMIT 1"}},
                    ],
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": _B_USAGE,
        "service_tier": "default",
        "system_fingerprint": None,
    },
    chunks=[
        {
            **_B_HEAD,
            "choices": [
                _choice(
                    0,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [_tc(0, id="call_Wq2v8bXy1RzT0aLm", type="function", function={"name": "get_weather", "arguments": ""})],
                        "refusal": None,
                    },
                )
            ],
            "obfuscation": "u",
        },
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(0, function={"arguments": '{"ci'})]})], "obfuscation": "Rr0"},
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(1, id="call_Hn5kQ3pJ7sVd2cEo", type="function", function={"name": "get_time", "arguments": ""})]})], "obfuscation": "x9"},
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(0, function={"arguments": 'ty": "Par'})]})], "obfuscation": "3kd"},
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(1, function={"arguments": '{"tz": '})]})], "obfuscation": "Lm"},
        {
            **_B_HEAD,
            "choices": [_choice(0, {"tool_calls": [_tc(0, function={"arguments": 'is"}'}), _tc(1, function={"arguments": '"Europe/Paris"}'})]})],
            "obfuscation": "p",
        },
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(2, id="call_Zr9mB4tY6uGf1wXi", type="custom", custom={"name": "run_sql", "input": ""})]})], "obfuscation": "Qz7"},
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(2, custom={"input": "SELECT city "})]})], "obfuscation": "0"},
        {**_B_HEAD, "choices": [_choice(0, {"tool_calls": [_tc(2, custom={"input": "FROM trips LIMIT 1"})]})], "obfuscation": "wE1"},
        {**_B_HEAD, "choices": [_choice(0, {}, finish="tool_calls")], "obfuscation": "Jj"},
        {**_B_HEAD, "choices": [], "usage": _B_USAGE, "obfuscation": "n5Ga"},
    ],
)

# (c) DeepSeek deepseek-reasoner: reasoning_content streamed in pieces before the content

_C_ID = "5e2f1c3a-8d47-4b6e-9a0f-3c1d2e4b5a69"
_C_HEAD = {"id": _C_ID, "object": "chat.completion.chunk", "created": 1746002233, "model": "deepseek-reasoner", "system_fingerprint": "fp_5417b77867_prod0425fp8"}
_C_USAGE = {
    "prompt_tokens": 13,
    "completion_tokens": 41,
    "total_tokens": 54,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 33},
    "prompt_cache_hit_tokens": 0,
    "prompt_cache_miss_tokens": 13,
}

DEEPSEEK_REASONER = ProviderAnswer(
    name="deepseek-reasoner",
    about="DeepSeek deepseek-reasoner: reasoning_content in pieces, then content; DeepSeek's usage fields",
    completion={
        "id": _C_ID,
        "object": "chat.completion",
        "created": 1746002233,
        "model": "deepseek-reasoner",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "9.11 is smaller than 9.9.",
                    "reasoning_content": "Compare the tenths: 1 is less than 9, so 9.11 < 9.9.",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _C_USAGE,
        "system_fingerprint": "fp_5417b77867_prod0425fp8",
    },
    chunks=[
        {**_C_HEAD, "choices": [_choice(0, {"role": "assistant", "content": None, "reasoning_content": ""})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": None, "reasoning_content": "Compare the tenths"})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": None, "reasoning_content": ": 1 is less than 9"})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": None, "reasoning_content": ", so 9.11 < 9.9."})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": "9.11 is smaller", "reasoning_content": None})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": " than 9.9.", "reasoning_content": None})]},
        {**_C_HEAD, "choices": [_choice(0, {"content": "", "reasoning_content": None}, finish="stop")]},
        {**_C_HEAD, "choices": [], "usage": _C_USAGE},
    ],
)

# (c') OpenRouter (as vLLM names it too): ``reasoning``; OpenRouter's ``provider`` and ``native_finish_reason``

_R_ID = "gen-1746003344-Vq8rLw2XbN5tKc3Zp0aH"
_R_HEAD = {"id": _R_ID, "provider": "DeepInfra", "model": "deepseek/deepseek-r1", "object": "chat.completion.chunk", "created": 1746003344}
_R_USAGE = {"prompt_tokens": 11, "completion_tokens": 28, "total_tokens": 39, "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 21}}

OPENROUTER_REASONING = ProviderAnswer(
    name="openrouter-reasoning",
    about="OpenRouter: reasoning in pieces before the content; provider at the top, native_finish_reason on the choice",
    completion={
        "id": _R_ID,
        "provider": "DeepInfra",
        "model": "deepseek/deepseek-r1",
        "object": "chat.completion",
        "created": 1746003344,
        "choices": [
            {
                "logprobs": None,
                "finish_reason": "stop",
                "native_finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "Paris.", "refusal": None, "reasoning": "The user asks for the capital of France. That is Paris."},
            }
        ],
        "usage": _R_USAGE,
    },
    chunks=[
        {**_R_HEAD, "choices": [_choice(0, {"role": "assistant", "content": "", "reasoning": "The user asks"}, native_finish_reason=None)]},
        {**_R_HEAD, "choices": [_choice(0, {"role": None, "content": "", "reasoning": " for the capital of France."}, native_finish_reason=None)]},
        {**_R_HEAD, "choices": [_choice(0, {"content": "", "reasoning": " That is Paris."}, native_finish_reason=None)]},
        {**_R_HEAD, "choices": [_choice(0, {"content": "Paris", "reasoning": None}, native_finish_reason=None)]},
        {**_R_HEAD, "choices": [_choice(0, {"content": "."}, native_finish_reason=None)]},
        {**_R_HEAD, "choices": [_choice(0, {"content": ""}, finish="stop", native_finish_reason="stop")]},
        {**_R_HEAD, "choices": [], "usage": _R_USAGE},
    ],
)

# (d) OpenAI refusal: refusal text, content null, logprobs.refusal

_D_ID = "chatcmpl-BR2aK9sLmQw4Vx7Ty1Zc0nHp3GfEd"
_D_HEAD = {
    "id": _D_ID,
    "object": "chat.completion.chunk",
    "created": 1745940000,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_a691bd8dd6",
    "usage": None,
}
_D_TOKENS = [_lp("I'm", -0.012, ("I", -4.5)), _lp(" sorry", -0.0003, (" unable", -8.9)), _lp(", I can't help with that.", -0.05, (".", -3.1))]
_D_USAGE = {
    "prompt_tokens": 48,
    "completion_tokens": 3,
    "total_tokens": 51,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}

OPENAI_REFUSAL = ProviderAnswer(
    name="openai-refusal",
    about="OpenAI refusal: refusal text, content null, logprobs.refusal (content logprobs null)",
    request={"logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "plan", "schema": {"type": "object"}}}},
    completion={
        "id": _D_ID,
        "object": "chat.completion",
        "created": 1745940000,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that.", "annotations": []},
                "logprobs": {"content": None, "refusal": _D_TOKENS},
                "finish_reason": "stop",
            }
        ],
        "usage": _D_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_a691bd8dd6",
    },
    chunks=[
        {**_D_HEAD, "choices": [_choice(0, {"role": "assistant", "content": None, "refusal": ""}, logprobs=None)], "obfuscation": "aB3"},
        {**_D_HEAD, "choices": [_choice(0, {"refusal": "I'm"}, logprobs={"content": None, "refusal": [_D_TOKENS[0]]})], "obfuscation": "k"},
        {**_D_HEAD, "choices": [_choice(0, {"refusal": " sorry"}, logprobs={"content": None, "refusal": [_D_TOKENS[1]]})], "obfuscation": "9pZ"},
        {**_D_HEAD, "choices": [_choice(0, {"refusal": ", I can't help with that."}, logprobs={"content": None, "refusal": [_D_TOKENS[2]]})], "obfuscation": "Wm"},
        {**_D_HEAD, "choices": [_choice(0, {}, finish="stop")], "obfuscation": "r4T0"},
        {**_D_HEAD, "choices": [], "usage": _D_USAGE, "obfuscation": "e"},
    ],
)

# (e) OpenAI n=2: distinct contents, each choice with its own finish_reason (stop, length)

_E_ID = "chatcmpl-BS3bL0tMnRx5Wy8Uz2Ad1oIq4HgFe"
_E_HEAD = {
    "id": _E_ID,
    "object": "chat.completion.chunk",
    "created": 1745950000,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_0392822090",
    "usage": None,
}
_E_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 10,
    "total_tokens": 22,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}

OPENAI_N2 = ProviderAnswer(
    name="openai-n2",
    about="OpenAI n=2: two distinct choices streamed interleaved, one ends stop, the other length",
    request={"n": 2, "max_tokens": 6},
    completion={
        "id": _E_ID,
        "object": "chat.completion",
        "created": 1745950000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "The sky is blue.", "refusal": None, "annotations": []}, "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "Blue, because of Rayleigh", "refusal": None, "annotations": []}, "logprobs": None, "finish_reason": "length"},
        ],
        "usage": _E_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_0392822090",
    },
    chunks=[
        {**_E_HEAD, "choices": [_choice(0, {"role": "assistant", "content": "", "refusal": None})], "obfuscation": "Hh"},
        {**_E_HEAD, "choices": [_choice(0, {"content": "The"})], "obfuscation": "d0"},
        {**_E_HEAD, "choices": [_choice(1, {"role": "assistant", "content": "", "refusal": None})], "obfuscation": "F"},
        {**_E_HEAD, "choices": [_choice(1, {"content": "Blue"})], "obfuscation": "ss2"},
        {**_E_HEAD, "choices": [_choice(0, {"content": " sky"})], "obfuscation": "Kp"},
        {**_E_HEAD, "choices": [_choice(1, {"content": ", because"})], "obfuscation": "7"},
        {**_E_HEAD, "choices": [_choice(0, {"content": " is"})], "obfuscation": "mQ1"},
        {**_E_HEAD, "choices": [_choice(1, {"content": " of Rayleigh"})], "obfuscation": "Zx"},
        {**_E_HEAD, "choices": [_choice(1, {}, finish="length")], "obfuscation": "o"},
        {**_E_HEAD, "choices": [_choice(0, {"content": " blue."})], "obfuscation": "g8"},
        {**_E_HEAD, "choices": [_choice(0, {}, finish="stop")], "obfuscation": "Nn4"},
        {**_E_HEAD, "choices": [], "usage": _E_USAGE, "obfuscation": "l"},
    ],
)

# (f) provider extras: Groq's x_groq and timing usage, a choice-level content_filter_results (Azure)
# and a message-level provider_specific field

_F_ID = "chatcmpl-7b9e2c41-5f0a-4d3e-b8c6-1a2f3e4d5c6b"
_F_HEAD = {"id": _F_ID, "object": "chat.completion.chunk", "created": 1746010000, "model": "llama-3.3-70b-versatile", "system_fingerprint": "fp_3f3b593e33"}
_F_USAGE = {
    "queue_time": 0.021834,
    "prompt_tokens": 41,
    "prompt_time": 0.00412,
    "completion_tokens": 4,
    "completion_time": 0.014545,
    "total_tokens": 45,
    "total_time": 0.018665,
}
_F_FILTER = {"hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}

PROVIDER_EXTRAS = ProviderAnswer(
    name="provider-extras",
    about="extra fields: x_groq and timings in usage (Groq), content_filter_results on the choice, provider_specific in the message",
    completion={
        "id": _F_ID,
        "object": "chat.completion",
        "created": 1746010000,
        "model": "llama-3.3-70b-versatile",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Bonjour, le monde!", "provider_specific": {"citations": ["doc-7"], "grounded": True}},
                "logprobs": None,
                "finish_reason": "stop",
                "content_filter_results": _F_FILTER,
            }
        ],
        "usage": _F_USAGE,
        "system_fingerprint": "fp_3f3b593e33",
        "x_groq": {"id": "req_01jt2k9x4mfq8b7c6d5e4f3g2h"},
    },
    chunks=[
        {**_F_HEAD, "choices": [_choice(0, {"role": "assistant", "content": ""})], "x_groq": {"id": "req_01jt2k9x4mfq8b7c6d5e4f3g2h"}},
        {**_F_HEAD, "choices": [_choice(0, {"content": "Bonjour"})]},
        {**_F_HEAD, "choices": [_choice(0, {"content": ", le monde!", "provider_specific": {"citations": ["doc-7"], "grounded": True}})]},
        {**_F_HEAD, "choices": [_choice(0, {}, finish="stop", content_filter_results=_F_FILTER)]},
        {**_F_HEAD, "choices": [], "usage": _F_USAGE},
    ],
)

ALL: list[ProviderAnswer] = [OPENAI_LOGPROBS, OPENAI_TOOLS, DEEPSEEK_REASONER, OPENROUTER_REASONING, OPENAI_REFUSAL, OPENAI_N2, PROVIDER_EXTRAS]
BY_NAME: dict[str, ProviderAnswer] = {a.name: a for a in ALL}
