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


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: Text
    # the limits the server checks itself (its own messages, 413 for too many) are stated for clients in the spec
    inputs: Annotated[list[Union[Text, dict[Text, Text]]], Field(json_schema_extra={"minItems": 1})]
    prompt_of: Text | None = None
    max_new_tokens: Int(1) = 64
    num_beams: Int(1, 8) = 1
    min_new_tokens: Int(0) = 0  # </s> is not chosen before this many tokens (as generate()'s)
    stream: StrictBool = False  # server-sent events: pieces of each output as they are decoded


Number = Annotated[float, Field(ge=0)]


class OpenAIFields(BaseModel):
    """The OpenAI request fields peft-t5 takes. Decoding is greedy: the sampling fields clients send by default
    (temperature, top_p, seed, penalties, user) are accepted and have no effect; fields that would change what
    comes back (n, best_of, logprobs, echo, stop, suffix) are refused unless they ask for the default."""
    model_config = ConfigDict(extra="forbid")
    model: Text
    max_tokens: Int(1) | None = None
    max_completion_tokens: Int(1) | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: Text | None = None
    n: Int(1, 1) | None = None
    best_of: Int(1, 1) | None = None
    logprobs: None = None
    echo: Literal[False] | None = None
    stop: None = None
    suffix: None = None


class CompletionRequest(OpenAIFields):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's roles
    content: Text
    name: Text | None = None


class ChatRequest(OpenAIFields):
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
