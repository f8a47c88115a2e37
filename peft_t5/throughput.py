"""How well training uses the machine: useful tokens per second and model FLOP utilisation (MFU).

Tokens are counted on the device and read only when the Trainer logs (it syncs there anyway), so counting
adds no host sync to a step. MFU is model FLOPs per second over the dense matmul rate measured on this
machine at the start of training, in the training dtype.
"""
from __future__ import annotations

import time

import torch


def matmul_rate(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, n: int | None = None,
                repeats: int = 10) -> float:
    """The dense matrix-multiply rate in FLOP/s, measured now (the ceiling for model FLOP/s)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = n or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device).manual_seed(0)  # its own: the global RNG drives the run's dropout
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def model_flops_per_token(model: torch.nn.Module, trains_base: bool = False) -> tuple[float, float]:
    """FLOPs a training step spends on one source token and on one target token.

    A token costs 2 FLOPs per weight of each linear layer it passes through (source: the encoder; target: the
    decoder and the output layer) forward, as many again for the input gradients, and as many again for the
    weight gradients when the base trains: 4x (LoRA, frozen base) or 6x. Attention maps are not counted.
    """
    encoder = decoder = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' 4-bit layers and LoRA's A and B included
            weights = module.in_features * module.out_features
            if ".encoder." in f".{name}.":
                encoder += weights
            else:
                decoder += weights
    factor = 6 if trains_base else 4
    return factor * encoder, factor * decoder


class ThroughputMeter:
    """Counts useful (non-pad) source and target tokens on the device, padded ones on the host."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.flops_source, self.flops_target = model_flops_per_token(model)
        self.dtype, self.peak = dtype, None
        self.counts = None  # device tensor: [useful source, useful target]
        self.padded = 0
        self.total = {"useful_tokens": 0, "padded_tokens": 0, "flops": 0.0, "seconds": 0.0}
        self.window = None

    def start(self, device: torch.device) -> None:
        """Measure the matmul rate on the training device and start the clock."""
        self.peak = matmul_rate(self.dtype, device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)
        self.window = [time.perf_counter(), 0.0, 0]  # start, seconds paused, padded tokens at start

    def count(self, inputs: dict) -> None:
        if self.counts is None:
            return
        self.counts[0] += inputs["attention_mask"].sum()
        if "labels" in inputs:  # an extractive batch has start/end positions, no target tokens
            self.counts[1] += inputs["labels"].ne(-100).sum()
            self.padded += inputs["labels"].numel()
        self.padded += inputs["input_ids"].numel()

    def pause(self, seconds: float) -> None:
        """Time spent on evaluation or saving inside the window: not training time."""
        if self.window is not None:
            self.window[1] += seconds

    def read(self) -> dict[str, float]:
        """Throughput since the last read (one host sync), added to the totals."""
        if self.window is None:
            return {}
        source, target = self.counts.tolist()
        self.counts.zero_()
        seconds = max(time.perf_counter() - self.window[0] - self.window[1], 1e-9)
        padded = self.padded - self.window[2]
        flops = self.flops_source * source + self.flops_target * target
        self.window = [time.perf_counter(), 0.0, self.padded]
        for key, value in (("useful_tokens", source + target), ("padded_tokens", padded), ("flops", flops),
                           ("seconds", seconds)):
            self.total[key] += value
        return self._rates(source + target, padded, flops, seconds)

    def finish(self) -> None:
        """Fold the steps since the last read into the totals (training ended between logging steps)."""
        if self.window is not None and self.padded > self.window[2]:
            self.read()

    def _rates(self, useful: int, padded: int, flops: float, seconds: float) -> dict[str, float]:
        return {"tokens_per_s": round(useful / seconds, 1), "pad_share": round(1 - useful / max(padded, 1), 4),
                "mfu": round(flops / seconds / self.peak, 4)}

    def summary(self) -> dict:
        """The whole run's figures, for peft_t5.json."""
        if self.window is None or not self.total["seconds"]:
            return {}
        t = self.total
        return {**self._rates(t["useful_tokens"], t["padded_tokens"], t["flops"], t["seconds"]),
                "useful_tokens": t["useful_tokens"], "train_seconds": round(t["seconds"], 2),
                "matmul_flop_per_s": self.peak, "matmul_dtype": str(self.dtype).removeprefix("torch."),
                "flops_per_source_token": self.flops_source, "flops_per_target_token": self.flops_target}
