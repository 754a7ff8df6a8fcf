"""NVLAMB: the LAMB variant of NVIDIA's BERT pretraining, as apex's `FusedLAMB(use_nvlamb=True)` computes it.

apex is CUDA-only and not installable from PyPI, and no maintained library implements this variant, so it is
written out here (pytorch-optimizer's `Lamb`, used for `optimizer: lamb`, follows the paper instead). Per step:

1. pre-normalisation: when the global gradient norm exceeds `max_grad_norm`, every gradient is divided by
   norm / max_grad_norm;
2. Adam moments with bias correction: u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w (decoupled decay);
3. trust ratio on every tensor: w -= lr * ||w|| / ||u|| * u (1 where either norm is 0). apex without
   `use_nvlamb` applies the ratio only to tensors with weight decay, which is what separates the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class NVLamb(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or max_grad_norm <= 0:
            raise ValueError(f"lr, eps and max_grad_norm must be positive, got {lr}, {eps}, {max_grad_norm}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        divisor = torch.clamp(global_norm / self.max_grad_norm, min=1.0)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() / divisor.to(p.device)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                m_hat = exp_avg / (1.0 - beta1**step)
                v_hat = exp_avg_sq / (1.0 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                weights = p.float()
                if group["weight_decay"] != 0:
                    update.add_(weights, alpha=group["weight_decay"])
                w_norm, u_norm = torch.linalg.vector_norm(weights), torch.linalg.vector_norm(update)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.copy_(weights - group["lr"] * ratio * update)
        return loss
