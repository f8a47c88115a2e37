"""int8 times one row, fast: peft-t5's own kernel (csrc/int8_matvec.cpp) for the int8 product of a single row of
activations, where oneDNN's per-call cost (~25-30 us, whatever the size) is most of a one-row decoder step. Rows are
quantized and scaled as quantize.int8_linear does, and the products summed exactly in int32, so its results are
oneDNN's. It needs AVX512-VNNI; it is built with the C++ compiler torch.compile already needs, once per machine
(~10-20 s; kept in torch's extensions folder, TORCH_EXTENSIONS_DIR) when quantize.int8_path() first runs (serve
--quantize int8, quantize_int8). Where it cannot be built or run, one row takes oneDNN's product as several do.

    torch.ops.peft_t5.int8_matvec(x, weight, scale)   # x [1, K] float32, weight [N, K] int8, scale [N] -> [1, N]

PEFT_T5_INT8_MATVEC=off leaves one row to oneDNN too (to compare them).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "int8_matvec.cpp"
ready = False  # set once matvec_problem() has loaded the kernel (a plain flag: compiled graphs read it as a constant)


@functools.lru_cache(maxsize=1)
def matvec_problem() -> str | None:
    """Why the kernel is not used here (None: it is), building and loading it on the first call."""
    if os.environ.get("PEFT_T5_INT8_MATVEC", "on") == "off":
        return "PEFT_T5_INT8_MATVEC=off"
    if not torch.cpu._is_vnni_supported():
        return "the CPU has no AVX512-VNNI"
    try:
        from torch.utils.cpp_extension import load

        load(name="peft_t5_int8_matvec", sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # no compiler, no headers: oneDNN serves one row too
        problem = f"it did not build ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
        logger.warning("int8 at one row stays on oneDNN: %s", problem)
        return problem
    torch.library.register_fake("peft_t5::int8_matvec")(
        lambda x, weight, scale: x.new_empty((x.shape[0], weight.shape[0])))
    global ready
    ready = True
    return None
