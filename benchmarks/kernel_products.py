"""peft-t5's product kernels (peft_t5/csrc) against the libraries' in one process, call by call: the int8 products
(int8_matmul over the row-major weight, and int8_packed_matmul over the packed one: every product of the serving
engine's int8 layers where the CPU has AVX512-VNNI) against oneDNN's over the same weight held by number
(onednn_int8_matmul, the rows already quantized, as a compiled graph gives them; the kernels quantize theirs), and the
float32 one-row product (f32_matvec) against MKL's (F.linear). t5-small's shapes, 1 thread, medians of --rounds timings
of --calls calls each; microseconds a call, and each kernel's speed as a ratio to the library's. Run it under the AVX2
switches (benchmarks/README.md) to see the AVX2 paths.

python benchmarks/kernel_products.py [--rows 1 2 4 8 16 32] [--rounds 5] [--output F]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

SHAPES = [(512, 512), (1536, 512), (2048, 512), (512, 2048), (32128, 512)]  # t5-small's: o, fused q/k/v, wi, wo, head


def microseconds(call, calls: int, rounds: int) -> float:
    """Median over rounds of the mean time of `calls` calls (after 5 unmeasured)."""
    for _ in range(5):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/kernel_products.json")
    args = parser.parse_args()

    from peft_t5 import kernels
    from peft_t5.quantize import Int8Linear

    torch.set_num_threads(1)
    if kernels.kernel_problem() is not None or kernels.onednn_problem() is not None:
        sys.exit(f"peft-t5's kernels are not used here: {kernels.kernel_problem() or kernels.onednn_problem()}")
    torch.manual_seed(0)
    cells = []
    for n, k in SHAPES:
        weight = torch.randn(n, k)
        layer = Int8Linear(weight)
        packed = kernels.pack_int8(layer.weight) if kernels.packed_problem() is None else None
        calls = 20 if n > 10000 else 200
        for rows in args.rows:
            x = torch.randn(rows, k)
            amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
            q = (x * (127 / amax)).round().add(128).to(torch.uint8)
            cell = {"out": n, "in": k, "rows": rows,
                    "int8_kernel_us": microseconds(
                        lambda: torch.ops.peft_t5.int8_matmul(x, layer.weight, layer.weight_scale), calls, args.rounds),
                    "int8_onednn_us": microseconds(
                        lambda: torch.ops.peft_t5.onednn_int8_matmul(q, layer.onednn_number(), layer.weight_scale,
                                                                     layer.weight_zero_point), calls, args.rounds)}
            cell["int8_kernel_speed_ratio"] = cell["int8_onednn_us"] / cell["int8_kernel_us"]
            if packed is not None:
                cell["int8_packed_us"] = microseconds(lambda: torch.ops.peft_t5.int8_packed_matmul(
                    x, packed, layer.weight_scale, kernels.amx_ready), calls, args.rounds)
                cell["int8_packed_speed_ratio"] = cell["int8_onednn_us"] / cell["int8_packed_us"]
            if rows == 1:
                cell["f32_kernel_us"] = microseconds(lambda: torch.ops.peft_t5.f32_matvec(x, weight), calls,
                                                     args.rounds)
                cell["f32_mkl_us"] = microseconds(lambda: torch.nn.functional.linear(x, weight), calls, args.rounds)
                cell["f32_kernel_speed_ratio"] = cell["f32_mkl_us"] / cell["f32_kernel_us"]
            cells.append(cell)
            f32 = f", float32 {cell['f32_kernel_us']:.0f} / {cell['f32_mkl_us']:.0f}" if rows == 1 else ""
            packed_us = f", packed {cell['int8_packed_us']:.0f} us" if packed is not None else ""
            print(f"{n:>6} x {k:<5} {rows:>3} rows: int8 {cell['int8_kernel_us']:.0f} us{packed_us} / oneDNN "
                  f"{cell['int8_onednn_us']:.0f} us{f32}", flush=True)
    write_results({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "threads": 1, "rounds": args.rounds,
                   "kernels": kernels.kernels_used(torch.device("cpu")), "cells": cells}, args.output)


if __name__ == "__main__":
    main()
