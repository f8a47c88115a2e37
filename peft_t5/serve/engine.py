"""Continuous batching: admit -> encode -> step every active row (each through its own adapter) -> retire.

    engine = Engine(bank, max_rows=64)
    engine.start()                                    # in the server's event loop: starts the model thread
    done = await engine.complete(["jokes"], sources, 32, n=4, sampling=Sampling(temperature=0.8, seed=1))
    async for piece in engine.events(...):            # Piece(index, text, logprobs, ended) as outputs grow

Each decoding step runs every active row once. A new request's rows are encoded and join at the next step (a
bounded number of source tokens is encoded per step, so a long request cannot stall the others while it is read);
a row that ends (</s>, a stop string or its token budget) leaves at once and its slot is reused. Rows are admitted
round-robin across requests, so a small request gets a slot beside a large one. The samples or beams of one input
are rows admitted together, its source encoded once. How each row's next token is chosen (greedy, sampling, beam
groups) is decoding.py's; greedy and beam outputs equal `generate()`'s.

Rows step in lanes: rows of LoRA adapters and the base share one pass over static buffers (t5_runner.T5Runner:
each row's LoRA from a slot), its step and encoder compiled (compiled.py) unless compile=False; rows of each other
adapter take a pass of their own through its PeftModel's layers in the same step (module_runner.py, eager; a
prompt-tuning adapter's soft prompt goes before its sources); no method waits for another's request to end.

Extractive adapters answer by span (engine.extract): their requests' windows wait in a queue of their own, and
each turn of the model thread runs one forward pass per extractive adapter over the windows waiting (within a token
budget), between two decoding steps; never generate().

One thread owns the model: it runs the steps and, between them, whatever else must touch the model (loading and
unloading adapters, on_demand.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..bank import BASE, AdapterBank
from ..quantize import page_out_checkpoint
from .compiled import CompiledStep
from .decoding import GREEDY, BeamGroup, Sampling, choose, generator_for
from .failures import AdapterGone, Busy, DeadlineExceeded, Stopping, TooLarge
from .module_runner import ModuleRunner, release_when_idle
from .t5_runner import T5Runner, cache_dtype, slot_problem, static_problem

logger = logging.getLogger(__name__)
IDLE_RELEASE_S = 5.0  # no row for this long: the slots a burst of rows grew go back to the OS (release_when_idle);
# not at once, so that a client sending one request after another does not grow them again for each (~0.17 s for 32
# SQuAD rows' 403 MB of caches)


@dataclass
class TokenLogprob:
    """One output token: its text (the pieces of an output concatenate to its text), its log-probability and the
    most likely alternatives (token text, log-probability)."""
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Completion:
    """One output as the engine decoded it: its text, how many tokens it decoded (</s> included), why it ended
    ("stop": </s> or a stop string; "length": its token budget), and its tokens' log-probabilities when asked."""
    text: str
    tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    mean_logprob: float | None = None  # over its decoded tokens (best_of ranks by it)
    ids: list[int] = field(default_factory=list)  # the token ids decoded


@dataclass
class Piece:
    """A streamed event: more text of output `index` (and its tokens' log-probabilities), and the completion once
    it has ended."""
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ended: Completion | None = None


@dataclass(eq=False)
class Request:
    names: list[str]
    sources: list[str]
    max_new_tokens: int
    deadline: float | None  # time.monotonic() by which it must end
    future: asyncio.Future
    on_piece: object = None  # callable(Piece) on the event loop, for streaming
    min_new_tokens: int = 0  # </s> (and stop strings) are not chosen before (as generate()'s min_new_tokens)
    sampling: Sampling = GREEDY
    n: int = 1  # outputs per input (samples), each a row; output i*n + j is sample j of input i
    num_beams: int = 1  # beams per input, each a row; one output per input
    stop: tuple[str, ...] = ()
    want_logprob: bool = False  # rows record their tokens' log-probabilities
    outputs: list = field(default_factory=list)
    left: int = 0
    active: int = 0  # its rows holding a slot now
    failed: bool = False  # set on the model thread when it fails the request

    def __post_init__(self):
        self.left = len(self.sources) * self.n
        self.outputs = [None] * self.left

    @property
    def over(self) -> bool:
        return self.failed or self.future.done() or (self.deadline is not None and time.monotonic() > self.deadline)


@dataclass(eq=False)
class SpanRequest:
    """An extractive adapter's inputs, as windows over their contexts; answered once every input's windows have had
    their forward pass."""
    name: str
    records: list[dict]
    windows: object  # extractive.Windows: window i belongs to input windows.record[i]
    max_answer_length: int
    deadline: float | None
    future: asyncio.Future
    starts: list = field(default_factory=list)  # per window, its logits once computed
    ends: list = field(default_factory=list)
    next: int = 0  # the first window not yet taken
    failed: bool = False

    def __post_init__(self):
        self.starts = [None] * len(self.windows.input_ids)
        self.ends = [None] * len(self.windows.input_ids)

    @property
    def over(self) -> bool:
        return self.failed or self.future.done() or (self.deadline is not None and time.monotonic() > self.deadline)

    def next_input(self) -> range:
        """The windows of the next input not yet taken."""
        record, end = self.windows.record[self.next], self.next
        while end < len(self.windows.record) and self.windows.record[end] == record:
            end += 1
        return range(self.next, end)


@dataclass(eq=False)
class Row:
    request: Request
    index: int  # its output's index
    input: int  # its input's index
    source: list[int]  # token ids, truncated as its adapter was trained
    generator: torch.Generator | None = None  # its own random numbers, when it samples
    beam: BeamGroup | None = None  # the beams of its input, when it is one of them
    beam_index: int = 0  # its place in its beam group (beam 0 answers for the group)
    lane: "Lane | None" = None  # where it holds a slot once admitted
    tokens: list[int] = field(default_factory=list)
    cut: int | None = None  # where a stop string begins in its text
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (token, logprob, top) per token
    pieces: list[str] = field(default_factory=list)  # with logprobs: the text each token added
    decoded: str = ""  # with logprobs: the text of its tokens so far
    sent: str = ""  # text streamed so far
    sent_tokens: int = 0  # tokens whose log-probabilities were streamed

    @property
    def name(self) -> str:
        return self.request.names[self.input]


@dataclass(eq=False)
class Lane:
    """Rows that step in one forward pass through one PEFT model's layers: each row through its own adapter (methods
    PEFT mixes per row, and the base), or all through one adapter made active before the pass (the others)."""
    runner: T5Runner | ModuleRunner
    holder: object  # the PeftModel (or the bare base) whose module tree the rows run through
    adapter: str | None  # the PEFT adapter to make active; None: PEFT's adapter_names, one per row
    mixed: bool  # rows pass adapter_names
    prefix: torch.Tensor | None = None  # a soft prompt (prompt tuning) put before every source
    rows: list[Row] = field(default_factory=list)  # row i holds the runner's slot i

    def activate(self) -> None:
        if self.adapter is not None and self.holder.active_adapter != self.adapter:  # PEFT's set_adapter walks
            self.holder.set_adapter(self.adapter)  # every module: only when another adapter of the holder was active


class Engine:
    def __init__(self, bank: AdapterBank, max_rows: int = 64, max_queue_rows: int = 1024,
                 max_encode_tokens: int = 512, max_rows_per_request: int | None = 8, threads: int | None = None,
                 on_step=None, compile: bool = True, compile_cache: str | None = None, on_compiled=None,
                 kv_cache_dtype: str = "auto"):
        """kv_cache_dtype: of the base-and-LoRA lane's attention caches (t5_runner.cache_dtype)."""
        self.bank, self.max_rows, self.max_queue_rows = bank, max_rows, max_queue_rows
        self.kv_cache_dtype = cache_dtype(bank.base, kv_cache_dtype)
        self.max_rows_per_request = max_rows_per_request or max_rows
        self.threads = threads  # torch's threads on the model thread (see model_thread_threads)
        self.max_encode_tokens = max_encode_tokens
        self.on_step = on_step or (lambda rows, seconds: None)  # metrics hook
        # a fast tokenizer is not thread-safe: the event loop encodes with one copy, the model thread decodes with another
        self.encoder_tokenizer, self.tokenizer = copy.deepcopy(bank.tokenizer), copy.deepcopy(bank.tokenizer)
        self.lanes: dict[tuple, Lane] = {}
        # the base-and-LoRA lane's runner and its compiled step live as long as the engine (a lane comes and goes)
        self.static: T5Runner | None = None
        self.static_problem = static_problem(bank.base)  # None: base and LoRA rows run on static buffers
        self.on_compiled = on_compiled
        self.compiled = CompiledStep(compile_cache, self._compiled) if compile and not self.static_problem else None
        self.warmed: concurrent.futures.Future = concurrent.futures.Future()  # the start's compile requests are made
        config = bank.base.config
        self.start_token, self.eos = config.decoder_start_token_id, config.eos_token_id
        self.waiting: dict[Request, deque[Row]] = {}  # per request, its rows not yet admitted (round-robin order)
        self.spans: deque[SpanRequest] = deque()  # extractive requests waiting for their forward pass
        self.controls: deque = deque()  # (fn, args, concurrent future) to run between steps
        self.wake = threading.Condition()
        self.stopping = False
        self.held = False  # holding(): neither admit nor step
        self.busy = False  # the model thread is between two waits (running controls, admitting, stepping)
        self.admitting = True  # False once the server stops: new and waiting requests get Stopping
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slot_problems: dict[tuple, str | None] = {}  # (holder, adapter, its config) -> _slot_problem's answer

    def describe(self) -> dict[str, str]:
        """How this engine computes (the log and /metrics say it): the decoder step, the weights, int8's path,
        peft-t5's own kernels."""
        from ..kernels import kernels_used
        from ..quantize import holds_int8, int8_path

        int8 = holds_int8(self.bank.base)
        step = ("compiled (torch.compile, inductor)" if self.compiled is not None else
                "eager (--compile off)" if self.static_problem is None else f"eager: {self.static_problem}")
        return {"step": step, "weights": "int8" if int8 else str(self.bank.base.dtype).removeprefix("torch."),
                "kv_cache": str(self.kv_cache_dtype).removeprefix("torch."),
                "int8": int8_path() if int8 else "off", "kernels": kernels_used(self.bank.base.device)}

    def _compiled(self, part: str, kind: str, seconds: float | None, error: str | None) -> None:
        """On the compiling thread, as a graph is ready or failed. With none left to compile, the pages of the
        checkpoint the engine has read go back to the OS, on the model thread (between steps, not while an adapter
        loads): the compiled graphs read copies of the weights (quantize.page_out_checkpoint; a page touched again
        is read back)."""
        if self.on_compiled is not None:
            self.on_compiled(part, kind, seconds, error)
        if self.compiled.done():
            self._between_steps(self._page_out)

    def _page_out(self) -> None:
        if advised := page_out_checkpoint(*self.bank.models()):
            logger.info("the checkpoint's pages read so far (%d MB mapped) went back to the OS", advised >> 20)

    # --- the event loop's side -------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="peft-t5-model")
        self.thread.start()
        if self.compiled is not None:  # compile while the server has nothing to do yet (asked on the model
            self._between_steps(self._warm, done=self.warmed)  # thread: graphs are built for its torch threads)

    def wait_compiled(self, timeout: float = 600.0) -> None:
        """Block this thread until the compiled graphs (step and encoder) asked for so far are ready (or failed): those
        asked for as the engine started, and any a new layout of LoRA stacks needed since."""
        if self.compiled is not None:
            self.warmed.result(timeout)
            self.compiled.wait(timeout)

    def stop_admitting(self) -> None:
        """On the event loop, when the server begins to stop: requests not yet decoding fail with Stopping (503);
        rows in flight go on (the server gives them a grace period)."""
        self.admitting = False
        with self.wake:
            waiting, self.waiting = [*self.waiting, *self.spans], {}
            self.spans = deque()
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(Stopping("this request had not started"))

    def stop_decoding(self) -> None:
        """On the event loop, once the grace period is over: requests still decoding fail with Stopping (503) and
        the model thread drops their rows at its next step."""
        for request in {row.request for row in list(self.active)}:
            if not request.future.done():
                request.future.set_exception(Stopping("it stopped before this request finished"))

    async def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        if self.thread:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 30)
        if self.compiled is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.compiled.close)

    @property
    def waiting_rows(self) -> int:
        """Rows not yet admitted, and extractive inputs not yet read (each a row of the queue)."""
        with self.wake:
            return (sum(len(unit) for units in self.waiting.values() for unit in units)
                    + sum(len(set(r.windows.record[r.next:])) for r in self.spans))

    def _check_queue(self, adding: int) -> None:
        """Busy where `adding` more rows would queue over max_queue_rows (with self.wake held: re-entrant)."""
        waiting = self.waiting_rows
        if waiting + adding > self.max_queue_rows:
            raise Busy(f"{waiting} rows are waiting, the most this server queues is {self.max_queue_rows}; "
                       "retry shortly")

    @property
    def active(self) -> list[Row]:
        return [row for lane in list(self.lanes.values()) for row in lane.rows]

    @property
    def active_rows(self) -> int:
        return sum(len(lane.rows) for lane in list(self.lanes.values()))

    async def complete(self, names: list[str], sources: list[str], max_new_tokens: int, *, num_beams: int = 1,
                       n: int = 1, sampling: Sampling = GREEDY, stop: tuple[str, ...] = (), want_logprob: bool = False,
                       min_new_tokens: int = 0, timeout: float | None = None, on_piece=None) -> list[Completion]:
        """The completions of one request: n per input (input-major), or the best beam per input with num_beams;
        DeadlineExceeded after `timeout` seconds, Busy if the queue is full."""
        if not self.admitting:
            raise Stopping("it takes no new requests")
        per_input = max(n, num_beams)
        if per_input > min(self.max_rows_per_request, self.max_rows):
            raise TooLarge(f"{per_input} {'beams' if num_beams > 1 else 'samples'} an input is over this server's "
                           f"{min(self.max_rows_per_request, self.max_rows)} rows a request")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout if timeout else None
        request = Request(names, sources, max_new_tokens, deadline, loop.create_future(), on_piece, min_new_tokens,
                          sampling, n if num_beams == 1 else 1, num_beams, tuple(stop),
                          want_logprob or sampling.logprobs is not None)
        units = deque(self._unit(request, i) for i in range(len(sources)))
        with self.wake:
            self._check_queue(len(sources) * per_input)
            self.waiting[request] = units
            self.wake.notify_all()
        return await answer_of(request, timeout)

    def _unit(self, request: Request, i: int) -> list[Row]:
        """The rows of input i, admitted together (their source is encoded once): its samples, or its beams."""
        source = self.encoder_tokenizer(request.sources[i], truncation=True,
                                        max_length=self.bank.source_limit(request.names[i])).input_ids
        if request.num_beams > 1:
            group = BeamGroup(request.num_beams, request.max_new_tokens, request.min_new_tokens, self.eos,
                              self.start_token)
            return [Row(request, i, i, source, beam=group, beam_index=j) for j in range(request.num_beams)]
        sampling = request.sampling
        return [Row(request, i * request.n + j, i, source,
                    generator=None if sampling.greedy else generator_for(sampling.seed, i * request.n + j))
                for j in range(request.n)]

    async def generate(self, names: list[str], sources: list[str], max_new_tokens: int, num_beams: int = 1,
                       timeout: float | None = None, min_new_tokens: int = 0) -> list[str]:
        """The texts of one request, greedy or beam search (generate()'s outputs)."""
        return [c.text for c in await self.complete(names, sources, max_new_tokens, num_beams=num_beams,
                                                    min_new_tokens=min_new_tokens, timeout=timeout)]

    async def extract(self, name: str, inputs: list, timeout: float | None = None) -> list:
        """An extractive adapter's answers, one extractive.SpanAnswer per input ({question, context}): the best span
        of its context and its margin against no answer (bank.span_threshold says where "" begins)."""
        from ..extractive import windows

        if not self.admitting:
            raise Stopping("it takes no new requests")
        records, options = self.bank.span_records(name, inputs), self.bank.span_options(name)
        wins = windows(records, self.encoder_tokenizer, options["max_length"], options["doc_stride"])
        loop = asyncio.get_running_loop()
        request = SpanRequest(name, records, wins, options["max_answer_length"],
                              time.monotonic() + timeout if timeout else None, loop.create_future())
        with self.wake:
            self._check_queue(len(records))
            self.spans.append(request)
            self.wake.notify_all()
        return await answer_of(request, timeout)

    async def events(self, names: list[str], sources: list[str], max_new_tokens: int, **options):
        """Pieces of the outputs as they are decoded (a beam group's text comes whole, when it ends)."""
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.complete(names, sources, max_new_tokens, on_piece=pieces.put_nowait,
                                                   **options))
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (item := await pieces.get()) is not None:
                yield item
            task.result()
        finally:
            task.cancel()

    @contextmanager
    def holding(self):
        """Neither admit nor step until the block ends (adapters still load and unload); once it is entered, no step
        runs. Requests queue meanwhile, so a test or a benchmark can line them up and know which share a step,
        whatever the machine's speed: with engine.holding(): send them; engine.wait_until(lambda: engine.waiting_rows
        == N)."""
        with self.wake:
            self.held = True
            self.wake.wait_for(lambda: not self.busy or self.thread is None or not self.thread.is_alive())
        try:
            yield self
        finally:
            with self.wake:
                self.held = False
                self.wake.notify_all()

    def _grown(self) -> list:
        """The lanes' runners holding no row in slots grown past their first size."""
        return [lane.runner for lane in self.lanes.values()
                if not lane.runner.n and lane.runner.capacity != lane.runner.first_capacity]

    def wait_until(self, condition, timeout: float = 300.0) -> None:
        """Block this thread (not the event loop) until condition() holds, checked whenever a request arrives, after
        each turn of the model thread and every 50 ms (a client that leaves notifies nobody); TimeoutError after
        `timeout` seconds (a bound on a hang, not a pace)."""
        deadline = time.monotonic() + timeout
        with self.wake:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the engine's state did not come about in {timeout:g} s")
                self.wake.wait(min(left, 0.05))

    def adapters_in_flight(self) -> set[str]:
        """Adapters with a row decoding or waiting (on the model thread, between steps)."""
        with self.wake:
            waiting = {row.name for units in self.waiting.values() for unit in units for row in unit}
        return waiting | {row.name for row in self.active}

    async def on_model_thread(self, fn, *args):
        """Run fn(*args) on the model's thread between two steps (loading, unloading adapters)."""
        return await asyncio.wrap_future(self._between_steps(fn, *args))

    def _between_steps(self, fn, *args, done: concurrent.futures.Future | None = None) -> concurrent.futures.Future:
        """Queue fn(*args) for the model's thread, between two steps (any thread); `done` (new if None) gets its
        result."""
        done = done if done is not None else concurrent.futures.Future()
        with self.wake:
            self.controls.append((fn, args, done))
            self.wake.notify_all()
        return done

    def _resolve(self, request: Request, result=None, error: Exception | None = None) -> None:
        request.failed = request.failed or error is not None

        def settle():
            if not request.future.done():
                request.future.set_exception(error) if error else request.future.set_result(result)
        self.loop.call_soon_threadsafe(settle)

    # --- the model thread ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.wake:
                self.busy = False
                self.wake.notify_all()  # holding() and wait_until() look again
                while not (self.stopping or self.controls or not self.held and (self.waiting or self.active_rows
                                                                                 or self.spans)):
                    if not self.wake.wait(IDLE_RELEASE_S if self._grown() else None):
                        for runner in self._grown():  # no row for that long: what the last burst grew goes back
                            release_when_idle(runner)
                if self.stopping:
                    break
                self.busy = True
                controls, self.controls = list(self.controls), deque()
            self._drop_finished_requests()  # first: a load that must evict sees only rows still wanted
            for fn, args, done in controls:
                try:
                    done.set_result(fn(*args))
                except Exception as e:  # its caller gets it; the engine goes on
                    done.set_exception(e)
            with self.wake:
                admitted = [] if self.held else self._admit()
                spans = [] if self.held else self._take_spans()
            if spans:
                self._answer_spans(spans)
            try:
                if admitted:
                    self._encode(admitted)
                if self.active_rows and not self.held:
                    self._step()
            except Exception as e:  # a failure fails the rows in flight, not the server
                for row in [*self.active, *admitted]:
                    self._resolve(row.request, error=e)
                self.lanes = {}

    def _admit(self) -> list[Row]:
        """Waiting inputs' rows for the free slots, one request at a time in turn, within the per-step encoding
        budget (the rows of one input come in together)."""
        admitted, budget = [], self.max_encode_tokens
        while self.waiting:
            request = min(self.waiting, key=lambda r: r.active)  # the request holding fewest slots goes first
            unit = self.waiting[request][0]
            if (self.active_rows + len(admitted) + len(unit) > self.max_rows
                    or request.active + len(unit) > self.max_rows_per_request
                    or admitted and len(unit[0].source) > budget):
                break
            self.waiting[request].popleft()
            if not self.waiting[request]:
                del self.waiting[request]
            request.active += len(unit)
            admitted += unit
            budget -= len(unit[0].source)
        return admitted

    def _take_spans(self) -> list[tuple[SpanRequest, range]]:
        """The inputs of span requests to answer this turn (each input's windows whole), oldest first, within the
        per-step encoding budget (one input at least)."""
        taken, budget = [], self.max_encode_tokens
        while self.spans:
            request = self.spans[0]
            if request.over:
                self.spans.popleft()
                continue
            windows = request.next_input()
            tokens = sum(len(request.windows.input_ids[i]) for i in windows)
            if taken and tokens > budget:
                break
            taken.append((request, windows))
            budget -= tokens
            request.next = windows.stop
            if request.next == len(request.windows.input_ids):
                self.spans.popleft()
        return taken

    def _answer_spans(self, taken: list[tuple[SpanRequest, range]]) -> None:
        """One forward pass per extractive adapter over the windows taken, then the best span of each request whose
        inputs have all been read."""
        from ..extractive import best_spans, span_logits

        for name in dict.fromkeys(request.name for request, _ in taken):
            mine = [(request, windows) for request, windows in taken if request.name == name]
            requests = list(dict.fromkeys(request for request, _ in mine))
            if name not in self.bank.metadata:
                for request in requests:
                    self._resolve(request, error=AdapterGone(f"adapter {name!r} was unloaded before this request "
                                                             "ran"))
                continue
            try:
                ids = [request.windows.input_ids[i] for request, windows in mine for i in windows]
                starts, ends = span_logits(self.bank.model_for(name), self.tokenizer, SimpleNamespace(input_ids=ids),
                                           batch_size=len(ids))
            except Exception as e:  # a failure fails these requests, not the server
                for request in requests:
                    self._resolve(request, error=e)
                continue
            computed = iter(zip(starts, ends))
            for request, windows in mine:
                for i in windows:
                    request.starts[i], request.ends[i] = next(computed)
            for request in requests:
                if request.next == len(request.windows.input_ids) and request.ends[-1] is not None:
                    self._resolve(request, best_spans(request.records, request.windows, request.starts,
                                                      request.ends, max_answer_length=request.max_answer_length))

    def _encode(self, rows: list[Row]) -> None:
        live = [row for row in rows if not row.request.over]
        for row in rows:
            if row.request.over:
                row.request.active -= 1
        gone = [row for row in live if row.name not in self.bank.names]
        for row in gone:
            self._resolve(row.request, error=AdapterGone(f"adapter {row.name!r} was unloaded before this request ran"))
            row.request.active -= 1
        lanes: dict[int, tuple[Lane, list[Row]]] = {}
        for row in live:
            if row not in gone:
                lane = self._lane(row.name)
                lanes.setdefault(id(lane), (lane, []))[1].append(row)
        for lane, rows in lanes.values():
            lane.activate()
            lane.runner.add([row.source for row in rows],
                            [self.bank.peft_name(row.name) for row in rows] if lane.mixed else None, lane.prefix,
                            budgets=[row.request.max_new_tokens for row in rows])
            for row in rows:
                row.lane = lane
            lane.rows += rows

    def _lane(self, name: str) -> Lane:
        """The lane an adapter's rows step in (made when first needed): for the base and LoRA adapters, the one over
        static buffers (over a 4-bit base: the one of the PeftModel whose adapters PEFT mixes per row); else one per
        adapter, through its PeftModel's modules."""
        method = self.bank.methods.get(name)
        mixes = name == BASE or method.mixed_batches
        if mixes:
            holder = next((self.bank.holders[n] for n, m in self.bank.methods.items() if m.mixed_batches),
                          self.bank.base)
            if self.static_problem is None and (name == BASE or not self._slot_problem(holder, name)):
                return self._static_lane(holder)
        if mixes and self.static_problem is not None:
            key, adapter, mixed = ("mixed",), None, holder is not self.bank.base
        else:
            holder, adapter, mixed = self.bank.holders[name], self.bank.peft_name(name), False
            key = (id(holder), adapter)
        lane = self.lanes.get(key)
        if lane is None or lane.holder is not holder and not lane.rows:
            prefix = soft_prompt(holder, adapter) if method is not None and method.soft_prompt else None
            lane = self.lanes[key] = Lane(ModuleRunner(holder, capacity=8), holder, adapter, mixed, prefix)
        return lane

    def _static_lane(self, holder) -> Lane:
        if self.static is None:
            self.static = T5Runner(holder, capacity=8, compiled=self.compiled, cache_dtype=self.kv_cache_dtype)
        lane = self.lanes.get(("static",))
        if lane is None or lane.holder is not holder and not lane.rows:
            self.static.holder = holder  # LoRA adapters are read from it; the base's layers are every holder's
            lane = self.lanes[("static",)] = Lane(self.static, holder, None, True)
        return lane

    def _slot_problem(self, holder, name: str) -> str | None:
        """Why a LoRA adapter steps in a lane of its own (said once), or None; kept until the adapter is another
        (it walks the model's modules)."""
        inner = self.bank.peft_name(name)
        key = (id(holder), inner, id(holder.peft_config.get(inner)))
        if key not in self.slot_problems:
            self.slot_problems[key] = problem = slot_problem(holder, inner)
            if problem:
                logger.info("adapter %r steps in a lane of its own, eagerly: %s", name, problem)
        return self.slot_problems[key]

    def _warm(self) -> None:
        """Request the compiled step and encoder for the LoRA adapters loaded now (and the base), one row and several."""
        lane = self._static_lane(self._lane(BASE).holder)
        names = [self.bank.peft_name(n) for n, m in self.bank.methods.items()
                 if m.mixed_batches and not self._slot_problem(lane.holder, n)]
        self.static.warm(names)

    def _step(self) -> None:
        """One forward pass per lane with rows, then each row's next token chosen over all of them at once."""
        started = time.perf_counter()
        rows, logits = [], []
        for lane in [lane for lane in self.lanes.values() if lane.rows]:
            lane.activate()
            last = torch.tensor([row.tokens[-1] if row.tokens else self.start_token for row in lane.rows])
            logits.append(lane.runner.step(last, [self.bank.peft_name(row.name) for row in lane.rows] if lane.mixed else None))
            rows += lane.rows
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        leaving = self._choose(rows, [i for i, row in enumerate(rows) if row.beam is None], logits)
        leaving += self._step_beams(rows, logits)
        for row in leaving:
            self._retire(row)
        self.on_step(len(rows), time.perf_counter() - started)

    def _choose(self, active: list[Row], positions: list[int], logits: torch.Tensor) -> list[Row]:
        """The next token of every row not in a beam group; the rows that ended."""
        if not positions:
            return []
        rows = [active[i] for i in positions]
        choices = choose(logits[positions] if len(positions) < len(active) else logits,
                         [row.request.sampling for row in rows],
                         [[self.start_token, *row.tokens] for row in rows] if any(
                             row.request.sampling.penalized for row in rows) else [],
                         [len(row.tokens) for row in rows], [row.generator for row in rows],
                         [len(row.tokens) < row.request.min_new_tokens for row in rows], self.eos,
                         [row.request.want_logprob for row in rows])
        leaving = []
        for row, choice in zip(rows, choices):
            row.tokens.append(choice.token)
            if row.request.want_logprob:
                row.logprobs.append((choice.token, choice.logprob, choice.top))
                self._add_piece(row)
            ended = choice.token == self.eos or len(row.tokens) >= row.request.max_new_tokens
            if row.request.stop and len(row.tokens) >= row.request.min_new_tokens:
                ended = self._find_stop(row) or ended
            if row.request.on_piece is not None:
                self._stream(row, ended)
            if ended:
                leaving.append(row)
        return leaving

    def _step_beams(self, active: list[Row], logits: torch.Tensor) -> list[Row]:
        """Each beam group's step: its beams re-ranked, their caches reordered; the rows of groups that ended."""
        groups: dict[BeamGroup, list[int]] = {}
        for i, row in enumerate(active):
            if row.beam is not None:
                groups.setdefault(row.beam, []).append(i)
        leaving = []
        for group, positions in groups.items():
            positions.sort(key=lambda i: active[i].beam_index)  # rows move between slots as others leave
            beams = [active[i] for i in positions]
            parents, tokens = group.step(logits[positions])
            lane = beams[0].lane
            slots = [lane.rows.index(row) for row in beams]
            lane.runner.reorder(slots, [slots[p] for p in parents])
            histories = [list(beams[p].tokens) for p in parents]
            for row, history, token in zip(beams, histories, tokens):
                row.tokens = history + [token]
            if group.done:
                leaving += beams
        return leaving

    def _find_stop(self, row: Row) -> bool:
        text = self._text(row.tokens)
        found = [at for at in (text.find(s) for s in row.request.stop) if at >= 0]
        if found:
            row.cut = min(found)
        return bool(found)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _stream(self, row: Row, ended: bool) -> None:
        """Send the text decoded since the last piece: never past a stop string, nor a tail that may begin one, nor
        half a character."""
        text = self._text(row.tokens)
        if row.cut is not None:
            text = text[:row.cut]
        elif not ended:
            text = text[:len(text) - held_back(text, row.request.stop)]
            if text.endswith("\ufffd"):
                return
        if text.startswith(row.sent) and len(text) > len(row.sent) and not ended:
            piece, row.sent = text[len(row.sent):], text
            logprobs = self._token_logprobs(row)[row.sent_tokens:] if row.request.want_logprob else []
            row.sent_tokens += len(logprobs)
            self.loop.call_soon_threadsafe(row.request.on_piece, Piece(row.index, piece, logprobs))

    def _free(self, row: Row) -> None:
        """The row leaves its slot; the last row of its lane takes it."""
        lane = row.lane
        i = lane.rows.index(row)
        lane.runner.remove(i)
        lane.rows[i] = lane.rows[-1]
        lane.rows.pop()
        row.request.active -= 1

    def _retire(self, row: Row) -> None:
        """The row has ended: its completion goes into its request, which is answered when its last output ends."""
        self._free(row)
        if row.beam_index:
            return
        request = row.request
        done = self._completion(row)
        request.outputs[row.index] = done
        if request.on_piece is not None:
            logprobs = (done.logprobs or [])[row.sent_tokens:]
            piece = done.text[len(row.sent):] if done.text.startswith(row.sent) else ""
            self.loop.call_soon_threadsafe(request.on_piece, Piece(row.index, piece, logprobs, done))
        request.left -= 1
        if request.left == 0:
            self._resolve(request, list(request.outputs))

    def _completion(self, row: Row) -> Completion:
        tokens = row.beam.best() if row.beam is not None else row.tokens
        text = self._text(tokens)
        if row.cut is not None:
            text = text[:row.cut]
        reason = "stop" if row.cut is not None or (tokens and tokens[-1] == self.eos) else "length"
        logprobs = self._token_logprobs(row, text) if row.request.want_logprob and row.beam is None else None
        mean = (sum(lp for _, lp, _ in row.logprobs) / len(row.logprobs)) if row.logprobs else None
        return Completion(text, len(tokens), reason, logprobs, mean, list(tokens))

    def _add_piece(self, row: Row) -> None:
        """The text the row's last token added to its output (one decode a token, not one a token per step)."""
        now = self._text(row.tokens)
        grew = now.startswith(row.decoded)
        row.pieces.append(now[len(row.decoded):] if grew else "")
        row.decoded = now if grew else row.decoded

    def _token_logprobs(self, row: Row, text: str | None = None) -> list[TokenLogprob]:
        """One entry per decoded token (as usage counts them), with its text: the growth of the output's text it
        brought, so that the entries concatenate to the text (cut at `text`'s end; </s>, a token after a stop
        string or one that adds no character brings ""). Among the alternatives, the chosen token is spelled as
        its entry is."""
        entries, offset = [], 0
        for (token, logprob, top), piece in zip(row.logprobs, row.pieces):
            if token == self.eos:
                piece = ""
            elif text is not None:
                piece = piece[:max(len(text) - offset, 0)]
            offset += len(piece)
            entries.append(TokenLogprob(piece, logprob, [(piece if t == token else self.token_text(t), v)
                                                         for t, v in top]))
        return entries

    def token_text(self, token: int) -> str:
        """A token's text on its own (sentencepiece's word-start mark as a space)."""
        return self.tokenizer.convert_ids_to_tokens(token).replace("\u2581", " ")

    def _drop_finished_requests(self) -> None:
        """Rows of requests that ended (client gone, deadline passed, failed) or whose adapter was unloaded; lanes
        left empty go (a lane is cheap to make again, and one of an unloaded adapter must not stay)."""
        for row in self.active:
            if row.name not in self.bank.names:
                self._resolve(row.request, error=AdapterGone(f"adapter {row.name!r} was unloaded before this "
                                                             "request ended"))
            if row.request.over:
                self._free(row)
        self.lanes = {key: lane for key, lane in self.lanes.items() if lane.rows}
        with self.wake:
            for request in [r for r in self.waiting if r.over]:
                del self.waiting[request]
            self.spans = deque(r for r in self.spans if not r.over)


async def answer_of(request, timeout: float | None):
    """A queued request's answer, or DeadlineExceeded past the timeout; a request left unanswered (the client left,
    the deadline passed) is cancelled, and the model thread drops its rows or windows."""
    try:
        return await (asyncio.wait_for(request.future, timeout) if timeout else request.future)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"the request took over {timeout:g} s") from None
    finally:
        if not request.future.done():
            request.future.cancel()


def soft_prompt(holder, adapter: str) -> torch.Tensor:
    """A prompt-tuning adapter's virtual token embeddings [virtual tokens, d_model], as PEFT puts them before the
    encoder's input."""
    holder.set_adapter(adapter)
    virtual = holder.peft_config[adapter].num_virtual_tokens
    return holder.get_prompt(batch_size=1)[0, :virtual]


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text could begin a stop string (they wait for the next token)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def model_thread_threads() -> int:
    """Call on the main thread before it loads the model: it keeps one torch thread, and the number to give the
    model thread is returned. libgomp throttles its workers' spinning once two threads have OpenMP teams on a
    small machine, which made every small op of the model thread 2-3x slower (measured on 2 cores): so only the
    model thread gets a team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


