"""The decoder step's products in the step's order, with the weights streaming from memory as they do in the serving
engine's step: t5-small's decoder shapes (6 layers of fused q/k/v, o, cross-attention q and o, wi and wo, then the
output layer; random weights, 166 MB in float32, past the L3 of the CPUs measured; --config flan-t5-large: 24 gated
layers, 1.5 GB), the step's attention between them (peft-t5's kernel over caches of ~40 positions), 1 thread. Each system in turn per round, medians of --rounds; ms of
the products a step. benchmarks/kernel_products.py times each product alone, called again and again, its weight in
the cache: the fetching of the next weights that decides the speed in the step does not show there.

  held_f32:   f32_matvec at one row; f32_rows: its loops over the weight at 2-4 rows, oneDNN's product over its held
              copy past 4 (the compiled float32 step with PEFT_T5_F32_TILES=off, and on Intel's CPUs)
  tiles_f32:  peft-t5's f32_tiles over kernels.pack_f32's copies (the compiled float32 step on AVX-512 CPUs not
              Intel's)
  int8:       peft-t5's int8_packed_matmul over kernels.pack_int8's copies (AVX512-VNNI)

python benchmarks/step_products.py [--config t5-small|flan-t5-large] [--rows 1 2 4 8 32 64] [--rounds 5] [--output F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


class Shapes:
    """A T5 decoder's shapes, from benchmarks/configs/NAME.json."""

    def __init__(self, name: str):
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        self.layers = config.get("num_decoder_layers", config["num_layers"])
        self.heads, self.head_dim = config["num_heads"], config["d_kv"]
        self.d_model, self.d_ff, self.vocab = config["d_model"], config["d_ff"], config["vocab_size"]
        self.gated = config["feed_forward_proj"].startswith("gated")
        inner = self.heads * self.head_dim
        self.products = [("qkv", 3 * inner, self.d_model), ("o", self.d_model, inner), ("cq", inner, self.d_model),
                         ("co", self.d_model, inner), ("wi", (2 if self.gated else 1) * self.d_ff, self.d_model),
                         ("wo", self.d_model, self.d_ff)]  # a gated layer's wi_0 and wi_1 side by side


def weights(system: str, shapes: Shapes, generator: torch.Generator) -> tuple[list[dict], object]:
    """Each layer's products and the output layer, as the system holds them."""
    from peft_t5 import kernels

    def held(n: int, k: int):
        w = torch.randn(n, k, generator=generator) * 0.05
        if system == "tiles_f32":
            return kernels.pack_f32(w), n
        if system == "held_f32":
            return w, torch.ops.peft_t5.onednn_float_pack(w, 16), n
        return kernels.pack_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)), torch.rand(n)

    return ([{name: held(n, k) for name, n, k in shapes.products} for _ in range(shapes.layers)],
            held(shapes.vocab, shapes.d_model))


def product(system: str, x: torch.Tensor, layer) -> torch.Tensor:
    if system == "tiles_f32":
        return torch.ops.peft_t5.f32_tiles(x, layer[0], layer[1])
    if system == "held_f32":
        return torch.ops.peft_t5.f32_matvec(x, layer[0]) if x.shape[0] == 1 else torch.ops.peft_t5.f32_rows(x, *layer)
    return torch.ops.peft_t5.int8_packed_matmul(x, layer[0], layer[1], False)


def step_ms(system: str, shapes: Shapes, layers: list[dict], head, caches: list[tuple], rows: int, steps: int) -> float:
    """Milliseconds of products a step, over `steps` steps (the attention between them not counted)."""
    x = torch.randn(rows, shapes.d_model)
    inner = shapes.heads * shapes.head_dim
    lengths = torch.full((rows,), 30)
    bias = torch.zeros(rows, shapes.heads, 1, caches[0][0].shape[2])
    spent = 0.0

    def timed(layer, x):
        nonlocal spent
        start = time.perf_counter()
        y = product(system, x, layer)
        spent += time.perf_counter() - start
        return y

    for _ in range(steps):
        for layer, (k_cache, v_cache) in zip(layers, caches):
            q, k, v = timed(layer["qkv"], x).split(inner, -1)
            out = torch.ops.peft_t5.decode_self_attention(q.contiguous(), k.contiguous(), v.contiguous(), lengths,
                                                          k_cache, v_cache, bias)
            x = x + 0.01 * timed(layer["o"], out)
            x = x + 0.01 * timed(layer["co"], timed(layer["cq"], x))
            h = timed(layer["wi"], x)
            h = torch.relu(h[:, :shapes.d_ff]) * h[:, shapes.d_ff:] if shapes.gated else torch.relu(h)
            x = x + 0.01 * timed(layer["wo"], h.contiguous())
            x = x / x.norm(dim=-1, keepdim=True) * 20
        timed(head, x)
    return spent / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["t5-small", "flan-t5-large"], default="t5-small")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/step_products.json")
    args = parser.parse_args()
    from peft_t5 import kernels

    torch.set_num_threads(1)
    systems = ["held_f32"]
    if kernels.kernel_problem() is None and kernels.cpu_lacks("AVX-512") is None:
        systems.append("tiles_f32")
    if kernels.packed_problem() is None:
        systems.append("int8")
    generator = torch.Generator().manual_seed(0)
    shapes = Shapes(args.config)
    held = {system: weights(system, shapes, generator) for system in systems}
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": args.config, "rounds": args.rounds,
               "steps": args.steps,
               "units": "ms of products a step (medians)", "systems": systems, "ms": {}, "ratios": {}}
    for rows in args.rows:
        caches = [(torch.randn(rows, shapes.heads, 41, shapes.head_dim), torch.randn(rows, shapes.heads, 41,
                                                                                     shapes.head_dim))
                  for _ in range(shapes.layers)]
        found: dict[str, list[float]] = {system: [] for system in systems}
        for system in systems:  # a warm-up step each
            step_ms(system, shapes, *held[system], caches, rows, 1)
        for _ in range(args.rounds):
            for system in systems:
                found[system].append(step_ms(system, shapes, *held[system], caches, rows, args.steps))
        for system in systems:
            results["ms"].setdefault(system, {})[str(rows)] = statistics.median(found[system])
        if "tiles_f32" in found:
            results["ratios"][f"tiles_f32_vs_held_f32_at_{rows}"] = (results["ms"]["held_f32"][str(rows)]
                                                                     / results["ms"]["tiles_f32"][str(rows)])
        print(f"{rows:3d} rows: " + ", ".join(f"{s} {results['ms'][s][str(rows)]:.2f} ms" for s in systems), flush=True)
    print({k: round(v, 2) for k, v in results["ratios"].items()})
    write_results(results, args.output)


if __name__ == "__main__":
    main()
