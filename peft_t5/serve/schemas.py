"""What the HTTP API takes and gives: request bodies (strict, valid Unicode, limits the spec can state), the one
error shape, and the exception routes raise to answer with it."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PATH = 4096  # characters in a run-time adapter path (Linux's PATH_MAX); a segment may hold 255 bytes


def unicode_text(text: str) -> str:
    """JSON can carry a lone surrogate (\\ud800), which is no Unicode text: the tokenizer and SQLite fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start}); send UTF-8 text")
    return text


def whole_number(value):
    """JSON's 6.0 is the integer 6 (as JSON Schema says); "6" stays refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(low: int, high: int | None = None):  # noqa: N802 (a type)
    """A whole number in [low, high]: StrictInt's "6" refused, JSON's 6.0 accepted, the bounds in the spec."""
    return Annotated[StrictInt, Field(ge=low, le=high), BeforeValidator(whole_number)]


Text = Annotated[StrictStr, AfterValidator(unicode_text)]


def Real(low: float, high: float, above: bool = False):  # noqa: N802 (a type)
    """A JSON number in [low, high] (or (low, high] with above): "0.5" and true refused, the bounds in the spec."""
    return Annotated[float, Field(gt=low, le=high, strict=True) if above else Field(ge=low, le=high, strict=True)]


Stop = Union[Annotated[Text, Field(min_length=1)], Annotated[list[Annotated[Text, Field(min_length=1)]],
                                                                  Field(min_length=1, max_length=4)]]


class DecodingFields(BaseModel):
    """How tokens are chosen, with OpenAI's names and ranges, on /v1/generate and the OpenAI routes alike. Without
    temperature, decoding is greedy unless top_p, top_k, min_p or seed is sent (they ask for sampling, at OpenAI's
    temperature 1); temperature 0 is greedy. The meanings are transformers' (top_k 0 or -1: off) and OpenAI's
    (presence and frequency penalties over the tokens decoded)."""
    model_config = ConfigDict(extra="forbid")
    temperature: Real(0, 2) | None = None
    top_p: Real(0, 1) | None = None
    top_k: Int(-1) | None = None
    min_p: Real(0, 1) | None = None
    repetition_penalty: Real(0, 10, above=True) | None = None
    presence_penalty: Real(-2, 2) | None = None
    frequency_penalty: Real(-2, 2) | None = None
    seed: Int(-2**53, 2**53) | None = None  # bounds a JSON number holds exactly
    stop: Stop | None = None  # the output ends before the first of these strings

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, logprobs: int | None = None):
        from .decoding import Sampling

        sampled = self.temperature if self.temperature is not None else (
            1.0 if (self.top_p is not None or self.top_k not in (None, 0, -1) or self.min_p is not None
                    or self.seed is not None) else 0.0)
        return Sampling(temperature=sampled, top_p=1.0 if self.top_p is None else self.top_p,
                        top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
                        repetition_penalty=self.repetition_penalty or 1.0,
                        presence_penalty=self.presence_penalty or 0.0,
                        frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, logprobs=logprobs)


class GenerateRequest(DecodingFields):
    adapter: Text
    # the limits the server checks itself (its own messages, 413 for too many) are stated for clients in the spec
    inputs: Annotated[list[Union[Text, dict[Text, Text]]], Field(json_schema_extra={"minItems": 1})]
    prompt_of: Text | None = None
    max_new_tokens: Int(1) = 64
    num_beams: Int(1, 8) = 1
    n: Int(1, 128) = 1  # candidates per input (sampled)
    logprobs: Int(0, 5) | None = None  # each token's log-probability, and the k most likely
    min_new_tokens: Int(0) = 0  # </s> is not chosen before this many tokens (as generate()'s)
    stream: StrictBool = False  # server-sent events: pieces of each output as they are decoded


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class OpenAIFields(DecodingFields):
    """The OpenAI request fields peft-t5 takes. echo and suffix are refused: T5's prompt is the encoder's input, so
    it has no next-token log-probabilities to echo, and T5 has no insertion mode."""
    model: Text
    max_tokens: Int(1) | None = None
    max_completion_tokens: Int(1) | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    n: Int(1, 128) | None = None
    echo: Literal[False] | None = None
    suffix: None = None


class CompletionRequest(OpenAIFields):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)]]
    best_of: Int(1, 128) | None = None  # samples per prompt, the n with the highest mean log-probability come back
    # (below n counts as n)
    logprobs: Int(0, 5) | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's roles
    content: Text
    name: Text | None = None


class ChatRequest(OpenAIFields):
    # top_logprobs needs logprobs true, as in OpenAI's API (the spec says so too)
    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {"top_logprobs": {
        "required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}})
    logprobs: StrictBool | None = None
    top_logprobs: Int(0, 20) | None = None
    # the adapter answers the last user message: the spec says one is needed (the route refuses a chat without)
    messages: Annotated[list[ChatMessage], Field(min_length=1, json_schema_extra={
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}})]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[Text, Field(json_schema_extra={"pattern": ADAPTER_NAME.pattern})]
    path: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATH), AfterValidator(unicode_text)]


class Scores(BaseModel):
    model_config = ConfigDict(extra="forbid")
    funny: Int(1, 5)
    appropriate: Int(1, 5)


class RateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Text
    rater: Annotated[StrictStr, Field(min_length=1, max_length=64), AfterValidator(unicode_text)]
    scores: list[Scores]


class ErrorBody(BaseModel):
    """Every error the server sends: one line, and the request field it is about."""
    error: str
    field: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """Errors of the OpenAI routes, in OpenAI's shape: the same message and field, as error.message and error.param."""
    error: OpenAIErrorDetail


def openai_error(status: int, message: str, field: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error", 504: "timeout"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": field, "code": None}}


def errors(*statuses: int, body: type[BaseModel] = ErrorBody) -> dict:
    """The error responses a route sends, for the OpenAPI spec."""
    return {status: {"model": body} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
