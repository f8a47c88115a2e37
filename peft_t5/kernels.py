"""peft-t5's own CPU kernels, for the products where the libraries' are slow at the serving step's shapes:

    torch.ops.peft_t5.int8_matmul(x, weight, scale)  # csrc/int8_matmul.cpp: x [M, K] float32, weight [N, K] int8,
                                                     # scale [N] -> [M, N]; AVX512-VNNI
    torch.ops.peft_t5.f32_matvec(x, weight)          # csrc/f32_matvec.cpp: x [1, K], weight [N, K] float32 -> [1, N];
                                                     # AVX-512

int8: one row of activations (the one-row decoder step, eager or compiled) and, eagerly, up to 8 rows (the eager
step, and lanes that stay eager), where oneDNN's per-call cost (~25-40 us, whatever the size) is most of a product.
Rows are quantized and scaled as quantize.int8_linear does, and the products summed exactly in int32, so its results
are oneDNN's, bit for bit. float32: the one-row step's products (t5_runner.Linear), which stream their weights from
memory: MKL's reached ~15 GB/s where this one, prefetching, reached 17-23 (its sums in another order: within 2e-5
of MKL's on unit-scale weights). Both are built with the C++ compiler torch.compile already needs, once per machine
(~10-20 s; kept in torch's extensions folder, TORCH_EXTENSIONS_DIR), when kernel_problem() first runs (serve,
quantize_int8); where they cannot be built or run, oneDNN and MKL take every product.

PEFT_T5_KERNELS=off leaves every product to oneDNN and MKL (to compare them).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("int8_matmul.cpp", "f32_matvec.cpp")]
ready = False  # set once kernel_problem() has loaded the kernels (a plain flag: compiled graphs read it as a constant)
MOST_ROWS = 8  # eagerly, the int8 kernel takes products of up to this many rows (one row: always)
MOST_WEIGHT = 2048 * 512  # ... through weights of up to N * K this large: T5's output layer (32128 x 512) is oneDNN's
# from 2 rows (8 rows: the kernel 1.2 ms, oneDNN 0.8; 512 x 512: 22 us and 70)


@functools.lru_cache(maxsize=1)
def kernel_problem() -> str | None:
    """Why the kernels are not used here (None: they are), building and loading them on the first call."""
    if os.environ.get("PEFT_T5_KERNELS", "on") == "off":
        return "PEFT_T5_KERNELS=off"
    if not torch.cpu._is_vnni_supported():
        return "the CPU has no AVX512-VNNI"
    try:
        from torch.utils.cpp_extension import load

        load(name="peft_t5_kernels", sources=[str(s) for s in SOURCES], extra_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # no compiler, no headers: oneDNN and MKL take every product
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        problem = f"they did not build ({type(e).__name__}: {said})"
        logger.warning("peft-t5's CPU kernels are not used: %s", problem)
        return problem
    torch.library.register_fake("peft_t5::int8_matmul")(
        lambda x, weight, scale: x.new_empty((x.shape[0], weight.shape[0])))
    torch.library.register_fake("peft_t5::f32_matvec")(lambda x, weight: x.new_empty((x.shape[0], weight.shape[0])))
    global ready
    ready = True
    return None


def kernels_used(device: torch.device) -> str:
    """What the log and /metrics say of these kernels on this device."""
    if device.type != "cpu":
        return "off (not on a CPU)"
    problem = kernel_problem()
    return ("peft-t5's (float32 and int8 products of one row; int8 of 2-8 rows eagerly)" if problem is None
            else f"off ({problem})")
