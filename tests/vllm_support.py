"""What the vLLM tests share: how the engine is set up for the tiny model."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

MAX_MODEL_LEN = 512

#: the KV cache size is explicit: by default vLLM on CPU reserves a share of the whole machine's
#: memory and refuses to start when other processes hold too much of it
ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_cache_memory_bytes": 1 << 30}

#: the tiny model's chat template writes Hermes-style tool calls
TOOL_PARSER = "hermes"


@functools.cache
def tokenizer(model_dir: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def no_whitespace_bias(model_dir: Path) -> dict[str, float]:
    """A ``logit_bias`` that keeps the random-weight model from writing whitespace.

    Structured outputs allow whitespace between JSON tokens, and a model with random weights
    prefers it forever: without this a constrained answer never ends within ``max_tokens``.
    """
    tok = tokenizer(model_dir)
    return {str(i): -100.0 for i in range(len(tok)) if (text := tok.decode([i])) and not text.strip()}


# tools for the tool-call tests

#: terminates quickly even for a random model: every value is an enum or a boolean
FORECAST_PARAMS = {
    "type": "object",
    "properties": {"unit": {"enum": ["c", "f"]}, "days": {"enum": [1, 2, 3]}, "alerts": {"type": "boolean"}},
    "required": ["unit", "days", "alerts"],
    "additionalProperties": False,
}
TIDE_PARAMS = {"type": "object", "properties": {"high": {"type": "boolean"}}, "required": ["high"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "forecast", "description": "Weather at sea.", "parameters": FORECAST_PARAMS}},
    {"type": "function", "function": {"name": "tide", "description": "The next tide.", "parameters": TIDE_PARAMS}},
]
SCHEMAS = {"forecast": FORECAST_PARAMS, "tide": TIDE_PARAMS}

#: what a Hermes model writes to call a tool; vLLM's structured outputs make the tiny model write it
HERMES_CALL = '<tool_call>\n{"name": "forecast", "arguments": {"unit": "c", "days": 2, "alerts": true}}\n</tool_call>'


def valid(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` satisfies one of the small schemas above (objects of enums and booleans)."""
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    if schema["type"] == "boolean":
        return isinstance(value, bool)
    return isinstance(value, dict) and set(value) == set(schema["required"]) and all(valid(value[k], schema["properties"][k]) for k in value)


def streamed_calls(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The tool calls a stream's ``delta.tool_calls`` add up to, by index."""
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for part in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            call = calls.setdefault(part["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or part.get("id")
            call["name"] += part.get("function", {}).get("name") or ""
            call["arguments"] += part.get("function", {}).get("arguments") or ""
    return calls
