"""int8 times a few rows, fast: peft-t5's own kernel (csrc/int8_matmul.cpp) for the int8 product of one row of
activations (the one-row decoder step, eager or compiled) and, eagerly, of up to 8 rows (the eager step, and lanes
that stay eager), where oneDNN's per-call cost (~25-40 us, whatever the size) is most of a product. Rows are
quantized and scaled as quantize.int8_linear does, and the products summed exactly in int32, so its results are
oneDNN's, bit for bit. It needs AVX512-VNNI; it is built with the C++ compiler torch.compile already needs, once per
machine (~10-20 s; kept in torch's extensions folder, TORCH_EXTENSIONS_DIR) when quantize.int8_path() first runs
(serve --quantize int8, quantize_int8). Where it cannot be built or run, oneDNN takes every product.

    torch.ops.peft_t5.int8_matmul(x, weight, scale)   # x [M, K] float32, weight [N, K] int8, scale [N] -> [M, N]

PEFT_T5_INT8_KERNEL=off leaves every product to oneDNN (to compare them).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "int8_matmul.cpp"
ready = False  # set once kernel_problem() has loaded the kernel (a plain flag: compiled graphs read it as a constant)
MOST_ROWS = 8  # eagerly, the kernel takes products of up to this many rows (one row: always)
MOST_WEIGHT = 2048 * 512  # ... through weights of up to N * K this large: T5's output layer (32128 x 512) is oneDNN's
# from 2 rows (8 rows: the kernel 1.2 ms, oneDNN 0.8; 512 x 512: 22 us and 70)


@functools.lru_cache(maxsize=1)
def kernel_problem() -> str | None:
    """Why the kernel is not used here (None: it is), building and loading it on the first call."""
    if os.environ.get("PEFT_T5_INT8_KERNEL", "on") == "off":
        return "PEFT_T5_INT8_KERNEL=off"
    if not torch.cpu._is_vnni_supported():
        return "the CPU has no AVX512-VNNI"
    try:
        from torch.utils.cpp_extension import load

        load(name="peft_t5_int8_matmul", sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # no compiler, no headers: oneDNN takes every product
        problem = f"it did not build ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
        logger.warning("int8 stays on oneDNN at every row count: %s", problem)
        return problem
    torch.library.register_fake("peft_t5::int8_matmul")(
        lambda x, weight, scale: x.new_empty((x.shape[0], weight.shape[0])))
    global ready
    ready = True
    return None
