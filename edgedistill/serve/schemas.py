"""The OpenAI wire format we accept and return: requests are validated here, nowhere else.

Unknown request fields are ignored (clients send many we do not act on); parameters we would
silently get wrong (n > 1, echo, logprobs, suffix) are refused with a 400 instead.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator,
                      model_validator)

MAX_STOP_SEQUENCES = 4


def _encodable(v: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode: refuse them here."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode (a lone surrogate at position {e.start}); "
                         "send UTF-8 text") from None
    return v


Text = Annotated[str, AfterValidator(_encodable)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, v: Any) -> Any:
        """A list of {"type": "text", "text": ...} parts (newer clients send these) is joined into one string."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(p["text"] for p in v)

    def as_template_message(self) -> dict[str, str]:
        """`developer` is the newer name for `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # strict: `true` is not 1 token and "5" is not a number (OpenAI refuses both too)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[Text] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, strict=True)
    n: int | None = Field(None, ge=1, le=1, strict=True)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatTemplateKwargs(BaseModel):
    """vLLM / SGLang's extra chat-template variables; only `enable_thinking` is acted on."""
    model_config = ConfigDict(extra="allow")

    enable_thinking: StrictBool | None = None


class ThinkingConfig(BaseModel):
    """Anthropic's `thinking` switch; "auto" (ours) lets the routing policy decide, under the budget if given."""
    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled", "auto"]
    budget_tokens: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _no_budget_when_disabled(self) -> "ThinkingConfig":
        if self.type == "disabled" and self.budget_tokens is not None:
            raise ValueError("budget_tokens is given but type is 'disabled'; drop one of them")
        return self


THINK_LEVELS = ("low", "medium", "high")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)  # newer clients' name for max_tokens
    # Thinking switches in every dialect clients use; serve/thinking.py normalises them.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    think: bool | str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: ThinkingConfig | None = None

    @field_validator("think", mode="before")
    @classmethod
    def _think_level(cls, v: Any) -> Any:
        if v is None or isinstance(v, bool) or v in THINK_LEVELS:
            return v
        raise ValueError(f"expected true, false, or one of {', '.join(map(repr, THINK_LEVELS))}; got {v!r}")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] | None = None  # refused rather than silently ignored
    logprobs: None = None
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        _encodable(v if isinstance(v, str) else v[0])
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---------------------------------------------------------------- responses
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning: str | None = None
    reasoning_content: str | None = None  # the name DeepSeek / vLLM clients read


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RouteLatency(BaseModel):
    policy: float = 0.0  # ms spent in decide_think + confidence + bookkeeping
    small: float | None = None  # ms of the small model's generation, None when it did not run
    large: float | None = None


class RouteExplanation(BaseModel):
    """Why this answer came out as it did: the `edgedistill` object on every chat response."""
    think_requested: Literal["on", "off", "auto"]
    think_source: str  # the request field(s) or tag that decided, or "default"
    think_mode: Literal["on", "off"]
    think_budget: int | None = None
    think_reason: str = ""
    p_hard: float | None = None
    thinking_tokens: int = 0
    budget_hit: bool = False
    confidence: float | None = None
    threshold: float | None = None
    escalated: bool = False
    escalation_think_mode: Literal["on", "off"] | None = None  # the large model's mode when router.json set it
    reason: str = ""
    answered_by: str = ""
    models: list[str] = []
    latency_ms: RouteLatency = RouteLatency()


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    edgedistill: RouteExplanation | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgedistill"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "loading"]
    model: str
