"""Continuous batching: admit -> encode -> step every active row (each through its own adapter) -> retire.

    engine = Engine(bank, max_rows=64)
    engine.start()                                    # in the server's event loop: starts the model thread
    outputs = await engine.generate(["jokes", "base"], sources, max_new_tokens=32, num_beams=1, timeout=30)
    async for index, text in engine.stream(...):      # pieces of output `index` as they are decoded

Each decoding step runs every active row once. A new request's rows are encoded and join at the next step (a
bounded number of source tokens is encoded per step, so a long request cannot stall the others while it is read);
a row that ends (</s> or its token budget) leaves at once and its slot is reused. Rows are admitted round-robin
across requests, so a small request gets a slot beside a large one. Greedy outputs equal `generate()`'s; beam
search keeps `generate()` (one input between two steps).

One thread owns the model: it runs the steps and, between them, whatever else must touch the model (loading and
unloading adapters, beam-search inputs).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..bank import BASE, AdapterBank
from ..errors import PeftT5Error
from .failures import AdapterGone, Busy, DeadlineExceeded, Stopping
from .t5_runner import BASE_ADAPTER, T5Runner


@dataclass(eq=False)
class Request:
    names: list[str]
    sources: list[str]
    max_new_tokens: int
    deadline: float | None  # time.monotonic() by which it must end
    future: asyncio.Future
    on_text: object = None  # callable(index, piece) on the event loop, for streaming
    min_new_tokens: int = 0  # </s> is not chosen before (as generate()'s min_new_tokens)
    outputs: list = field(default_factory=list)
    left: int = 0
    active: int = 0  # its rows holding a slot now
    failed: bool = False  # set on the model thread when it fails the request

    def __post_init__(self):
        self.outputs, self.left = [None] * len(self.sources), len(self.sources)

    @property
    def over(self) -> bool:
        return self.failed or self.future.done() or (self.deadline is not None and time.monotonic() > self.deadline)


@dataclass(eq=False)
class Row:
    request: Request
    index: int
    source: list[int]  # token ids, truncated as its adapter was trained
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text streamed so far

    @property
    def name(self) -> str:
        return self.request.names[self.index]


class Engine:
    def __init__(self, bank: AdapterBank, max_rows: int = 64, max_queue_rows: int = 1024,
                 max_encode_tokens: int = 512, max_rows_per_request: int | None = 8, threads: int | None = None,
                 on_step=None):
        self.bank, self.max_rows, self.max_queue_rows = bank, max_rows, max_queue_rows
        self.max_rows_per_request = max_rows_per_request or max_rows
        self.threads = threads  # torch's threads on the model thread (see model_thread_threads)
        self.max_encode_tokens = max_encode_tokens
        self.on_step = on_step or (lambda rows, seconds: None)  # metrics hook
        # a fast tokenizer is not thread-safe: the event loop encodes with one copy, the model thread decodes with another
        self.encoder_tokenizer, self.tokenizer = copy.deepcopy(bank.tokenizer), copy.deepcopy(bank.tokenizer)
        self.runner = T5Runner(bank.model, capacity=8)
        config = bank.model.get_base_model().config
        self.start_token, self.eos = config.decoder_start_token_id, config.eos_token_id
        self.waiting: dict[Request, deque[Row]] = {}  # per request, its rows not yet admitted (round-robin order)
        self.active: list[Row] = []  # row i holds the runner's slot i
        self.controls: deque = deque()  # (fn, args, concurrent future) to run between steps
        self.wake = threading.Condition()
        self.stopping = False
        self.admitting = True  # False once the server stops: new and waiting requests get Stopping
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- the event loop's side -------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="peft-t5-model")
        self.thread.start()

    def stop_admitting(self) -> None:
        """On the event loop, when the server begins to stop: requests not yet decoding fail with Stopping (503);
        rows in flight go on (the server gives them a grace period)."""
        self.admitting = False
        with self.wake:
            waiting, self.waiting = list(self.waiting), {}
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
            self.wake.notify()
        if self.thread:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 30)

    @property
    def waiting_rows(self) -> int:
        with self.wake:
            return sum(len(rows) for rows in self.waiting.values())

    @property
    def active_rows(self) -> int:
        return len(self.active)

    async def generate(self, names: list[str], sources: list[str], max_new_tokens: int, num_beams: int = 1,
                       timeout: float | None = None, on_text=None, min_new_tokens: int = 0) -> list[str]:
        """Raw outputs for one request; DeadlineExceeded after `timeout` seconds, Busy if the queue is full."""
        if not self.admitting:
            raise Stopping("it takes no new requests")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout if timeout else None
        if num_beams > 1:
            return await self._beam_search(names, sources, max_new_tokens, num_beams, deadline, min_new_tokens)
        request = Request(names, sources, max_new_tokens, deadline, loop.create_future(), on_text, min_new_tokens)
        rows = deque(Row(request, i, self.encoder_tokenizer(source, truncation=True,
                                                             max_length=self.bank.source_limit(name)).input_ids)
                     for i, (name, source) in enumerate(zip(names, sources)))
        with self.wake:  # a Condition's lock is re-entrant: waiting_rows takes it again
            waiting = self.waiting_rows
            if waiting + len(sources) > self.max_queue_rows:
                raise Busy(f"{waiting} rows are waiting, the most this server queues is {self.max_queue_rows}; "
                           "retry shortly")
            self.waiting[request] = rows
            self.wake.notify()
        try:
            return await (asyncio.wait_for(request.future, timeout) if timeout else request.future)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request took over {timeout:g} s") from None
        finally:
            if not request.future.done():
                request.future.cancel()  # the client left or the deadline passed: the model thread drops its rows

    async def stream(self, names: list[str], sources: list[str], max_new_tokens: int, num_beams: int = 1,
                     timeout: float | None = None, min_new_tokens: int = 0):
        """(index, piece) as output `index` grows; the pieces of an output concatenate to generate()'s text."""
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.generate(names, sources, max_new_tokens, num_beams, timeout,
                                                   lambda i, piece: pieces.put_nowait((i, piece)), min_new_tokens))
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (item := await pieces.get()) is not None:
                yield item
            outputs = task.result()
            if num_beams > 1:  # generate()'s path does not stream: each output comes whole
                for i, text in enumerate(outputs):
                    yield i, text
        finally:
            task.cancel()

    async def on_model_thread(self, fn, *args):
        """Run fn(*args) on the model's thread between two steps (loading, unloading adapters)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.controls.append((fn, args, done))
            self.wake.notify()
        return await asyncio.wrap_future(done)

    def add_adapter(self, name: str, path: str, trust_pickle: bool = False) -> dict:
        """On the model thread: load an adapter, if PEFT can run it per row beside the others."""
        from ..adapters import adapter_method, read_metadata

        read_metadata(path, trust_pickle)  # a missing or unreadable folder is said first, as bank.add says it
        method = adapter_method(path)
        if not method.mixed_batches:
            raise PeftT5Error(f"{name}: a {method.name} adapter; the continuous engine runs adapters PEFT mixes per "
                              "row (LoRA); serve it with --engine static")
        return self.bank.add(name, path, trust_pickle)

    async def _beam_search(self, names, sources, max_new_tokens, num_beams, deadline, min_new_tokens) -> list[str]:
        outputs = []
        for name, source in zip(names, sources):  # one input at a time: the other rows step in between
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the request ran past its deadline")
            if name not in self.bank.names:
                raise AdapterGone(f"adapter {name!r} was unloaded before this request ran")
            outputs += await self.on_model_thread(functools.partial(
                self.bank.generate_sources, [name], [source], max_new_tokens=max_new_tokens, num_beams=num_beams,
                **({"min_new_tokens": min_new_tokens} if min_new_tokens else {})))
        return outputs

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
                while not (self.stopping or self.controls or self.waiting or self.active):
                    self.wake.wait()
                if self.stopping:
                    break
                controls, self.controls = list(self.controls), deque()
                admitted = self._admit()
            for fn, args, done in controls:
                try:
                    done.set_result(fn(*args))
                except Exception as e:  # its caller gets it; the engine goes on
                    done.set_exception(e)
            self._drop_finished_requests()
            try:
                if admitted:
                    self._encode(admitted)
                if self.active:
                    self._step()
            except Exception as e:  # a failure fails the rows in flight, not the server
                for row in [*self.active, *admitted]:
                    self._resolve(row.request, error=e)
                while self.runner.n:
                    self.runner.remove(self.runner.n - 1)
                self.active = []

    def _admit(self) -> list[Row]:
        """Waiting rows for the free slots, one request at a time in turn, within the per-step encoding budget."""
        admitted, budget = [], self.max_encode_tokens
        while self.waiting and len(self.active) + len(admitted) < self.max_rows:
            request = min(self.waiting, key=lambda r: r.active)  # the request holding fewest slots goes first
            if request.active >= self.max_rows_per_request or admitted and len(self.waiting[request][0].source) > budget:
                break
            row = self.waiting[request].popleft()
            if not self.waiting[request]:
                del self.waiting[request]
            request.active += 1
            admitted.append(row)
            budget -= len(row.source)
        return admitted

    def _encode(self, rows: list[Row]) -> None:
        live = [row for row in rows if not row.request.over]
        for row in rows:
            if row.request.over:
                row.request.active -= 1
        gone = [row for row in live if row.name not in self.bank.names]
        for row in gone:
            self._resolve(row.request, error=AdapterGone(f"adapter {row.name!r} was unloaded before this request ran"))
            row.request.active -= 1
        live = [row for row in live if row not in gone]
        if not live:
            return
        self.runner.add([row.source for row in live], [peft_name(row.name) for row in live])
        self.active += live

    def _step(self) -> None:
        started = time.perf_counter()
        last = torch.tensor([row.tokens[-1] if row.tokens else self.start_token for row in self.active])
        logits = self.runner.step(last, [peft_name(row.name) for row in self.active])
        early = [i for i, row in enumerate(self.active) if len(row.tokens) < row.request.min_new_tokens]
        if early:
            logits[early, self.eos] = -float("inf")
        chosen = logits.argmax(-1).tolist()
        leaving = []
        for i, (row, token) in enumerate(zip(self.active, chosen)):
            row.tokens.append(token)
            ended = token == self.eos or len(row.tokens) >= row.request.max_new_tokens
            if row.request.on_text is not None:
                self._stream(row, ended)
            if ended:
                leaving.append(i)
        for i in reversed(leaving):
            self._retire(i)
        self.on_step(len(self.active) + len(leaving), time.perf_counter() - started)

    def _stream(self, row: Row, ended: bool) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        if (ended or not text.endswith("\ufffd")) and text.startswith(row.sent) and len(text) > len(row.sent):
            piece, row.sent = text[len(row.sent):], text
            self.loop.call_soon_threadsafe(row.request.on_text, row.index, piece)

    def _free(self, i: int) -> Row:
        """Row i leaves its slot; the last active row takes it."""
        row = self.active[i]
        self.runner.remove(i)
        self.active[i] = self.active[-1]
        self.active.pop()
        row.request.active -= 1
        return row

    def _retire(self, i: int) -> None:
        """Row i has ended: its text goes into its request, which is answered when its last row ends."""
        row = self._free(i)
        request = row.request
        request.outputs[row.index] = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        request.left -= 1
        if request.left == 0:
            self._resolve(request, list(request.outputs))

    def _drop_finished_requests(self) -> None:
        """Rows of requests that ended (client gone, deadline passed, failed) or whose adapter was unloaded."""
        for i in reversed(range(len(self.active))):
            row = self.active[i]
            if row.name not in self.bank.names:
                self._resolve(row.request, error=AdapterGone(f"adapter {row.name!r} was unloaded before this "
                                                             "request ended"))
            if row.request.over:
                self._free(i)
        with self.wake:
            for request in [r for r in self.waiting if r.over]:
                del self.waiting[request]


def model_thread_threads() -> int:
    """Call on the main thread before it loads the model: it keeps one torch thread, and the number to give the
    model thread is returned. libgomp throttles its workers' spinning once two threads have OpenMP teams on a
    small machine, which made every small op of the model thread 2-3x slower (measured on 2 cores): so only the
    model thread gets a team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def peft_name(name: str) -> str:
    return BASE_ADAPTER if name == BASE else name
