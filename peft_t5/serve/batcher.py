"""Concurrent requests -> one mixed-adapter generate call.

Requests that arrive within `max_wait_ms` of the first one waiting, up to `max_batch_size` examples, are served
together: each example goes through its own adapter (PEFT's adapter_names), sources sorted by length. The model
runs on one worker thread, so generation never blocks the event loop and never runs twice at once; loading and
unloading adapters go through the same thread.

Modes (for comparison in benchmarks/serve_throughput.py): "across" batches across requests and adapters,
"none" runs each request alone, "switch" also sets the active adapter per adapter in the request.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..bank import AdapterBank
from .decoding import GREEDY, Sampling
from .engine import Completion, Piece
from .failures import AdapterGone, DeadlineExceeded, NotServed, Stopping

MODES = ("across", "none", "switch")


@dataclass
class Job:
    names: list[str]  # adapter per example
    sources: list[str]  # prompts, already templated
    options: tuple[int, int, int]  # (max_new_tokens, num_beams, min_new_tokens): equal options share a generate call
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, bank: AdapterBank, max_batch_size: int = 32, max_wait_ms: float = 5.0, mode: str = "across",
                 on_batch=None, threads: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        self.bank, self.max_batch_size, self.max_wait, self.mode = bank, max_batch_size, max_wait_ms / 1000, mode
        self.on_batch = on_batch or (lambda examples, seconds: None)  # metrics hook
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="peft-t5-model", initializer=(
            lambda: torch.set_num_threads(threads) if threads else None))  # see engine.model_thread_threads
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None
        self.admitting = True

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def stop_admitting(self) -> None:
        """The server begins to stop: queued and new requests fail with Stopping (503)."""
        self.admitting = False
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Stopping("this request had not started"))

    def stop_decoding(self) -> None:
        """A static batch cannot be cut short: uvicorn cancels its requests when the grace period is over."""

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def generate(self, names: list[str], sources: list[str], max_new_tokens: int, num_beams: int = 1,
                       timeout: float | None = None, min_new_tokens: int = 0) -> list[str]:
        """Raw outputs for one request, served together with whatever else is waiting."""
        if not self.admitting:
            raise Stopping("it takes no new requests")
        job = Job(names, sources, (max_new_tokens, num_beams, min_new_tokens), asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request took over {timeout:g} s") from None

    async def stream(self, names: list[str], sources: list[str], max_new_tokens: int, num_beams: int = 1,
                     timeout: float | None = None, min_new_tokens: int = 0):
        """(index, text): a static batch ends all at once, so each output comes whole."""
        for i, text in enumerate(await self.generate(names, sources, max_new_tokens, num_beams, timeout,
                                                     min_new_tokens)):
            yield i, text

    async def complete(self, names: list[str], sources: list[str], max_new_tokens: int, *, num_beams: int = 1,
                       n: int = 1, sampling: Sampling = GREEDY, stop: tuple[str, ...] = (), want_logprob: bool = False,
                       min_new_tokens: int = 0, timeout: float | None = None, on_piece=None) -> list[Completion]:
        """generate()'s outputs as the engine's completions (greedy or beam search only; token counts re-tokenized
        from the text, which generate() does not return)."""
        if n > 1 or sampling != GREEDY or stop or want_logprob:
            raise NotServed("this server runs the static batcher (it holds an adapter that is not LoRA), which "
                            "decodes greedily or by beam search only; sampling, n, stop and logprobs need the "
                            "continuous engine (serve LoRA adapters only)")
        texts = await self.generate(names, sources, max_new_tokens, num_beams, timeout, min_new_tokens)
        counts = [len(ids) for ids in self.bank.tokenizer(texts, add_special_tokens=True).input_ids] if texts else []
        return [Completion(text, count, "length" if count > max_new_tokens else "stop")
                for text, count in zip(texts, counts)]

    async def events(self, names: list[str], sources: list[str], max_new_tokens: int, **options):
        """A static batch ends all at once: each completion comes whole."""
        for i, done in enumerate(await self.complete(names, sources, max_new_tokens, **options)):
            yield Piece(i, done.text, [], done)

    def add_adapter(self, name: str, path: str, trust_pickle: bool = False) -> dict:
        return self.bank.add(name, path, trust_pickle)

    async def on_model_thread(self, fn, *args):
        """Run fn(*args) on the model's thread, between batches (loading and unloading adapters)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        while True:
            jobs = await self._gather()
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if not job.future.done():  # its client went away: nothing to compute
                    groups.setdefault(job.options, []).append(job)
            for options, group in groups.items():
                try:
                    results = await self.on_model_thread(self._generate, group, options)
                except Exception as e:  # a failure in one batch fails its requests, not the server
                    results = [e] * len(group)
                for job, result in zip(group, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    async def _gather(self) -> list[Job]:
        """The first waiting job, and those that arrive within max_wait of it, up to max_batch_size examples."""
        jobs = [await self.queue.get()]
        if self.mode != "across":
            return jobs
        size, deadline = len(jobs[0].names), time.perf_counter() + self.max_wait
        while size < self.max_batch_size:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if size + len(job.names) > self.max_batch_size:
                self.queue.put_nowait(job)  # next round; asyncio.Queue has no put-front, so it goes last
                break
            jobs.append(job)
            size += len(job.names)
        return jobs

    def _generate(self, jobs: list[Job], options: tuple[int, int, int]) -> list[list[str] | Exception]:
        """On the model thread: one generate call for all jobs (or one per adapter in "switch" mode)."""
        started = time.perf_counter()
        live = [j for j in jobs if all(n in self.bank.names for n in j.names)]
        live_ids = {id(j) for j in live}
        names = [n for j in live for n in j.names]
        sources = [s for j in live for s in j.sources]
        max_new_tokens, num_beams, min_new_tokens = options
        kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=max(1, len(sources)),
                      **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}))
        if self.mode == "switch":
            outputs = self.bank.generate_per_adapter(names, sources, **kwargs)
        else:
            outputs = self.bank.generate_sources(names, sources, **kwargs) if sources else []
        self.on_batch(len(sources), time.perf_counter() - started)
        results, start = [], 0
        for job in jobs:
            if id(job) not in live_ids:
                gone = sorted(set(job.names) - set(self.bank.names))
                results.append(AdapterGone(f"adapter {', '.join(map(repr, gone))} was unloaded before this request ran"))
                continue
            results.append(outputs[start:start + len(job.names)])
            start += len(job.names)
        return results
