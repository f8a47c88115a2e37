"""The decoder step and the encoder compiled with torch.compile, and run eagerly until they are.

    compiled = CompiledStep()
    logits = compiled(step, args)        # t5_runner.Step and its tensors: the compiled graph once ready, else eager
    keys, values = compiled(encode, args)  # t5_runner.Encode (new rows' encoder and cross-attention K/V) likewise

On a CPU, inductor compiles each into two graphs per layout of LoRA stacks: one for a single row and one for any other
number of rows. Row count, lengths, LoRA slots and rank are symbolic sizes, so rows joining, buffers growing, prompts of
every length and adapters loading never recompile; dynamo's guards on the modules are skipped (own_forward). The step's
graph for several rows takes the base's weights as a copy laid out for oneDNN (which several rows need: 1.7x the speed
at 8 rows), as do every graph of a bfloat16 base and an int8 base's products of several rows without AVX512-VNNI (int8's
encoder compiled: 1.6-2.1x its eager speed): a copy laid out once and held by peft-t5's library under a number
(csrc/onednn_held.cpp; t5_runner.T5Weights.hold_for_onednn), which the graphs name, so no graph is frozen. Where that
library cannot load (kernels.onednn_problem), inductor freezes such copies into the graphs instead. An int8 base's other
products are peft-t5's kernels' (kernels.py). A float32 base's one-row step where peft-t5's kernel runs (elsewhere that
step takes oneDNN's copy too) reads the weights as they are: one row streams them from memory whatever their layout
(MKL's packing for one row was no faster and held 300 MB more for t5-small). So does its encoder on Intel's CPUs, where
MKL's products are as fast unpacked (a frozen encoder was no faster at 1-32 SQuAD rows on a Xeon); elsewhere the encoder
takes oneDNN's copy too (on an AMD EPYC MKL's were 12-17% slower at its shapes; the copy holds 88 MB for t5-small,
kernels.intel_cpu). The step's graph for several rows attends over its caches (float32; an int8 base's bfloat16) through
peft-t5's kernel where the CPU has AVX-512 or AVX2 (t5_runner.attends_by_kernel; kernels.attention_problem). On a GPU
the graphs compile without freezing.

Compiles run on a thread of their own, one at a time. Until a graph is ready its calls run eagerly (the reference
the compiled graphs are tested against), so no request waits for a compile. Inductor keeps the kernels it builds in
TORCHINDUCTOR_CACHE_DIR (a folder per instruction set: cache_folder), and the graphs in its graph cache: a restart
traces each graph and finds it whole there (frozen graphs excepted: its graph cache cannot store oneDNN's opaque
tensors, so they are lowered again). Its C++ wrapper is not used: no faster here (within 3%), and a restart would
build it again (its source names the weights by their memory addresses).
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import types

import torch

from ..quantize import return_freed_memory

logger = logging.getLogger(__name__)
PARTS = {"step": "decoder step", "encoder": "encoder"}  # what part_of() says a compiled module is -> its name
EXAMPLE_ROWS = 16  # the row count the many-rows graph is traced at: inductor's size hint (oneDNN packs for it)
# While a graph compiles, the compiling thread (dynamo and inductor: Python) holds the GIL for Python's switch
# interval (5 ms) whenever the model thread wants it back after an op: an eager step of ~1,000 ops waited that long
# at each (a 32-token answer 13 s instead of 0.3 s). A short interval hands it back within 50 us; and the compiling
# thread runs at nice 10, so that it takes the cores the model thread leaves (a compile under load goes on, slower).
COMPILE_SWITCH_INTERVAL = 5e-5
COMPILE_NICE = 10


class CompiledStep:
    def __init__(self, cache_dir: str | None = None, on_event=None):
        """cache_dir: where inductor keeps what it builds, in a folder per instruction set (cache_folder; default:
        its own, or TORCHINDUCTOR_CACHE_DIR);
        on_event(part, kind, seconds, error): called on the compiling thread when a graph is ready or failed (part:
        "step" or "encoder"; kind: "one" row or "many")."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_folder(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        self.on_event = on_event or (lambda part, kind, seconds, error: None)
        self.ready: dict[tuple, object] = {}  # (step, kind) -> the compiled step
        self.failed: dict[tuple, str] = {}
        self.seconds: dict[tuple[str, str], float] = {}  # (part, kind) -> seconds its last compile took
        self.steps = {"compiled": 0, "eager": 0}  # decoder steps run each way
        self.encodes = {"compiled": 0, "eager": 0}  # encoder passes run each way
        self.queued: set[tuple] = set()
        self.work: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.held = threading.Event()  # set: compiles wait (tests drive the eager step while a graph is missing)
        self.closed = False
        self.thread: threading.Thread | None = None
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # two graphs a
        torch._dynamo.config.accumulated_recompile_limit = max(  # layout and runner share one code object
            torch._dynamo.config.accumulated_recompile_limit, 4096)

    @staticmethod
    def kind(rows: int) -> str:
        return "one" if rows == 1 else "many"

    def __call__(self, step, args: tuple):
        key = (step, self.kind(args[0].shape[0]))
        counts = self.encodes if part_of(step) == "encoder" else self.steps
        compiled = self.ready.get(key)
        if compiled is not None:
            counts["compiled"] += 1
            return compiled(*args)
        self.request(step, args)
        counts["eager"] += 1
        return step(*args)

    def request(self, step, args: tuple) -> None:
        """Compile the graph these arguments need, on the compiling thread (once)."""
        key = (step, self.kind(args[0].shape[0]))
        with self.lock:
            if key in self.queued or key in self.failed or self.closed:
                return
            self.queued.add(key)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name="peft-t5-compile")
                self.thread.start()
        # compiled for the requesting thread's torch threads: inductor builds its kernels for that many, and a
        # graph is only used where the count is the same (dynamo guards on it)
        self.work.put((key, examples(args, key[1], part_of(step)), torch.get_num_threads()))

    def done(self) -> bool:
        """Whether every requested graph is compiled (or failed)."""
        with self.lock:
            return not self.queued - set(self.ready) - set(self.failed)

    def wait(self, timeout: float = 600.0) -> None:
        """Block until every requested graph is compiled (or failed): benchmarks and tests."""
        deadline = time.monotonic() + timeout
        while True:
            if self.done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the step did not compile in {timeout:g} s")
            time.sleep(0.05)

    def close(self, timeout: float = 300.0) -> None:
        """Compile nothing more; wait for a compile in flight (a process that exits in the middle of one aborts)."""
        with self.lock:
            self.closed = True
            thread = self.thread
        if thread is not None:
            self.work.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        try:  # Linux: a thread's own nice value (the kernels' builds, started from here, inherit it)
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, max(COMPILE_NICE, os.getpriority(os.PRIO_PROCESS, me)))
        except (AttributeError, OSError):
            pass
        while True:
            item = self.work.get()
            if item is None or self.closed:
                return
            key, args, threads = item
            del item
            while self.held.is_set():
                time.sleep(0.01)
            started, interval = time.perf_counter(), sys.getswitchinterval()
            sys.setswitchinterval(min(interval, COMPILE_SWITCH_INTERVAL))
            try:
                compiled = self._compile(key[0], args, threads)
            except Exception as e:  # the step stays eager: slower, never wrong
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                logger.warning("%s did not compile (%s); it stays eager", graph_name(key), error)
                with self.lock:
                    self.failed[key] = error
                self.on_event(part_of(key[0]), key[1], None, error)
                continue
            finally:
                sys.setswitchinterval(interval)
                del args  # the examples, not kept while the thread waits (t5-small's LoRA stacks alone: 31 MB)
                return_freed_memory()  # what the compile freed, back to the OS (~30 MB a start for t5-small)
            seconds = time.perf_counter() - started
            with self.lock:
                self.ready[key] = compiled
                self.seconds[(part_of(key[0]), key[1])] = seconds
            logger.info("compiled %s in %.1f s", graph_name(key), seconds)
            self.on_event(part_of(key[0]), key[1], seconds, None)

    @staticmethod
    def _compile(step, args: tuple, threads: int):
        from torch._inductor import config as inductor_config

        torch.set_num_threads(threads)
        compiled = torch.compile(own_forward(step), dynamic=False, options=guard_options())
        # set for the whole process while it compiles (nothing else compiles meanwhile): inductor registers its int8
        # patterns only where freezing is on in its config, not through torch.compile's options
        with inductor_config.patch(options(step, args)), torch.inference_mode():
            compiled(*args)
        return compiled


def guard_options() -> dict | None:
    """torch.compile's options: dynamo's guards on the modules skipped (own_forward), unless PEFT_T5_MODULE_GUARDS=on
    keeps them (to compare)."""
    if os.environ.get("PEFT_T5_MODULE_GUARDS", "off") == "on":
        return None
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def own_forward(step):
    """step.forward as a function of its own code object, bound to step. Dynamo keeps a code object's graphs together
    and picks one by its guards; ~900 of a step graph's ~1,000 guards check its modules (their hooks, attributes and tensors:
    0.38 ms of a 14 ms step of 32 int8 rows, more than the rest together), whose state is fixed once the engine
    starts, so they are skipped. Each compiled module then needs graphs of its own: two Steps of one class (another
    layout of LoRA stacks, another runner's weights) would otherwise pass each other's remaining guards."""
    function = type(step).forward
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    return types.MethodType(own, step)


def cache_folder(base: str | None) -> str:
    """The folder inductor keeps what it builds in: base (default: inductor's own) / the instruction set it writes
    its CPU kernels for. Its graph cache does not key on that set: a graph cached under AVX-512 (another machine's,
    through a shared home or image, or ATEN_CPU_CAPABILITY since changed) was found under AVX2 and its kernels built
    again for 8 floats a vector where they step by 16: wrong answers, NaN, or a crash (test_compiled.py)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = "isa-" + ("-".join(str(pick_vec_isa()).split()) or "none")  # "avx512 avx512_vnni" -> isa-avx512-...
    base = os.path.abspath(base or default_cache_dir())
    return base if os.path.basename(base) == folder else os.path.join(base, folder)


def part_of(step) -> str:
    """What a compiled module computes: "encoder" (t5_runner.Encode: new rows' encoder and cross-attention keys and
    values) or "step" (t5_runner.Step: the decoder step)."""
    return "encoder" if getattr(step, "encodes", False) else "step"


def graph_name(key: tuple) -> str:
    """(module, kind) as the log says it: "the decoder step for one row"."""
    return f"the {PARTS[part_of(key[0])]} for {'one row' if key[1] == 'one' else '2+ rows'}"


def options(step, args: tuple) -> dict:
    """Inductor's settings for the graph of this module at these arguments (see the module's docstring)."""
    if args[0].device.type != "cpu":
        return {}
    from ..quantize import Int8Linear

    int8 = [m for m in step.weights.modules() if isinstance(m, Int8Linear)]
    if step.weights.held or (int8 and all(m.packed_weight is not None for m in int8)):  # every product peft-t5's
        return {"freezing": False}  # kernels' or oneDNN's over weights held by number: nothing for inductor to
    # prepack (and the graph stays in its cache)
    float32 = step.weights.dtype == torch.float32 and not int8
    many_row_step = args[0].shape[0] > 1 and part_of(step) == "step"
    return {"freezing": not float32 or many_row_step}


def examples(args: tuple, kind: str, part: str = "step") -> tuple:
    """Arguments of the same kinds and layouts as `args` but their own memory (the compile runs them once while
    the model thread uses the real ones), with the sizes that vary marked dynamic. Each such size gets a value of
    its own (dynamo gives equal sizes one symbol, and the graph would then require them equal)."""
    return (encode_examples if part == "encoder" else step_examples)(args, kind)


def dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    import torch._dynamo

    for dim in dims:
        torch._dynamo.mark_dynamic(t, dim)
    return t


def stack_example(t: torch.Tensor) -> torch.Tensor:
    """A LoRA stack [projections, slots, rank, in or out] with slots and rank of their own sizes, dynamic."""
    return dynamic(torch.zeros((t.shape[0], 13, 17, t.shape[3]), dtype=t.dtype, device=t.device), 1, 2)


def encode_examples(args: tuple, kind: str) -> tuple:
    """examples() for t5_runner.Encode: token ids and mask [rows, length], slots [rows], the LoRA stacks."""
    ids, mask, slots, stacks = args
    rows, length = 1 if kind == "one" else EXAMPLE_ROWS, 19
    ids = torch.zeros((rows, length), dtype=ids.dtype, device=ids.device)
    mask = torch.ones((rows, length), dtype=mask.dtype, device=ids.device)
    slots = torch.zeros((rows,), dtype=slots.dtype, device=ids.device)
    row_dims = (0,) if rows > 1 else ()
    return (dynamic(ids, *row_dims, 1), dynamic(mask, *row_dims, 1), dynamic(slots, *row_dims),
            [stack_example(t) for t in stacks])


def step_examples(args: tuple, kind: str) -> tuple:
    """examples() for t5_runner.Step. A cache is a slice of a longer buffer, as the runner's are (else the graph would
    be specialised for whole buffers)."""
    rows = 1 if kind == "one" else EXAMPLE_ROWS
    tokens, lengths, source_lengths, slots, self_k, self_v, cross_k, cross_v, stacks = args
    device = tokens.device

    def by_row(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((rows,), fill, dtype=t.dtype, device=device)
        return dynamic(out, 0) if rows > 1 else out

    def cache(t: torch.Tensor, used: int, allocated: int) -> torch.Tensor:
        out = torch.zeros((rows, t.shape[1], allocated, t.shape[3]), dtype=t.dtype, device=device)[:, :, :used]
        return dynamic(out, 0, 2) if rows > 1 else dynamic(out, 2)

    return (by_row(tokens, 0), by_row(lengths, 0), by_row(source_lengths, 1), by_row(slots, 0),
            [cache(t, 3, 7) for t in self_k], [cache(t, 3, 7) for t in self_v],
            [cache(t, 5, 11) for t in cross_k], [cache(t, 5, 11) for t in cross_v], [stack_example(t) for t in stacks])
