"""The HTTP API and page: routes, the API key, one-line JSON errors, Prometheus metrics.

    app = create_app(bank, ServeSettings(api_key="...", adapter_root="adapters"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Union

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from ..bank import BASE, AdapterBank
from ..errors import PeftT5Error
from .batcher import AdapterGone, Batcher
from .ratings import RatingStore, rating_plan

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PUBLIC = ("/health", "/openapi.json", "/docs")  # no key needed: they hold no data (the spec: routes and limits)
MAX_PATH = 4096  # characters in a run-time adapter path (Linux's PATH_MAX); a segment may hold 255 bytes


@dataclass
class ServeSettings:
    api_key: str | None = None
    adapter_root: str | None = None  # POST /v1/adapters loads only folders under it (None: run-time loading off)
    max_batch_size: int = 32  # examples in one generate call
    max_wait_ms: float = 5.0  # how long the first waiting request waits for others to join its batch
    batching: str = "across"  # across | none | switch (see batcher.py)
    max_inputs: int = 32  # inputs in one request
    max_input_chars: int = 20_000  # characters in one input (its fields together)
    max_new_tokens: int = 256  # the most a request may ask for
    rate_questions: list[dict] = field(default_factory=list)  # --rate: questions to rate blind
    rate_systems: list[str] = field(default_factory=list)  # systems whose outputs are rated (default: all)
    ratings: str | None = None  # SQLite file of ratings
    trust_pickle: bool = False  # run-time loads may read pickled .bin adapters


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


def errors(*statuses: int) -> dict:
    """The error responses a route sends, for the OpenAPI spec."""
    return {status: {"model": ErrorBody} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status, headers=headers)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("peft_t5_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = Counter("peft_t5_errors", "HTTP requests answered with an error (4xx, 5xx)", ["route", "status"],
                              registry=r)
        self.latency = Histogram("peft_t5_request_seconds", "Request latency", ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_examples = Histogram("peft_t5_batch_examples", "Examples per generate call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("peft_t5_batch_seconds", "Seconds per generate call", registry=r)
        self.source_tokens = Counter("peft_t5_source_tokens", "Source tokens generated from", registry=r)
        self.generated_tokens = Counter("peft_t5_generated_tokens", "Tokens generated", registry=r)

    def batch(self, examples: int, seconds: float) -> None:
        self.batch_examples.observe(examples)
        self.batch_seconds.observe(seconds)


def field_name(loc: tuple) -> str:
    """pydantic's location ('body', 'inputs', 0, 'str') as the field a user wrote: inputs[0]."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "dict[str,str]") or "[" in str(part):
            continue  # pydantic's name for a branch of a union or a validator, not a field
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def create_app(bank: AdapterBank, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = Metrics()
    batcher = Batcher(bank, settings.max_batch_size, settings.max_wait_ms, settings.batching, on_batch=metrics.batch)
    rating_on = bool(settings.ratings and settings.rate_questions)
    store = RatingStore(settings.ratings) if rating_on else None
    systems, rate_prompt_of, left_out = rating_plan(bank.metadata, settings.rate_systems) if rating_on else ([], None, [])
    if left_out:
        logger.warning("blind rating leaves out %s: its prompt needs more than a question", ", ".join(left_out))
    pinned = {n for n in (*systems, rate_prompt_of) if n and n != BASE}  # rating needs them loaded
    page_html = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="peft-t5", lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.batcher, app.state.bank, app.state.metrics = batcher, bank, metrics
    app.state.rating = {"systems": systems, "left_out": left_out} if rating_on else None

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        if settings.api_key and path not in PUBLIC and not authorized(request, settings.api_key):
            response = unauthorized(request)
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug, not the client's fault: logged, answered and counted like any other reply
                logger.exception("%s %s failed", request.method, path)
                response = error(500, "internal error; the server logged it")
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # of a union's branches, the one that got furthest into the value says what is wrong
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
        name = field_name(tuple(first.get("loc", ())))
        return error(422, f"{name}: {first['msg']}", name)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own refusals (no such route, wrong method, a body it cannot parse) in the server's shape."""
        if exc.status_code == 400:
            message = "the body is not valid JSON (not UTF-8, or nested too deeply); send UTF-8 JSON"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several routes
            headers = {"Allow": ", ".join(sorted({m for r in app.routes if r.path_regex.match(request.url.path)
                                                  for m in getattr(r, "methods", ())}))}
        return error(exc.status_code, message, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.field)

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": bank.names}

    @app.get("/", response_class=HTMLResponse, responses=errors(401))
    async def page():
        return HTMLResponse(page_html)

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/adapters", responses=errors(401))
    async def adapters():
        return {"adapters": [describe(bank, name) for name in bank.names], "rating": app.state.rating or False}

    @app.post("/v1/generate", responses=errors(400, 401, 404, 413, 422))
    async def generate(body: GenerateRequest):
        names, sources, truncated, answer = check_generate(body)
        try:
            raws = await batcher.generate(names, sources, body.max_new_tokens, body.num_beams)
        except AdapterGone as e:
            raise ApiError(404, str(e), "adapter")
        metrics.generated_tokens.inc(sum(len(ids) for ids in bank.tokenizer(raws).input_ids) if raws else 0)
        return {"adapter": body.adapter, "outputs": [
            {"output": answer(raw), "raw": raw, "truncated": cut} for raw, cut in zip(raws, truncated)]}

    def check_generate(body: GenerateRequest):
        if body.adapter not in bank.names:
            raise ApiError(404, f"adapter: no adapter named {body.adapter!r}; loaded: {', '.join(bank.names)}",
                           "adapter")
        if body.prompt_of is not None and body.prompt_of not in bank.metadata:
            raise ApiError(404, f"prompt_of: no adapter named {body.prompt_of!r}; loaded: "
                                f"{', '.join(bank.metadata)}", "prompt_of")
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
        if body.max_new_tokens > settings.max_new_tokens:
            raise ApiError(422, f"max_new_tokens: {body.max_new_tokens} is over this server's limit of "
                                f"{settings.max_new_tokens}", "max_new_tokens")
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

    @app.post("/v1/adapters", status_code=201, responses=errors(400, 401, 403, 404, 409, 422))
    async def load_adapter(body: LoadRequest):
        if settings.adapter_root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapter_root DIR")
        if not ADAPTER_NAME.match(body.name) or body.name == BASE:
            raise ApiError(422, f"name: {body.name!r} is not a valid adapter name (letters, digits, _ . -, at most "
                                f"64, not '{BASE}')", "name")
        path = inside_root(settings.adapter_root, body.path)
        try:
            meta = await batcher.on_model_thread(bank.add, body.name, str(path), settings.trust_pickle)
        except PeftT5Error as e:
            status = 409 if "already loaded" in str(e) else 404 if "no such adapter folder" in str(e) else 422
            raise ApiError(status, str(e), "name" if status == 409 else "path")
        return {"loaded": body.name, "task": meta.get("task")}

    @app.delete("/v1/adapters/{name}", responses=errors(401, 404, 409))
    async def unload_adapter(name: str):
        if name not in bank.metadata:
            raise ApiError(404, f"no adapter named {name!r}; loaded: {', '.join(bank.metadata)}", "name")
        if name in pinned:
            raise ApiError(409, f"{name!r} is rated blind on this server (its outputs, or its prompt for base); it "
                                "stays loaded while rating is on", "name")
        try:
            await batcher.on_model_thread(bank.remove, name)
        except PeftT5Error as e:
            raise ApiError(409, str(e), "name")
        return {"unloaded": name}

    def rating_store() -> RatingStore:
        if store is None:
            raise ApiError(404, "rating is off; start the server with --rate QUESTIONS --ratings ratings.db")
        return store

    @app.get("/v1/rate/next", responses=errors(401, 404, 422))
    async def rate_next(rater: Annotated[str, Query(min_length=1, max_length=64), AfterValidator(unicode_text)]):
        ratings = rating_store()
        question_id = ratings.next_question(rater, len(settings.rate_questions))
        if question_id is None:
            return {"done": True}
        question = settings.rate_questions[question_id]["question"]
        outputs = ratings.cached_outputs(question_id)
        if not set(systems) <= set(outputs):
            sources = [bank.sources(s, [question], rate_prompt_of if s == BASE else None)[0] for s in systems]
            raws = await batcher.generate(list(systems), sources, 64, 1)
            ratings.cache_outputs(question_id, {s: bank.answer(s, r) for s, r in zip(systems, raws)})
            outputs = ratings.cached_outputs(question_id)
        return {"done": False, **ratings.show(question_id, question, {s: outputs[s] for s in systems}, rater)}

    @app.post("/v1/ratings", status_code=201, responses=errors(400, 401, 403, 404, 422))
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

    @app.get("/v1/ratings/summary", responses=errors(401, 404))
    async def summary():
        return {"systems": rating_store().summary()}

    def cached_spec() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_spec(app, settings)
        return app.openapi_schema

    app.openapi = cached_spec
    return app


def authorized(request: Request, key: str) -> bool:
    """A bearer token, or (for the page only, as Jupyter does) ?key= in its address."""
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else None
    if given is None and request.url.path == "/":
        given = request.query_params.get("key")
    return given is not None and secrets.compare_digest(given.encode(), key.encode())


def unauthorized(request: Request) -> Response:
    """401: JSON for a client, a page saying how to pass the key for a browser."""
    message = "missing or wrong API key; send the header 'Authorization: Bearer KEY'"
    if request.url.path == "/" and "text/html" in request.headers.get("accept", ""):
        return HTMLResponse("<!doctype html><title>peft-t5: key needed</title><h1>This server needs its API key</h1>"
                            "<p>Open this page as <code>/?key=KEY</code>, with the key the server was started with "
                            "(<code>--api_key</code>).</p>", status_code=401)
    return error(401, message)


def inside_root(root: str, path: str) -> Path:
    """The folder `path` names under `root`, refused if it, or any file in it, resolves (symlinks followed)
    outside the root."""
    if "\x00" in path or any(len(os.fsencode(part)) > 255 for part in Path(path).parts):
        raise ApiError(404, "path: no such adapter folder (no path holds a NUL byte or a name over 255 bytes); give "
                            "a folder under the adapter root", "path")
    base = Path(root).resolve()
    try:
        target = (base / path).resolve()
        outside = [target] if not target.is_relative_to(base) else \
            [p for p in (target.rglob("*") if target.is_dir() else ()) if not p.resolve().is_relative_to(base)]
    except (OSError, RuntimeError) as e:  # a loop of links, a name too long for the file system
        raise ApiError(422, f"path: {path[:100]!r} cannot be resolved ({type(e).__name__}); give a folder under the "
                            "adapter root", "path")
    if outside:
        what = "" if outside[0] == target else f" (its {outside[0].relative_to(target)} links out)"
        raise ApiError(403, f"path: {path!r} is outside the adapter root{what}; give a folder under it", "path")
    return target


def openapi_spec(app: FastAPI, settings: ServeSettings) -> dict:
    """FastAPI's spec, corrected: errors have the server's one shape ({"error", "field"}, not FastAPI's
    {"detail": [...]}), every route but /health may answer 401 when a key is set, and the limits are this
    server's."""
    spec = get_openapi(title="peft-t5", version="1", routes=app.routes,
                       description="LoRA adapters for T5 on one base: generate, load/unload adapters, rate blind.")
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = {"description": "A field is invalid", "content": ref}
            if settings.api_key and path not in PUBLIC:
                responses.setdefault("401", {"description": "Missing or wrong API key", "content": ref})
    schemas = spec["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    generate = schemas["GenerateRequest"]["properties"]
    generate["inputs"]["maxItems"] = settings.max_inputs
    for branch in generate["inputs"]["items"]["anyOf"]:
        (branch if branch["type"] == "string" else branch["additionalProperties"])["maxLength"] = \
            settings.max_input_chars
    generate["max_new_tokens"]["maximum"] = settings.max_new_tokens
    return spec


def describe(bank: AdapterBank, name: str) -> dict:
    if name == BASE:
        return {"name": BASE, "task": None, "base_model": bank.base_name, "template": None}
    meta = bank.metadata[name]
    return {"name": name, "task": meta.get("task"), "base_model": meta.get("base_model"),
            "template": meta.get("template"), "max_source_length": bank.source_limit(name),
            "qlora": meta.get("qlora"), "metrics": {k: v for k, v in (meta.get("metrics") or {}).items()
                                                    if k.startswith("eval_") and "runtime" not in k
                                                    and "per_second" not in k}}


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve `app` on a background thread (a notebook, a test, a benchmark); yields its base URL, stops on exit."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="peft-t5-server")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise PeftT5Error(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
