"""Request bodies of the OpenAI-compatible endpoints (pydantic; unknown fields are ignored)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # a JSON object, as text


class ToolCallIn(_Body):
    """A call an earlier assistant message made (sent back by the client in a tool loop)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # "tool" is OpenAI's name for ChatGLM3's "observation"; "developer" is OpenAI's newer "system".
    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    metadata: str | None = None  # ChatGLM3 extension: an assistant message's metadata line (tool name)
    tools: list[dict[str, Any]] | None = None  # ChatGLM3 extension: tools carried by a system message
    tool_calls: list[ToolCallIn] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers (the order of turns says it)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None  # not supported: refused with 400 when set

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _none_is_default(cls, v, info):
        if v is None:
            return cls.model_fields[info.field_name].default
        return v

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _none_is_default_too(cls, v, info):
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]

    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    tools: list[dict[str, Any]] | None = None
    # "auto" (default), "none" (no tools shown, no calls read), {"type": "function", "function":
    # {"name": ...}} (only that tool shown); "required" cannot be enforced and is refused.
    tool_choice: str | dict[str, Any] | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v
