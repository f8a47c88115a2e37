"""The HTTP server: settings, the API key, one error shape for everything (Starlette's refusals and bugs too),
Prometheus metrics, the page, the OpenAPI spec, the limits on what a client sends, and shutdown; the routes are in
routes_native.py and routes_openai.py.

    app = create_app(bank, ServeSettings(api_key="...", adapter_root="adapters"))
    make_server(app).run()                            # or: with running(app) as url: ...
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ..bank import BASE, AdapterBank
from ..errors import PeftT5Error
from .compiled import PARTS
from .engine import Engine
from .failures import SENT_WHOLE
from .on_demand import OnDemand
from .ratings import RatingStore, rating_plan
from .routes_native import adapter_routes, generation_routes, rating_routes
from .routes_openai import is_openai_path, openai_routes
from .schemas import ApiError, errors, openai_error

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
PUBLIC = ("/health", "/openapi.json", "/docs")  # no key needed: they hold no data (the spec: routes and limits)


@dataclass
class ServeSettings:
    api_key: str | None = None
    adapter_root: str | None = None  # run-time loads (POST /v1/adapters, on demand) only from under it (None: off)
    max_loaded_adapters: int | None = None  # adapters held at once; the least recently used unpinned one goes
    adapter_wait: float = 30.0  # seconds a request waits for a loaded adapter to fall idle (then 503)
    max_rows: int = 64  # rows decoding at once
    max_rows_per_request: int = 8  # rows of one request decoding at once (the rest wait their turn)
    threads: int | None = None  # torch threads of the model thread (engine.model_thread_threads)
    max_queue_rows: int = 1024  # rows waiting for a slot; beyond, requests get 503
    request_timeout: float | None = 300.0  # seconds a request may take; then 504 (None: no limit)
    max_request_tokens: int = 8192  # inputs x (beams or samples) x max_new_tokens in one request
    max_inputs: int = 32  # inputs in one request
    max_input_chars: int = 20_000  # characters in one input (its fields together)
    max_new_tokens: int = 256  # the most a request may ask for
    rate_questions: list[dict] = field(default_factory=list)  # --rate: questions to rate blind
    rate_systems: list[str] = field(default_factory=list)  # systems whose outputs are rated (default: all)
    ratings: str | None = None  # SQLite file of ratings
    trust_pickle: bool = False  # run-time loads may read pickled .bin adapters
    read_timeout: float = 30.0  # seconds to receive a request's head, and then its body; then the connection closes
    limit_concurrency: int = 512  # open connections; beyond, requests get 503 (uvicorn's setting)
    shutdown_timeout: float = 10.0  # on SIGTERM: seconds rows in flight may take to finish; then they are cut
    compile: bool = True  # the base-and-LoRA lane's decoder step and encoder compiled (eager until then)
    compile_cache: str | None = None  # where inductor keeps what it builds (None: TORCHINDUCTOR_CACHE_DIR or its own)
    kv_cache_dtype: str = "auto"  # the base-and-LoRA lane's attention caches (t5_runner.cache_dtype)

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within this server's limits can have: every input at its longest, each
        character JSON-escaped at its widest (12 bytes: a surrogate pair as two \\uXXXX), and 1 MiB for the rest."""
        return 12 * self.max_inputs * self.max_input_chars + 2**20


def error(status: int, message: str, field: str | None = None, headers: dict | None = None,
          request: Request | None = None) -> JSONResponse:
    """The server's error shape; on the OpenAI routes, OpenAI's (which the openai client reads the message from)."""
    if request is not None and is_openai_path(request.url.path):
        return JSONResponse(openai_error(status, message, field), status_code=status, headers=headers)
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
        self.source_tokens = Counter("peft_t5_source_tokens", "Source tokens generated from", registry=r)
        self.generated_tokens = Counter("peft_t5_generated_tokens", "Tokens generated", registry=r)
        self.active_rows = Gauge("peft_t5_active_rows", "Rows decoding in the continuous engine", registry=r)
        self.queued_rows = Gauge("peft_t5_queued_rows", "Rows waiting for a slot in the continuous engine",
                                 registry=r)
        self.step_rows = Histogram("peft_t5_step_rows", "Rows in one decoding step of the continuous engine",
                                   registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.steps = Histogram("peft_t5_step_seconds", "Seconds per decoding step of the continuous engine",
                               registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.loads = Histogram("peft_t5_adapter_load_seconds", "Adapters loaded on demand, and seconds each took",
                               registry=r, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10))
        self.evictions = Counter("peft_t5_adapter_evictions", "Adapters unloaded to make room (--max_loaded_adapters)",
                                 registry=r)
        self.engine = Info("peft_t5_engine", "How the engine computes: its decoder step, the base's weights, "
                                             "the attention caches' dtype, what runs int8 matmuls and peft-t5's own "
                                             "kernels", registry=r)
        self.compiled = {part: Gauge(f"peft_t5_{part}_compiled", f"The {what}'s graph for this many rows is "
                                                                 "compiled (1), or failed and runs eagerly (-1)",
                                     ["rows"], registry=r) for part, what in PARTS.items()}
        self.compile_seconds = {part: Gauge(f"peft_t5_{part}_compile_seconds", f"Seconds the {what}'s graph took to "
                                                                               "compile", ["rows"], registry=r)
                                for part, what in PARTS.items()}

    def adapter_loaded(self, seconds: float) -> None:
        self.loads.observe(seconds)

    def adapter_evicted(self) -> None:
        self.evictions.inc()


    def step(self, rows: int, seconds: float) -> None:
        self.step_rows.observe(rows)
        self.steps.observe(seconds)

    def graph_compiled(self, part: str, kind: str, seconds: float | None, error: str | None) -> None:
        rows = "1" if kind == "one" else "2+"
        self.compiled[part].labels(rows).set(-1 if error else 1)
        if seconds is not None:
            self.compile_seconds[part].labels(rows).set(seconds)


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
    engine = make_engine(bank, settings, metrics)
    rating_on = bool(settings.ratings and settings.rate_questions)
    store = RatingStore(settings.ratings) if rating_on else None
    systems, rate_prompt_of, left_out = rating_plan(bank.metadata, settings.rate_systems) if rating_on else ([], None, [])
    if left_out:
        logger.warning("blind rating leaves out %s: raters see only a question, and its prompt needs more",
                       ", ".join(left_out))
    pinned = {n for n in (*systems, rate_prompt_of) if n and n != BASE}  # rating needs them loaded
    on_demand = OnDemand(bank, engine, settings.adapter_root, settings.max_loaded_adapters,
                         pinned=pinned | set(bank.metadata), trust_pickle=settings.trust_pickle, metrics=metrics,
                         wait=settings.adapter_wait)
    page_html = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="peft-t5", lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.engine, app.state.bank, app.state.metrics, app.state.settings = engine, bank, metrics, settings
    app.state.rating = {"systems": systems, "left_out": left_out} if rating_on else None

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        if settings.api_key and path not in PUBLIC and routed(app, request.scope) and \
                not authorized(request, settings.api_key):
            response = unauthorized(request)
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug, not the client's fault: logged, answered and counted like any other reply
                logger.exception("%s %s failed", request.method, path)
                response = error(500, "internal error; the server logged it", request=request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            response.body_iterator = counted_stream(response.body_iterator, request.scope, route, started)
        else:
            count(route, response.status_code, started)
        return response

    def count(route: str, status: int, started: float) -> None:
        metrics.requests.labels(route, str(status)).inc()
        if status >= 400:
            metrics.errors.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def counted_stream(body, scope: dict, route: str, started: float):
        """A stream is counted once it ends: 200 if its route sent it whole, 499 if the client hung up first."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            count(route, 200 if scope.get(SENT_WHOLE) else 499, started)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # of a union's branches, the one that got furthest into the value says what is wrong (a branch of the
        # value's own type before one of another type)
        first = max(exc.errors(), key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type")))
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                         request=request)
        name = field_name(tuple(first.get("loc", ())))
        return error(422, f"{name}: {first['msg']}", name, request=request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own refusals (no such route, wrong method, a body it cannot parse) in the server's shape."""
        if exc.status_code == 400:
            message = "the body is not valid JSON (not UTF-8, or nested too deeply); send UTF-8 JSON"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several routes
            headers = {"Allow": ", ".join(allowed_methods(app, request.scope))}
        return error(exc.status_code, message, headers=headers, request=request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.field, request=request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": bank.names}

    @app.get("/", response_class=HTMLResponse, responses=errors(401))
    async def page():
        return HTMLResponse(page_html)

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(generation_routes(bank, engine, settings, metrics, on_demand))
    app.include_router(openai_routes(bank, engine, settings, metrics, on_demand))
    app.include_router(adapter_routes(bank, engine, settings, app.state.rating, pinned, on_demand))
    app.include_router(rating_routes(bank, engine, settings, store, systems, rate_prompt_of))

    def cached_spec() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_spec(app, settings)
        return app.openapi_schema

    app.openapi = cached_spec
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.read_timeout)
    return app


class BodyLimit:
    """Reads a request's body before the app does, refusing (413) one over `limit` bytes by its Content-Length or,
    chunked, as soon as it passes the limit, and (408) one that takes over `timeout` seconds: Starlette buffers and
    parses a body whole, with no limit of its own."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(request, 413, f"{int(declared):,} bytes", send)
        chunks, size, deadline = [], 0, time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self.refuse(request, 408, f"not received within {self.timeout:g} s", send)
            if message["type"] != "http.request":
                return await self.app(scope, replay([message], receive), send)  # the client left: the app sees it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(request, 413, f"over {size:,} bytes", send)
            if not message.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay([body], receive), send)

    async def refuse(self, request: Request, status: int, why: str, send) -> None:
        fix = (f"this server takes at most {self.limit:,} bytes; send fewer or shorter inputs" if status == 413 else
               "send the whole body at once")
        response = error(status, f"the request body: {why}; {fix}", request=request)
        response.headers["connection"] = "close"
        await response(request.scope, request.receive, send)


def replay(messages: list[dict], receive):
    """An ASGI receive that gives `messages` first, then what `receive` gives."""
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


def make_engine(bank: AdapterBank, settings: ServeSettings, metrics: Metrics) -> Engine:
    engine = Engine(bank, settings.max_rows, settings.max_queue_rows,
                    max_rows_per_request=settings.max_rows_per_request, threads=settings.threads,
                    on_step=metrics.step, compile=settings.compile, compile_cache=settings.compile_cache,
                    on_compiled=metrics.graph_compiled, kv_cache_dtype=settings.kv_cache_dtype)
    metrics.engine.info(engine.describe())
    logger.info("engine: %s", ", ".join(f"{k} {v}" for k, v in engine.describe().items()))
    metrics.active_rows.set_function(lambda: engine.active_rows)  # read when /metrics is scraped
    metrics.queued_rows.set_function(lambda: engine.waiting_rows)
    return engine


def routed(app: FastAPI, scope: dict) -> bool:
    """A route answers this method at this path; elsewhere the answer is 404 or 405 (as the spec says), key or not."""
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods some route of the app answers at this request's path."""
    return [method for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.routes)]


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
    return error(401, message, request=request)


def openapi_spec(app: FastAPI, settings: ServeSettings) -> dict:
    """FastAPI's spec, corrected: errors have the server's one shape ({"error", "field"}, not FastAPI's
    {"detail": [...]}), every route but the PUBLIC ones may answer 401 when a key is set, and the limits are this
    server's."""
    spec = get_openapi(title="peft-t5", version="1", routes=app.routes,
                       description="LoRA adapters for T5 on one base: generate, load/unload adapters, rate blind.")
    for path, operations in spec["paths"].items():
        body = "OpenAIErrorBody" if is_openai_path(path) else "ErrorBody"
        ref = {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
        for operation in operations.values():
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = {"description": "A field is invalid", "content": ref}
            if settings.api_key and path not in PUBLIC:
                responses.setdefault("401", {"description": "Missing or wrong API key"})
            for status, response in responses.items():
                if status >= "400":  # errors are JSON, also on routes whose success is a page or text
                    response["content"] = dict(ref)
            if path == "/" and "401" in responses:  # a browser asking for a page is told how to pass the key
                responses["401"]["content"]["text/html"] = {"schema": {"type": "string"}}
    schemas = spec["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    generate = schemas["GenerateRequest"]["properties"]
    generate["inputs"]["maxItems"] = settings.max_inputs
    for branch in generate["inputs"]["items"]["anyOf"]:
        (branch if branch["type"] == "string" else branch["additionalProperties"])["maxLength"] = \
            settings.max_input_chars
    generate["max_new_tokens"]["maximum"] = settings.max_new_tokens
    rows = min(settings.max_rows_per_request or settings.max_rows, settings.max_rows)  # an input's rows run at once
    for name, count in (("GenerateRequest", "n"), ("GenerateRequest", "num_beams"), ("CompletionRequest", "n"),
                        ("CompletionRequest", "best_of"), ("ChatRequest", "n")):
        schema = schemas[name]["properties"][count]
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "integer":
                branch["maximum"] = min(branch["maximum"], rows)
    return spec


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """uvicorn around the app, with the server's limits: a deadline for a request's head (uvicorn has none, so a
    client sending a byte every few seconds held its connection forever), open connections, and a shutdown that
    refuses queued requests at once (503) and gives rows in flight --shutdown_timeout seconds."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings, engine = app.state.settings, app.state.engine

    class TimedProtocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(settings.read_timeout, transport.close)

        def data_received(self, data: bytes) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.head_timer is None:  # the first byte of the next request's head: its deadline starts
                self.head_timer = self.loop.call_later(settings.read_timeout, self.transport.close)
            super().data_received(data)
            if self.head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self.head_timer.cancel()  # the head is in (the body has its own deadline in BodyLimit)
                self.head_timer = None

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            engine.stop_admitting()
            cut = asyncio.get_running_loop().call_later(settings.shutdown_timeout, engine.stop_decoding)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

    # uvicorn's own grace period is the backstop: it cancels what is left (a stream whose client stopped reading)
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", http=TimedProtocol,
                                 limit_concurrency=settings.limit_concurrency,
                                 timeout_graceful_shutdown=settings.shutdown_timeout + 5))


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve `app` on a background thread (a notebook, a test, a benchmark); yields its base URL, stops on exit."""
    import threading

    server = make_server(app, host, port)
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
