"""The OpenAI chat completion request, validated; fields follow the OpenAI docs' order."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

#: strict: the body travels on unchanged, so ``"n": "2"`` must not pass as the number 2
_OPEN = ConfigDict(extra="allow", strict=True)


class ContentPart(BaseModel):
    model_config = _OPEN
    type: str = Field(min_length=1)
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> ContentPart:
        if self.text is None and (self.type == "text" or "text" in self.model_fields_set):
            raise ValueError("a content part's 'text' must be a string")
        return self


class Message(BaseModel):
    model_config = _OPEN
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = _OPEN
    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    """Validation only: the body itself travels on unchanged, vLLM extras included."""

    model_config = _OPEN

    messages: list[Message] = Field(min_length=1)
    model: str = Field(min_length=1, max_length=512)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _printable(cls, v: str) -> str:
        # it is echoed in errors, logs and the x-admiral-route header
        if not v.isprintable():
            raise ValueError("must be printable text, without control characters")
        return v


def request_body_schema(model: type[BaseModel] = ChatCompletionRequest) -> dict[str, Any]:
    """A request's JSON schema with its definitions inlined, for the OpenAPI document.

    Pydantic's ``$ref``s point into ``$defs``, which means nothing inside an OpenAPI operation.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)  # type: ignore[no-any-return]
