"""Adafactor with T5's settings (fixed learning rate, no parameter scaling, no first moment), stepping all
tensors of one shape together.

Written by hand because neither library does this: transformers' Adafactor loops in Python over every
tensor (~100 small LoRA tensors: ~40 ms a step on an H100, more than the model's own work), and
torch.optim.Adafactor always scales the step by the parameter's RMS, which leaves a zero-initialised LoRA B
almost still. Same update as transformers' `Adafactor(scale_parameter=False, relative_step=False,
warmup_init=False)`, same state names, so checkpoints move between the two.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch


class GroupedAdafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            stacks = defaultdict(list)  # tensors that can be stepped as one: same shape, dtype, device, step count
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Adafactor does not support sparse gradients")
                    state = self.state[p]
                    if not state:
                        self._init_state(state, p)
                    stacks[(p.shape, p.dtype, p.device, state["step"])].append(p)
            for params in stacks.values():
                self._step_stack(params, group)
        return loss

    @staticmethod
    def _init_state(state: dict, p: torch.Tensor) -> None:
        state["step"] = 0
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _step_stack(self, params: list[torch.Tensor], group: dict) -> None:
        states = [self.state[p] for p in params]
        step = states[0]["step"] + 1
        for state in states:
            state["step"] = step
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        grads = torch.stack([p.grad for p in params]).float()
        squared = grads.square().add_(group["eps"][0])
        if params[0].dim() >= 2:
            rows = torch.stack([s["exp_avg_sq_row"] for s in states]).to(grads)
            cols = torch.stack([s["exp_avg_sq_col"] for s in states]).to(grads)
            rows.lerp_(squared.mean(dim=-1), 1.0 - beta2t)
            cols.lerp_(squared.mean(dim=-2), 1.0 - beta2t)
            row_factor = (rows / rows.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = row_factor * cols.unsqueeze(-2).rsqrt() * grads
            torch._foreach_copy_([s["exp_avg_sq_row"] for s in states], list(rows.unbind(0)))
            torch._foreach_copy_([s["exp_avg_sq_col"] for s in states], list(cols.unbind(0)))
        else:
            second = torch.stack([s["exp_avg_sq"] for s in states]).to(grads).lerp_(squared, 1.0 - beta2t)
            update = second.rsqrt() * grads
            torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(second.unbind(0)))
        rms = update.flatten(1).norm(dim=1) / math.sqrt(params[0].numel())
        scale = group["lr"] / (rms / group["clip_threshold"]).clamp_(min=1.0)
        update.mul_(scale.view(-1, *([1] * params[0].dim())))
        decay = 1.0 - group["weight_decay"] * group["lr"]
        if params[0].dtype == torch.float32:
            if group["weight_decay"]:
                torch._foreach_mul_(params, decay)
            torch._foreach_sub_(params, list(update.unbind(0)))
        else:  # bf16 weights: update in float32, round once (as transformers' Adafactor does)
            weights = torch.stack(params).float().mul_(decay)
            torch._foreach_copy_(params, list((weights - update).unbind(0)))
