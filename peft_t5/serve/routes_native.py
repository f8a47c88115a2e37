"""The native API's routes: generation, adapters loaded and unloaded at run time, blind rating. Each router is built
over the server's bank, engine and settings (create_app includes them)."""
from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator

from ..bank import BASE, AdapterBank
from ..errors import ConflictError, NotFoundError, PeftT5Error
from .engine import Engine
from .failures import api_error, marked_when_whole, while_connected
from .on_demand import Full, OnDemand, inside_root
from .ratings import RatingStore
from .schemas import ADAPTER_NAME, ApiError, GenerateRequest, LoadRequest, RateRequest, errors, sse, unicode_text


def generation_routes(bank: AdapterBank, engine: Engine, settings, metrics, on_demand: OnDemand) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/generate", responses=errors(400, 401, 404, 413, 422, 503, 504))
    async def generate(body: GenerateRequest, request: Request):
        async with AsyncExitStack() as held:  # the adapters stay loaded until the answer (or the stream) ends
            await held.enter_async_context(on_demand.holding(body.adapter, body.prompt_of, field="adapter"))
            if body.adapter in bank.metadata and bank.kind(body.adapter) == "extractive":
                return await answer_spans(body, request)
            names, sources, truncated, answer = check_generate(body)
            options = dict(num_beams=body.num_beams, n=body.n, sampling=body.sampling(body.logprobs), stop=body.stops,
                           min_new_tokens=body.min_new_tokens, timeout=settings.request_timeout)
            if body.stream:
                events = stream(body, names, sources, truncated, answer, options, held.pop_all())
                return StreamingResponse(marked_when_whole(request, events), media_type="text/event-stream")
            try:
                done = await while_connected(request, engine.complete(names, sources, body.max_new_tokens, **options))
            except Exception as e:
                raise api_error(e) or e
            return reply(body, done, truncated, answer)

    async def answer_spans(body: GenerateRequest, request: Request) -> dict:
        """An extractive adapter's answers: for each {question, context}, the best span of the context ("raw"), its
        margin against no answer, and the answer: "" where that margin is over the threshold recorded in training."""
        for name in sorted(body.model_fields_set - {"adapter", "inputs"}):
            if getattr(body, name) != GenerateRequest.model_fields[name].default:
                raise ApiError(422, f"{name}: {body.adapter!r} is an extractive adapter: it answers a question "
                                    f"about a context with a span of it, not by decoding; leave {name} out", name)
        check_inputs(body)
        try:
            bank.span_records(body.adapter, body.inputs)
            threshold = bank.span_threshold(body.adapter)
        except PeftT5Error as e:
            if body.adapter not in bank.metadata:
                raise ApiError(404, f"adapter: {body.adapter!r} was unloaded before this request ran", "adapter")
            field = str(e).split(":", 1)[0]
            raise ApiError(422, str(e), field if field.startswith("inputs[") else "inputs")
        try:
            found = await while_connected(request, engine.extract(body.adapter, body.inputs,
                                                                  timeout=settings.request_timeout))
        except Exception as e:
            raise api_error(e) or e
        return {"adapter": body.adapter, "outputs": [
            {"output": span.answer(threshold), "raw": span.text, "null_margin": span.na_score,
             "finish_reason": "no_answer" if span.answer(threshold) == "" else "span", "tokens": 0,
             "truncated": False} for span in found]}

    def reply(body: GenerateRequest, done: list, truncated: list[bool], answer) -> dict:
        """Each input's output; with n > 1 also its candidates (the first is the output)."""
        metrics.generated_tokens.inc(sum(c.tokens for c in done))

        def output(c) -> dict:
            return {"output": answer(c.text), "raw": c.text, "finish_reason": c.finish_reason, "tokens": c.tokens,
                    **({"logprobs": [{"token": e.text, "logprob": e.logprob, "top": dict(e.top)} for e in c.logprobs]}
                       if body.logprobs is not None and c.logprobs is not None else {})}
        outputs = []
        for i, cut in enumerate(truncated):
            candidates = [output(c) for c in done[i * body.n:(i + 1) * body.n]]
            outputs.append({**candidates[0], "truncated": cut, **({"candidates": candidates} if body.n > 1 else {})})
        return {"adapter": body.adapter, "outputs": outputs}

    async def stream(body: GenerateRequest, names, sources, truncated, answer, options, held: AsyncExitStack):
        """Events {"index", "piece"} as raw outputs grow (index: input i's candidate j is i * n + j), then the reply
        /v1/generate gives, then [DONE]."""
        done = [None] * (len(sources) * body.n)
        async with held:
            async for event in stream_events(body, names, sources, truncated, answer, options, done):
                yield event

    async def stream_events(body, names, sources, truncated, answer, options, done):
        try:
            async for piece in engine.events(names, sources, body.max_new_tokens, **options):
                if piece.text:
                    yield sse({"index": piece.index, "piece": piece.text})
                if piece.ended:
                    done[piece.index] = piece.ended
            yield sse(reply(body, done, truncated, answer))
        except Exception as e:  # the status line is sent: the error goes in the stream, in the one error shape
            known = api_error(e)
            yield sse({"error": known.message, "field": known.field} if known else
                      {"error": "internal error; the server logged it"})
            if not known:
                raise
        yield "data: [DONE]\n\n"

    def check_generate(body: GenerateRequest):
        if body.adapter not in bank.names:
            raise ApiError(404, f"adapter: no adapter named {body.adapter!r}; loaded: {', '.join(bank.names)}",
                           "adapter")
        if body.prompt_of is not None and body.prompt_of not in bank.metadata:
            raise ApiError(404, f"prompt_of: no adapter named {body.prompt_of!r}; loaded: "
                                f"{', '.join(bank.metadata)}", "prompt_of")
        check_inputs(body)
        if body.max_new_tokens > settings.max_new_tokens:
            raise ApiError(422, f"max_new_tokens: {body.max_new_tokens} is over this server's limit of "
                                f"{settings.max_new_tokens}", "max_new_tokens")
        if body.min_new_tokens > body.max_new_tokens:
            raise ApiError(422, f"min_new_tokens: {body.min_new_tokens} is over max_new_tokens "
                                f"({body.max_new_tokens})", "min_new_tokens")
        if body.num_beams > 1:
            check_beams(body)
        rows = max(body.num_beams, body.n)
        cost = len(body.inputs) * rows * body.max_new_tokens
        if cost > settings.max_request_tokens:
            raise ApiError(413, f"max_new_tokens: {len(body.inputs)} inputs x {rows} "
                                f"{'beams' if body.num_beams > 1 else 'candidates'} x "
                                f"{body.max_new_tokens} tokens is {cost:,}, over this server's limit of "
                                f"{settings.max_request_tokens:,} a request; send fewer inputs, beams or tokens",
                           "max_new_tokens")
        try:  # unloads run on the model thread: an adapter checked above may be gone by now
            answer = bank.answerer(body.adapter)  # bound now, so that the reply needs no metadata
            sources = bank.sources(body.adapter, body.inputs, body.prompt_of)
            limit = bank.source_limit(body.adapter)
        except PeftT5Error as e:
            gone = [n for n in (body.adapter, body.prompt_of) if n and n not in bank.names]
            if gone:
                raise ApiError(404, f"adapter: {gone[0]!r} was unloaded before this request ran", "adapter")
            raise ApiError(422, f"inputs: {e}", "inputs")
        lengths = [len(ids) for ids in bank.tokenizer(sources).input_ids]
        metrics.source_tokens.inc(sum(min(n, limit) for n in lengths))
        return [body.adapter] * len(sources), sources, [n > limit for n in lengths], answer

    def check_inputs(body: GenerateRequest) -> None:
        if not body.inputs:
            raise ApiError(422, "inputs: empty; send at least one input", "inputs")
        if len(body.inputs) > settings.max_inputs:
            raise ApiError(413, f"inputs: {len(body.inputs)} inputs, over this server's limit of {settings.max_inputs} "
                                "a request; split them", "inputs")
        for i, item in enumerate(body.inputs):
            size = len(item) if isinstance(item, str) else sum(len(v) for v in item.values())
            if size > settings.max_input_chars:
                raise ApiError(413, f"inputs[{i}]: {size:,} characters, over this server's limit of "
                                    f"{settings.max_input_chars:,}", f"inputs[{i}]")

    return router


def check_beams(body: GenerateRequest) -> None:
    """Beam search ranks whole sequences: the fields that change how one token is chosen do not apply to it."""
    for name in ("n", "logprobs", "stop", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not (name == "n" and value == 1) and not (name == "temperature" and value == 0):
            raise ApiError(422, f"{name}: not with num_beams {body.num_beams}; beam search keeps the most likely "
                                "sequences (send num_beams 1 to sample)", name)


def adapter_routes(bank: AdapterBank, engine: Engine, settings, rating: dict | None, pinned: set[str],
                   on_demand: OnDemand) -> APIRouter:
    """pinned: adapters blind rating needs loaded."""
    router = APIRouter()

    @router.get("/v1/adapters", responses=errors(401))
    async def adapters():
        described = (describe(bank, name) for name in bank.names)
        return {"adapters": [d for d in described if d], "rating": rating or False}

    @router.post("/v1/adapters", status_code=201, responses=errors(400, 401, 403, 404, 409, 422))
    async def load_adapter(body: LoadRequest):
        if settings.adapter_root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapter_root DIR")
        if not ADAPTER_NAME.match(body.name) or body.name == BASE:
            raise ApiError(422, f"name: {body.name!r} is not a valid adapter name (letters, digits, _ . -, at most "
                                f"64, not '{BASE}')", "name")
        path = inside_root(settings.adapter_root, body.path)
        try:
            meta = await on_demand.load(body.name, str(path))
        except PeftT5Error as e:
            status = 409 if isinstance(e, ConflictError) else 404 if isinstance(e, NotFoundError) else \
                503 if isinstance(e, Full) else 422
            raise ApiError(status, str(e), "name" if status == 409 else "path")
        return {"loaded": body.name, "task": meta.get("task")}

    @router.delete("/v1/adapters/{name}", responses=errors(401, 404, 409))
    async def unload_adapter(name: str):
        if name not in bank.metadata:
            raise ApiError(404, f"no adapter named {name!r}; loaded: {', '.join(bank.metadata)}", "name")
        if name in pinned:
            raise ApiError(409, f"{name!r} is rated blind on this server (its outputs, or its prompt for base); it "
                                "stays loaded while rating is on", "name")
        try:
            await engine.on_model_thread(bank.remove, name)
        except PeftT5Error as e:
            raise ApiError(409, str(e), "name")
        on_demand.forget(name)
        return {"unloaded": name}

    return router


def rating_routes(bank: AdapterBank, engine: Engine, settings, store: RatingStore | None, systems: list[str],
                  rate_prompt_of: str | None) -> APIRouter:
    router = APIRouter()

    def rating_store() -> RatingStore:
        if store is None:
            raise ApiError(404, "rating is off; start the server with --rate QUESTIONS --ratings ratings.db")
        return store

    @router.get("/v1/rate/next", responses=errors(401, 404, 422))
    async def rate_next(rater: Annotated[str, Query(min_length=1, max_length=64), AfterValidator(unicode_text)]):
        ratings = rating_store()
        question_id = ratings.next_question(rater, len(settings.rate_questions))
        if question_id is None:
            return {"done": True}
        question = settings.rate_questions[question_id]["question"]
        outputs = ratings.cached_outputs(question_id)
        if not set(systems) <= set(outputs):
            sources = [bank.sources(s, [question], rate_prompt_of if s == BASE else None)[0] for s in systems]
            raws = await engine.generate(list(systems), sources, 64)
            ratings.cache_outputs(question_id, {s: bank.answer(s, r) for s, r in zip(systems, raws)})
            outputs = ratings.cached_outputs(question_id)
        return {"done": False, **ratings.show(question_id, question, {s: outputs[s] for s in systems}, rater)}

    @router.post("/v1/ratings", status_code=201, responses=errors(400, 401, 403, 404, 422))
    async def rate(body: RateRequest):
        try:
            stored = rating_store().rate(body.id, [s.model_dump() for s in body.scores], body.rater)
        except KeyError:
            raise ApiError(404, f"id: {body.id!r} was never shown; ask GET /v1/rate/next for an item", "id")
        except PermissionError:
            raise ApiError(403, f"id: {body.id!r} was shown to another rater; rate the items GET /v1/rate/next "
                                "shows you", "id")
        except ValueError as e:
            raise ApiError(422, str(e), "scores")
        return {"stored": stored}

    @router.get("/v1/ratings/summary", responses=errors(401, 404))
    async def summary():
        return {"systems": rating_store().summary()}

    return router


def describe(bank: AdapterBank, name: str) -> dict | None:
    """What GET /v1/adapters says of an adapter; None where it was unloaded meanwhile (on the model thread)."""
    if name == BASE:
        return {"name": BASE, "kind": "generative", "task": None, "base_model": bank.base_name, "template": None}
    meta, method = bank.metadata.get(name), bank.methods.get(name)
    if meta is None or method is None:
        return None
    spans = bank.kind(name) == "extractive"
    return {"name": name, "kind": bank.kind(name), "task": meta.get("task"), "base_model": meta.get("base_model"),
            "method": method.name,
            "batches": "one forward pass per input, batched with other requests' inputs" if spans else
                       "mixed per row with other adapters" if method.mixed_batches else "a forward pass of its own "
                       "each step",
            "template": meta.get("template"), "max_source_length": bank.source_limit(name),
            "qlora": meta.get("qlora"), "metrics": {k: v for k, v in (meta.get("metrics") or {}).items()
                                                    if k.startswith("eval_") and "runtime" not in k
                                                    and "per_second" not in k}}
