"""Advantages of PPO: generalized advantage estimation over each completion's tokens, and whitening.

Tensors are per token, (rows, seq), aligned as `token_logps` gives them: position t holds the action that chose token
t + 1, and `mask` says which positions are actions (a completion's tokens: contiguous in each row).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) per action: `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lam
    A_{t+1}`, the value after a completion's last action 0 (the episode ends there); and the returns `A + V` that
    the value head learns. Zero outside the actions. A loop over positions, every row at once: completions are short
    next to what a forward pass costs."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Outside the actions the recursion starts again: nothing after a completion flows back into it.
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, advantages + values * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` at the actions shifted to mean 0 and scaled to variance 1 (Bessel-corrected, + 1e-8), 0 elsewhere;
    with fewer than two actions, centred only."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    centred = (values - mean) * mask
    if count < 2:
        return centred
    variance = (centred**2).sum() / (count - 1)
    return centred * torch.rsqrt(variance + 1e-8)
