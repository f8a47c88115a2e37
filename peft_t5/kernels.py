"""peft-t5's own CPU kernels, for the products where the libraries' are slow at the serving step's shapes:

    torch.ops.peft_t5.int8_matmul(x, weight, scale)  # csrc/int8_matmul.cpp: x [M, K] float32, weight [N, K] int8,
                                                     # scale [N] -> [M, N]; AVX512-VNNI, else AVX2
    torch.ops.peft_t5.int8_rows(x, weight, scale, number, zero_point)  # the same where it is faster, else oneDNN's
                                                     # product over the weight held under number (compiled graphs'
                                                     # products of several rows: it decides as it runs)
    torch.ops.peft_t5.f32_matvec(x, weight)          # csrc/f32_matvec.cpp: x [1, K], weight [N, K] float32 -> [1, N];
                                                     # AVX-512, else AVX2
    torch.ops.peft_t5.f32_rows(x, weight, number, out_features)  # x [M, K]: the same loops over 2-4 rows, else
                                                     # oneDNN's product over the copy held under number
    torch.ops.peft_t5.f32_tiles(x, packed, out_features)  # csrc/f32_tiles.cpp: x [M, K] float32, the weight packed
                                                     # by pack_f32() -> [M, N]; AVX-512 (the compiled float32
                                                     # step's products: f32_tiles_problem)
    torch.ops.peft_t5.int8_packed_matmul(x, packed, scale, amx)  # csrc/int8_packed.cpp: x [M, K] float32, the
                                                         # weight packed by pack_int8(), scale [N] -> [M, N]; several
                                                         # rows through AMX's tiles (amx) or AVX512-VNNI's
    number = torch.ops.peft_t5.onednn_int8_pack(weight)  # csrc/onednn_held.cpp: oneDNN's prepacked copy of an int8
    torch.ops.peft_t5.onednn_int8_matmul(q, number, scale, zero_point)  # weight, held under a number; oneDNN's
                                                         # qlinear on it (q: uint8 levels + 128); any x86 CPU
    number = torch.ops.peft_t5.onednn_float_pack(weight, rows)  # ... of a float32 or bfloat16 weight, laid out for
    torch.ops.peft_t5.onednn_float_linear(x, number, out_features)  # about `rows` rows; oneDNN's linear on it
    torch.ops.peft_t5.onednn_release(number)             # the copy let go
    torch.ops.peft_t5.decode_attention(q, keys, values, bias, valid)  # csrc/decode_attention.cpp: one query a row
    torch.ops.peft_t5.decode_self_attention(q, k, v, lengths, keys, values, bias)  # over float32 or bfloat16
                                                         # caches [rows, heads, positions, 64 or 128] (q, k, v, bias
                                                         # float32; sums float32), each row's first valid[r]
                                                         # (the second: lengths[r] + 1, each row's new k and v
                                                         # written at its length first); AVX-512, else AVX2
                                                         # (compiled steps only)

int8: where the CPU has AVX512-VNNI, every product of the serving engine's int8 layers (quantize.Int8Linear.
pack_for_kernel, which then holds the weight in the packed layout only, and oneDNN holds no copy): oneDNN's per-call
cost (~25-40 us, whatever the size) was most of the step's products at 1-32 rows (with AMX, t5-small's 37 at 8 rows:
1.4 ms, oneDNN's 3.5 eagerly and ~2-2.6 compiled), and without AMX its products of 8-32 rows reached ~200-360 GOPS on
an AMD EPYC's core where AVX512-VNNI's tiles of 8 rows x 48 outputs reach ~400-440 (benchmarks/kernel_products.py).
Several rows take AMX's tiles where the CPU has AMX, else AVX512-VNNI's; one row AVX512-VNNI's (as fast as the
row-major loop: t5-small's compiled one-row step 2.4-2.6 ms against 2.3-2.5). The row-major AVX512-VNNI kernel
(int8_matmul) takes one row of activations of layers not packed and, eagerly, up to 8 rows.
Rows are quantized and scaled as quantize.int8_linear does, and the products summed exactly in int32, so both give
oneDNN's results bit for bit. float32: the one-row step's products (t5_runner.Linear), which stream their weights from
memory: MKL's reached ~15 GB/s where this one, prefetching, reached 17-23 on a Xeon (its sums in another order:
within 2e-5 of MKL's on unit-scale weights); on an AMD EPYC, prefetching into L2 (csrc/prefetch.h), 20-22 to MKL's
10.6. The step of 2-4 rows streams the weights too: f32_rows reads them once for all its rows, ~18 GB/s where
oneDNN's product over its held copy read t5-small's decoder at ~10 (2 rows: 4.8 ms against 9.6). With AVX-512 but not
on Intel's CPUs, the compiled step of any rows takes f32_tiles over a packed copy of its layers instead of those and
oneDNN's (f32_tiles_problem; the same size as oneDNN's, which then holds none of them), tiles of 8 rows x 48 outputs
whose fetching of the next weights is spread over the tiles: the step's products 1.11-1.23x f32_matvec's at one row,
1.19x, 1.23x and 1.14x f32_rows' and oneDNN's at 4, 8 and 32 rows, 0.96-1.04x at 2 (benchmarks/step_products.py,
one core of an AMD EPYC; as close to float64's sums as MKL's). Without AVX-512 (or
where torch is held below it, ATEN_CPU_CAPABILITY), both take AVX2 (csrc/isa.h): int8's rows widened to int16 pairs
(vpmaddwd; oneDNN's AVX2 sums, in int16, saturate), taking 1-8 rows of any weight, compiled too (`widened`: oneDNN's
AVX2 int8 is slower there; int8_rows decides by the count as the call runs); so does the attention below. Any CPU
with AVX2 and FMA runs them. They are built with the C++ compiler torch.compile already needs, once per machine
(~30 s on 2 cores; kept in torch's extensions folder, TORCH_EXTENSIONS_DIR), when kernel_problem() first runs (serve,
quantize_int8); where they cannot be built or run, oneDNN and MKL take every product.

Attention: the compiled float32 step's, over caches cut from buffers sized for the longest row, which inductor's fused
loops read at 5-8 GB/s (each row's and head's block a fresh stream for the hardware's prefetcher); the kernel
prefetches the next block's keys and values while it sums the current one's: ~13 GB/s, 2x at 32 rows (t5-small, ~40
positions, a 2-core AMD EPYC), within 1e-5 of SDPA. With AVX2, 8 positions' dot products are summed together, not 16.

PEFT_T5_KERNELS=off leaves every product to oneDNN and MKL (and the attention to inductor), PEFT_T5_ATTENTION=off the
attention alone, PEFT_T5_PACKED=off the int8 layers row-major (the row-major kernel and oneDNN take their products),
PEFT_T5_AMX=off the packed kernel's several rows to AVX512-VNNI's tiles, PEFT_T5_HELD=off the compiled graphs' oneDNN
products to inductor's frozen weights, PEFT_T5_F32_TILES=off the compiled float32 step's products back to f32_matvec,
f32_rows and oneDNN's held copies (=on: f32_tiles on Intel's CPUs too) (to compare them).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
LIBRARY = "peft_t5_kernels"
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("int8_matmul.cpp", "f32_matvec.cpp", "f32_tiles.cpp", "int8_packed.cpp", "onednn_held.cpp",
                        "decode_attention.cpp")]
ready = False  # set once kernel_problem() has loaded the kernels (a plain flag: compiled graphs read it as a constant)
widened = False  # ... and found int8 summed in int16 pairs (AVX2, no AVX512-VNNI): oneDNN's int8 is slower there
onednn_ready = False  # ... once onednn_problem() has: oneDNN's products (int8 and float) take weights held by number
packed_ready = False  # ... once packed_problem() has found the kernel over packed int8 weights usable
amx_ready = False  # ... and amx_problem() its AMX tiles (several rows; else AVX512-VNNI's)
attention_ready = False  # ... once attention_problem() has: compiled steps attend through decode_attention
MOST_ROWS = 8  # the int8 kernel takes products of up to this many rows (one row: always)
MOST_WEIGHT = 2048 * 512  # ... through weights of up to N * K this large: T5's output layer (32128 x 512) is oneDNN's
# from 2 rows (8 rows: the kernel 1.2 ms, oneDNN 0.8; 512 x 512: 22 us and 70); compiled graphs too (int8_rows,
# csrc/int8_matmul.cpp, whose kMostRows and kMostWeight repeat these). Where `widened`, up to
# MOST_ROWS rows of every weight, compiled too: oneDNN's AVX2 int8 took 2-8x the kernel's time at 1-8 rows (8 rows of
# 512 x 512: 61 us and 122; of the output layer 4.1 ms and 5.1), as much at 16 (benchmarks/kernel_products.py)


CPU_FEATURES = {"AVX2": "_is_avx2_supported", "AVX-512": "_is_avx512_supported", "AVX512-VNNI": "_is_vnni_supported",
                "AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}


def cpu_lacks(feature: str) -> str | None:
    """Why `feature` (a key of CPU_FEATURES) is not used here (None: it is): the CPU has none, or torch's own kernels
    are held below it (ATEN_CPU_CAPABILITY=avx2 below AVX-512's features, default below AVX2's: then inductor's code
    and peft-t5's kernels are too, as on a CPU without them; with ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS, how
    an AVX2-only CPU is tested)."""
    if not getattr(torch.cpu, CPU_FEATURES[feature], lambda: False)():
        return f"the CPU has no {feature}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in (("AVX2", "AVX512") if feature == "AVX2" else ("AVX512",)):
        return f"torch's kernels are held to {capability} (ATEN_CPU_CAPABILITY)"
    return None


@functools.lru_cache(maxsize=1)
def intel_cpu() -> bool:
    """Whether the CPU is Intel's: MKL's float32 products take their fastest path there only (on an AMD EPYC oneDNN's
    were 12-17% faster at T5's encoder shapes; T5Weights.hold_for_onednn)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def instructions(feature: str) -> str:
    """What peft-t5's float32 ("AVX-512") or int8 ("AVX512-VNNI") kernels run here: `feature` where it is used, else
    AVX2 (csrc/isa.h decides the same way)."""
    return feature if cpu_lacks(feature) is None else "AVX2"


def switched_off_or_unbuilt(switch: str | None = None, feature: str | None = None) -> str | None:
    """Why a group of these kernels is not used here (None: it is): PEFT_T5_KERNELS or its own switch off, the CPU
    feature it needs unused (cpu_lacks), or the library not building (built on the first call)."""
    for name in ("PEFT_T5_KERNELS", switch):
        if name is not None and os.environ.get(name, "on") == "off":
            return f"{name}=off"
    if feature is not None and (lacking := cpu_lacks(feature)) is not None:
        return lacking
    return build_problem()


@functools.lru_cache(maxsize=1)
def kernel_problem() -> str | None:
    """Why the kernels are not used here (None: they are), building and loading them on the first call."""
    global ready, widened
    problem = switched_off_or_unbuilt(feature="AVX2")
    ready = problem is None
    widened = ready and instructions("AVX512-VNNI") == "AVX2"
    return problem


@functools.lru_cache(maxsize=1)
def onednn_problem() -> str | None:
    """Why oneDNN's products do not take weights held by number here (None: they do; csrc/onednn_held.cpp, any x86
    CPU), building and loading the library on the first call. Else int8's eager products take a prepacked weight the
    layer holds, and compiled graphs inductor's frozen ones (a copy in each graph; lowered again at each start)."""
    global onednn_ready
    problem = switched_off_or_unbuilt("PEFT_T5_HELD")
    onednn_ready = problem is None
    return problem


@functools.lru_cache(maxsize=1)
def attention_problem() -> str | None:
    """Why the compiled step's float32 attention is not peft-t5's kernel here (None: it is; csrc/decode_attention.cpp,
    AVX-512 or AVX2), building and loading the library on the first call. Else inductor's fused loops attend."""
    global attention_ready
    problem = switched_off_or_unbuilt("PEFT_T5_ATTENTION", "AVX2")
    attention_ready = problem is None
    return problem


@functools.lru_cache(maxsize=1)
def f32_tiles_problem() -> str | None:
    """Why the compiled float32 step's products (of any rows) are not f32_tiles' over packed copies here (None: they are;
    csrc/f32_tiles.cpp, AVX-512), its products checked against F.linear's first. On Intel's CPUs, where they were
    not measured, oneDNN's held copies take them unless PEFT_T5_F32_TILES=on."""
    switch = os.environ.get("PEFT_T5_F32_TILES", "auto")
    problem = switched_off_or_unbuilt("PEFT_T5_F32_TILES", "AVX-512")
    if problem is None and intel_cpu() and switch != "on":
        problem = "an Intel CPU: oneDNN's held copies (the tiles were measured on AMD's; PEFT_T5_F32_TILES=on)"
    if problem is None and not f32_tiles_check():
        problem = "its check against F.linear failed"
    return problem


def f32_tiles_check() -> bool:
    """Whether f32_tiles' products are F.linear's, to float32's rounding: 1, 11 and 70 rows (a tile, a remainder, past
    a chunk of 64), 40 outputs (a tail) and 96 inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(70, 96, generator=generator)
    weight = torch.randn(40, 96, generator=generator)
    packed = pack_f32(weight)
    return all(torch.allclose(torch.ops.peft_t5.f32_tiles(rows, packed, 40), rows @ weight.T, rtol=1e-5, atol=1e-4)
               for rows in (x, x[:11], x[:1]))


@functools.lru_cache(maxsize=1)
def build_problem() -> str | None:
    """Why peft-t5's library of kernels did not load (None: it did), building it on the first call."""
    try:
        load_library()
    except Exception as e:  # no compiler, no headers: oneDNN and MKL take every product
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        problem = f"they did not build ({type(e).__name__}: {said})"
        logger.warning("peft-t5's CPU kernels are not used: %s", problem)
        return problem
    torch.library.register_fake("peft_t5::int8_matmul")(
        lambda x, weight, scale: x.new_empty((x.shape[0], weight.shape[0])))
    torch.library.register_fake("peft_t5::int8_rows")(
        lambda x, weight, scale, number, zero_point: x.new_empty((x.shape[0], weight.shape[0])))
    torch.library.register_fake("peft_t5::int8_packed_matmul")(
        lambda x, packed, scale, amx: x.new_empty((x.shape[0], scale.shape[0])))
    torch.library.register_fake("peft_t5::f32_matvec")(lambda x, weight: x.new_empty((x.shape[0], weight.shape[0])))
    torch.library.register_fake("peft_t5::f32_tiles")(
        lambda x, packed, out_features: x.new_empty((x.shape[0], out_features)))
    torch.library.register_fake("peft_t5::f32_rows")(
        lambda x, weight, number, out_features: x.new_empty((x.shape[0], out_features)))
    torch.library.register_fake("peft_t5::onednn_int8_matmul")(
        lambda q, number, scale, zero_point: q.new_empty((q.shape[0], scale.shape[0]), dtype=torch.float32))
    torch.library.register_fake("peft_t5::onednn_float_linear")(
        lambda x, number, out_features: x.new_empty((x.shape[0], out_features)))
    torch.library.register_fake("peft_t5::decode_attention")(
        lambda q, keys, values, bias, valid: q.new_empty((keys.shape[0], keys.shape[1] * keys.shape[3])))
    torch.library.register_fake("peft_t5::decode_self_attention")(
        lambda q, new_k, new_v, lengths, keys, values, bias: q.new_empty((keys.shape[0], keys.shape[1] * keys.shape[3])))
    return None


def build_folder() -> str:
    """Where torch builds the library: its extensions folder (TORCH_EXTENSIONS_DIR), made if missing."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(LIBRARY, verbose=False)


def load_library() -> None:
    """Build the library if its sources changed (in build_folder()), and load it."""
    from torch.utils.cpp_extension import load

    folder = build_folder()
    with building(folder):
        load(name=LIBRARY, sources=[str(s) for s in SOURCES], extra_cflags=["-O3"], build_directory=folder,
             is_python_module=False)


@contextlib.contextmanager
def building(folder: str):
    """Held while torch builds or loads the library in `folder`: an flock, which the OS lets go when its process dies.
    torch's own lock is a file (`lock`) that a process killed mid-build leaves behind, and every later load would wait
    on it forever (a server that never starts); whoever holds the flock knows no peft-t5 process is building, so a
    `lock` there is such a leftover, and goes."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's lock alone
        yield
        return
    with open(os.path.join(folder, "peft-t5.flock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # let go when the file closes, or the process ends
        stale = os.path.join(folder, "lock")
        if os.path.exists(stale):
            logger.warning("removed %s, left by a build of peft-t5's kernels that was killed midway", stale)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        yield


def packed_check(amx: bool) -> bool:
    """Whether the packed kernel's products equal the VNNI kernel's over the row-major weight: 1, 3 and 11 rows (a
    tile and a remainder), outputs and inputs with a tail."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(11, 96, generator=generator)
    weight = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=generator)
    scale = torch.rand(40, generator=generator)
    packed = pack_int8(weight)
    return all(torch.equal(torch.ops.peft_t5.int8_packed_matmul(rows, packed, scale, amx),
                           torch.ops.peft_t5.int8_matmul(rows, weight, scale)) for rows in (x, x[:3], x[:1]))


@functools.lru_cache(maxsize=1)
def packed_problem() -> str | None:
    """Why the int8 layers are not packed for peft-t5's kernel here (None: they are; csrc/int8_packed.cpp, AVX512-VNNI
    and, for several rows where the CPU has it, AMX), its products checked against the row-major kernel's first."""
    global packed_ready
    problem = switched_off_or_unbuilt("PEFT_T5_PACKED", "AVX512-VNNI")
    if problem is None and not packed_check(amx=False):
        problem = "its check against the row-major kernel failed"
    if problem is None:
        packed_ready = True
    return problem


@functools.lru_cache(maxsize=1)
def amx_problem() -> str | None:
    """Why the packed kernel's products of several rows do not take AMX's tiles here (None: they do; else
    AVX512-VNNI's), checked against the row-major kernel first."""
    if packed_problem() is not None:
        return packed_problem()
    if os.environ.get("PEFT_T5_AMX", "on") == "off":
        return "PEFT_T5_AMX=off"
    if (lacking := cpu_lacks("AMX")) is not None:
        return lacking
    try:
        same = packed_check(amx=True)
    except RuntimeError as e:  # the kernel refused AMX's tile registers (the OS would not lend them)
        return str(e).splitlines()[0][:200]
    if not same:
        return "its check against the VNNI kernel failed"
    global amx_ready
    amx_ready = True
    return None


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """An int8 weight [N, K] in the packed kernel's layout (AMX's B tiles, AVX512-VNNI's operands row by row): [N / 16,
    K / 64, 16, 64], where byte c of row r of block (nb, kb) is weight[16 * nb + c // 4, 64 * kb + 4 * r + c % 4] (N
    padded to 32 and K to 64 with zeros)."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -k % 64, 0, -n % 32))
    blocks = padded.view(padded.shape[0] // 16, 16, padded.shape[1] // 64, 16, 4)
    return blocks.permute(0, 2, 3, 1, 4).contiguous().view(padded.shape[0] // 16, padded.shape[1] // 64, 16, 64)


def pack_f32(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [N, K] in f32_tiles' layout: [N / 16, K, 16], element (nb, k, c) = weight[16 * nb + c, k] (N
    padded to 16 with zeros)."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach().float(), (0, 0, 0, -n % 16))
    return padded.view(-1, 16, k).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """pack_int8's weight [n, k] back from its layout (a new tensor)."""
    blocks = packed.view(packed.shape[0], packed.shape[1], 16, 16, 4).permute(0, 3, 1, 2, 4)
    return blocks.reshape(packed.shape[0] * 16, packed.shape[1] * 64)[:n, :k].contiguous()


def kernels_used(device: torch.device) -> str:
    """What the log and /metrics say of these kernels on this device."""
    if device.type != "cpu":
        return "off (not on a CPU)"
    held = (f"oneDNN's weights held by number, no graph frozen; a float32 encoder's products "
            f"{'MKL' if intel_cpu() else 'oneDNN'}'s" if onednn_problem() is None
            else f"compiled graphs frozen ({onednn_problem()})")
    attention = (f"compiled float32 attention peft-t5's ({instructions('AVX-512')})" if attention_problem() is None
                 else f"compiled attention inductor's ({attention_problem()})")
    problem = kernel_problem()
    if problem is not None:
        return f"off ({problem}); {held}; {attention}"
    if amx_problem() is None:
        int8 = "int8 of any rows over packed weights (AMX; one row AVX512-VNNI)"
    elif packed_problem() is None:
        int8 = "int8 of any rows over packed weights (AVX512-VNNI)"
    elif widened:
        int8 = f"int8 of 1-{MOST_ROWS} rows (AVX2)"
    else:
        int8 = f"int8 of one row, 2-{MOST_ROWS} rows of layers up to 2048 x 512 (AVX512-VNNI)"
    f32 = ("float32 products of the compiled step over packed copies (AVX-512), of the eager step's row"
           if f32_tiles_problem() is None else f"float32 products of 1-4 rows ({instructions('AVX-512')})")
    return f"peft-t5's ({f32}; {int8}); {held}; {attention}"
