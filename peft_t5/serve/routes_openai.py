"""The OpenAI API over the same engine: /v1/completions, /v1/chat/completions and /v1/models, in the shapes the
`openai` client parses. `model` names an adapter (`base`: none); the prompt (or the last user message) fills the
adapter's prompt template, as an input of /v1/generate does (a chat: its last user message; T5 adapters answer one
input, with no conversation). `stream: true` answers with server-sent events."""
from __future__ import annotations

import secrets
import time
from contextlib import AsyncExitStack
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..bank import AdapterBank
from ..errors import PeftT5Error
from .engine import Completion, Piece, TokenLogprob
from .failures import api_error, marked_when_whole, while_connected
from .on_demand import OnDemand
from .schemas import (
    ADAPTER_NAME,
    ApiError,
    ChatRequest,
    CompletionRequest,
    OpenAIErrorBody,
    OpenAIFields,
    errors,
    openai_error,
    sse,
)

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def is_openai_path(path: str) -> bool:
    """A route answered in OpenAI's shapes (its errors too): the paths above and /v1/models/{model}."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_routes(bank: AdapterBank, engine, settings, metrics, on_demand: OnDemand) -> APIRouter:
    router = APIRouter()
    started = int(time.time())

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "peft-t5"}

    def askable() -> list[str]:
        """The base, the adapters loaded, and those under --adapter_root a request loads on demand; not the
        extractive ones (these routes cannot ask them)."""
        return [name for name in dict.fromkeys([*bank.names, *on_demand.on_disk()])
                if adapter_kind(name) != "extractive"]

    def adapter_kind(name: str) -> str | None:
        """An adapter's kind, loaded or on disk under the root (read from its peft_t5.json); None: neither."""
        return bank.kind(name) if name in bank.names else on_demand.kind_on_disk(name)

    def refuse_extractive(name: str) -> None:
        if adapter_kind(name) == "extractive":
            raise ApiError(422, f"model: {name!r} is an extractive adapter: it answers a question about a context "
                                "with a span of it, which these routes cannot ask; POST /v1/generate with inputs "
                                "[{\"question\": ..., \"context\": ...}]", "model")

    @router.get("/v1/models", responses=errors(401, body=OpenAIErrorBody))
    async def models():
        return {"object": "list", "data": [model_card(name) for name in askable()]}

    @router.get("/v1/models/{model}", responses=errors(401, 403, 404, 422, body=OpenAIErrorBody))
    async def model(model: str):
        """A model's card, or what a request naming it would be answered: a folder under --adapter_root that would
        not load gets that refusal (403, 404 or 422)."""
        refuse_extractive(model)
        if model in bank.names:
            return model_card(model)
        if on_demand.root is not None and ADAPTER_NAME.match(model) and (Path(on_demand.root) / model).is_dir():
            problem = on_demand.problem(model)
            if problem is not None:
                raise ApiError(problem.status, problem.message, "model")
            return model_card(model)
        raise ApiError(404, f"model: no adapter named {model!r}; GET /v1/models lists them", "model")

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
        refuse_extractive(body.model)  # before a load on demand: it would be for nothing
        async with AsyncExitStack() as held:  # the adapter stays loaded until the answer (or the stream) ends
            await held.enter_async_context(on_demand.holding(body.model, field="model"))
            return await complete_held(body, prompts, kind, prefix, request, held)

    async def complete_held(body: OpenAIFields, prompts: list[str], kind: str, prefix: str, request: Request,
                            held: AsyncExitStack):
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        n, best_of, top = choices_asked(body)
        sources, prompt_tokens, truncated = check(body.model, prompts, max_tokens, best_of)
        reply = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
        options = dict(n=best_of, sampling=body.sampling(top), stop=body.stops, want_logprob=best_of > n,
                       timeout=settings.request_timeout)
        names = [body.model] * len(sources)
        headers = {"X-Truncated-Prompts": ",".join(map(str, truncated))} if truncated else None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = held_events(held.pop_all(), reply, kind, names, sources, max_tokens, options, n, prompt_tokens,
                                 top, usage)
            return StreamingResponse(marked_when_whole(request, events), media_type="text/event-stream",
                                     headers=headers)
        try:
            done = await while_connected(request, engine.complete(names, sources, max_tokens, **options))
        except Exception as e:
            raise api_error(e) or e
        kept = best_n(done, n, best_of)
        choices = [{"index": i, **shape(kind, c.text, top, c.logprobs), "finish_reason": c.finish_reason}
                   for i, c in enumerate(kept)]
        return JSONResponse({**reply, "object": kind, "choices": choices, "usage": usage_of(done, prompt_tokens)},
                            headers=headers)

    def choices_asked(body: OpenAIFields) -> tuple[int, int, int | None]:
        """(n, best_of, how many alternatives each token's log-probabilities list; None: none asked)."""
        n = body.n or 1
        best_of = max(getattr(body, "best_of", None) or n, n)
        rows = min(settings.max_rows_per_request or settings.max_rows, settings.max_rows)  # an input's rows at once
        if best_of > n and best_of > rows:
            raise ApiError(422, f"best_of: {best_of} samples a prompt is over this server's {rows} rows a request; "
                                "ask for fewer", "best_of")
        if isinstance(body, ChatRequest):
            if body.top_logprobs is not None and body.logprobs is not True:
                raise ApiError(422, "top_logprobs: needs logprobs true, as in OpenAI's API; set logprobs, or leave "
                                    "top_logprobs out", "top_logprobs")
            return n, best_of, (body.top_logprobs or 0) if body.logprobs else None
        return n, best_of, body.logprobs

    async def whole(names: list[str], sources: list[str], max_tokens: int, options: dict, n: int,
                    decoded: list[Completion]):
        """best_of above n: the best n are known once all samples end, so each comes whole; `decoded` gets every
        sample (usage counts them all)."""
        done = await engine.complete(names, sources, max_tokens, **options)
        decoded += done
        for i, c in enumerate(best_n(done, n, options["n"])):
            yield Piece(i, c.text, c.logprobs or [], c)

    async def held_events(held: AsyncExitStack, *args):
        async with held:
            async for event in events(*args):
                yield event

    async def events(reply: dict, kind: str, names: list[str], sources: list[str], max_tokens: int, options: dict,
                     n: int, prompt_tokens: int, top: int | None, include_usage: bool):
        kind = kind + ".chunk" if kind == "chat.completion" else kind
        offsets, ended, decoded = [0] * (len(sources) * n), [], []

        def chunk(choices: list[dict], **extra) -> str:
            return sse({**reply, "object": kind, "choices": choices, **extra})
        try:
            if kind == "chat.completion.chunk":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(len(offsets))])
            async for piece in (engine.events(names, sources, max_tokens, **options) if options["n"] == n else
                                whole(names, sources, max_tokens, options, n, decoded)):
                if piece.text or piece.logprobs:
                    yield chunk([{"index": piece.index, **shape(kind, piece.text, top, piece.logprobs, delta=True,
                                                                offset=offsets[piece.index]), "finish_reason": None}])
                    offsets[piece.index] += len(piece.text)
                if piece.ended:
                    ended.append(piece.ended)
                    yield chunk([{"index": piece.index, **shape(kind, "", None, None, delta=True),
                                  "finish_reason": piece.ended.finish_reason}])
            if include_usage:  # OpenAI's last chunk: no choices, the usage of the whole request
                yield chunk([], usage=usage_of(decoded or ended, prompt_tokens))
        except Exception as e:  # the status line is sent: the error goes in the stream, in the one error shape
            known = api_error(e)
            yield sse(openai_error(known.status, known.message, known.field) if known else
                      openai_error(500, "internal error; the server logged it"))
            if not known:
                raise
        yield "data: [DONE]\n\n"

    def check(model: str, prompts: list[str], max_tokens: int, samples: int) -> tuple[list[str], int, list[int]]:
        """The prompts as sources for the adapter, the tokens the model reads of them, and which prompts are cut to
        the adapter's source length; refused beyond the server's limits."""
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
        if len(prompts) * samples * max_tokens > settings.max_request_tokens:
            raise ApiError(413, f"max_tokens: {len(prompts)} prompts x {samples} samples x {max_tokens} tokens is over "
                                f"this server's limit of {settings.max_request_tokens:,} tokens a request; send fewer "
                                "prompts or samples, or lower max_tokens", "max_tokens")
        try:
            sources = bank.sources(model, prompts)
            limit = bank.source_limit(model)
        except PeftT5Error as e:  # a template of several fields (squad: question and context)
            raise ApiError(422, f"prompt: {e}; a prompt fills one field: use POST /v1/generate for this adapter",
                           "prompt")
        lengths = [len(ids) for ids in bank.tokenizer(sources).input_ids]
        prompt_tokens = sum(min(n, limit) for n in lengths)
        metrics.source_tokens.inc(prompt_tokens)
        return sources, prompt_tokens, [i for i, n in enumerate(lengths) if n > limit]

    def usage_of(done: list[Completion], prompt_tokens: int) -> dict:
        """The tokens the engine decoded (every sample of best_of, </s> included) and those the model read."""
        decoded = sum(c.tokens for c in done)
        metrics.generated_tokens.inc(decoded)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": decoded, "total_tokens": prompt_tokens + decoded}

    return router


def best_n(done: list[Completion], n: int, best_of: int) -> list[Completion]:
    """Of each prompt's best_of samples, the n with the highest mean log-probability (best first)."""
    if best_of == n:
        return done
    groups = [done[i:i + best_of] for i in range(0, len(done), best_of)]
    return [c for group in groups for c in sorted(group, key=lambda c: -(c.mean_logprob or 0.0))[:n]]


def shape(kind: str, text: str, top: int | None, logprobs: list[TokenLogprob] | None, delta: bool = False,
          offset: int = 0) -> dict:
    """A choice's text (or delta), and its log-probabilities in the route's shape when they were asked for."""
    if kind.startswith("chat"):
        content = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"delta" if delta else "message": content,
                **({"logprobs": chat_logprobs(logprobs)} if top is not None and logprobs is not None else {})}
    return {"text": text, "logprobs": completion_logprobs(logprobs, offset) if top is not None and logprobs is not None
            else None}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    offsets = [offset + sum(len(e.text) for e in entries[:i]) for i in range(len(entries))]
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**token(e.text, e.logprob), "top_logprobs": [token(t, v) for t, v in e.top]}
                        for e in entries], "refusal": None}
