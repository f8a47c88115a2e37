"""The OpenAI API over the same engine: /v1/completions, /v1/chat/completions and /v1/models, in the shapes the
`openai` client parses. `model` names an adapter (`base`: none); the prompt (or the last user message) fills the
adapter's prompt template, as an input of /v1/generate does (a chat: its last user message; T5 adapters answer one
input, with no conversation). `stream: true` answers with server-sent events."""
from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..bank import AdapterBank
from ..errors import PeftT5Error
from .failures import api_error, while_connected
from .schemas import ApiError, ChatRequest, CompletionRequest, OpenAIErrorBody, OpenAIFields, errors, openai_error, sse

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def is_openai_path(path: str) -> bool:
    """A route answered in OpenAI's shapes (its errors too): the paths above and /v1/models/{model}."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_routes(bank: AdapterBank, engine, settings, metrics) -> APIRouter:
    router = APIRouter()
    started = int(time.time())

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "peft-t5"}

    @router.get("/v1/models", responses=errors(401, body=OpenAIErrorBody))
    async def models():
        return {"object": "list", "data": [model_card(name) for name in bank.names]}

    @router.get("/v1/models/{model}", responses=errors(401, 404, body=OpenAIErrorBody))
    async def model(model: str):
        if model not in bank.names:
            raise ApiError(404, f"model: no adapter named {model!r}; GET /v1/models lists them", "model")
        return model_card(model)

    @router.post("/v1/completions", responses=errors(400, 401, 404, 413, 422, 503, 504, body=OpenAIErrorBody))
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await complete(body, prompts, "text_completion", "cmpl", request)

    @router.post("/v1/chat/completions", responses=errors(400, 401, 404, 413, 422, 503, 504, body=OpenAIErrorBody))
    async def chat(body: ChatRequest, request: Request):
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            raise ApiError(422, "messages: no message with role 'user'; the adapter answers the last user message",
                           "messages")
        return await complete(body, users[-1:], "chat.completion", "chatcmpl", request)

    async def complete(body: OpenAIFields, prompts: list[str], kind: str, prefix: str, request: Request):
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        sources, prompt_tokens = check(body.model, prompts, max_tokens)
        reply = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
        names = [body.model] * len(sources)
        if body.stream:
            return StreamingResponse(events(reply, kind, names, sources, max_tokens, prompt_tokens),
                                     media_type="text/event-stream")
        try:
            texts = await while_connected(request, engine.generate(names, sources, max_tokens, 1,
                                                                   settings.request_timeout))
        except Exception as e:
            raise api_error(e) or e
        reasons, used = ends(texts, max_tokens, prompt_tokens)
        choices = [{"index": i, **shape(kind, text), "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {**reply, "object": kind, "choices": choices, "usage": used}

    async def events(reply: dict, kind: str, names: list[str], sources: list[str], max_tokens: int,
                     prompt_tokens: int):
        kind = kind + ".chunk" if kind == "chat.completion" else kind
        texts = [""] * len(sources)
        try:
            if kind == "chat.completion.chunk":
                yield sse({**reply, "object": kind, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            async for i, piece in engine.stream(names, sources, max_tokens, 1, settings.request_timeout):
                texts[i] += piece
                yield sse({**reply, "object": kind, "choices": [{"index": i, **shape(kind, piece, delta=True),
                                                                 "finish_reason": None}]})
            reasons, used = ends(texts, max_tokens, prompt_tokens)
            yield sse({**reply, "object": kind, "choices": [
                {"index": i, **shape(kind, "", delta=True), "finish_reason": reason}
                for i, reason in enumerate(reasons)], "usage": used})
        except Exception as e:  # the status line is sent: the error goes in the stream, in the one error shape
            known = api_error(e)
            yield sse(openai_error(known.status, known.message, known.field) if known else
                      openai_error(500, "internal error; the server logged it"))
            if not known:
                raise
        yield "data: [DONE]\n\n"

    def check(model: str, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
        """The prompts as sources for the adapter, and their token count; refused beyond the server's limits."""
        if model not in bank.names:
            raise ApiError(404, f"model: no adapter named {model!r}; GET /v1/models lists them", "model")
        if len(prompts) > settings.max_inputs:
            raise ApiError(413, f"prompt: {len(prompts)} prompts, over this server's limit of {settings.max_inputs}",
                           "prompt")
        for prompt in prompts:
            if len(prompt) > settings.max_input_chars:
                raise ApiError(413, f"prompt: {len(prompt):,} characters, over this server's limit of "
                                    f"{settings.max_input_chars:,}", "prompt")
        if max_tokens > settings.max_new_tokens:
            raise ApiError(422, f"max_tokens: {max_tokens} is over this server's limit of {settings.max_new_tokens}",
                           "max_tokens")
        if len(prompts) * max_tokens > settings.max_request_tokens:
            raise ApiError(413, f"max_tokens: {len(prompts)} prompts x {max_tokens} tokens is over this server's "
                                f"limit of {settings.max_request_tokens:,} tokens a request; send fewer prompts or "
                                "lower max_tokens", "max_tokens")
        try:
            sources = bank.sources(model, prompts)
        except PeftT5Error as e:  # a template of several fields (squad: question and context)
            raise ApiError(422, f"prompt: {e}; a prompt fills one field: use POST /v1/generate for this adapter",
                           "prompt")
        prompt_tokens = sum(len(ids) for ids in bank.tokenizer(sources).input_ids)
        metrics.source_tokens.inc(prompt_tokens)
        return sources, prompt_tokens

    def ends(texts: list[str], max_tokens: int, prompt_tokens: int) -> tuple[list[str], dict]:
        """Each output's finish_reason, and the usage; each output tokenized once."""
        counts = [len(ids) for ids in bank.tokenizer(texts, add_special_tokens=False).input_ids] if texts else []
        metrics.generated_tokens.inc(sum(counts))
        reasons = ["length" if n >= max_tokens else "stop" for n in counts]
        return reasons, {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                         "total_tokens": prompt_tokens + sum(counts)}

    return router


def shape(kind: str, text: str, delta: bool = False) -> dict:
    if kind.startswith("chat"):
        return {"delta": {"content": text}} if delta else {"message": {"role": "assistant", "content": text}}
    return {"text": text, "logprobs": None}
