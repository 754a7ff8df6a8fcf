"""`model.loss_impl`: which path computes the loss from the decoder's output, and the head's input and weight for the
paths that project the hidden states themselves.

    full     the model's logits (batch x seq x vocab), then `causal_lm_loss_sum` / `sequence_logps`
    chunked  `pandallm.model.chunked_loss`: a chunk of trained tokens at a time, on any device
    liger    Liger's fused linear cross-entropy (CUDA; `pip install pandallm[liger]`); per-row log-probabilities
             (preference objectives) take the chunked path
    auto     liger where it runs, else chunked, else full

The head's input is taken with a forward pre-hook rather than by calling the decoder and the head apart: the head
still runs inside the model's own forward, which is where FSDP2 has gathered the root unit's weights (embeddings,
final norm, `lm_head`), where peft picks the trained copy of a `modules_to_save` head, and what DDP sees. The hook
hands the head an empty slice, so its logits are `(batch, 0, vocab)` and cost nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from pandallm.errors import ConfigError
from pandallm.model.zero import is_zero3

LossImpl = Literal["auto", "full", "chunked", "liger"]


@dataclass
class HeadInput:
    """What the output head was given, (batch, seq, hidden), and the weight it would have used, (vocab, hidden)."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None


def _head_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers the output head may run: itself, or the copies peft's `modules_to_save` wrapper holds."""
    head = model.get_output_embeddings()
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


@contextlib.contextmanager
def head_bypassed(model: nn.Module, bypass: bool = True) -> Iterator[HeadInput]:
    """While active, forwards of `model` give the head no position to project; its input and weight are captured.
    Without `bypass`, the head projects every position as usual and its input is captured all the same (what a
    value head beside the language-model head reads: PPO)."""
    captured = HeadInput()

    def take_input(module: nn.Linear, args: tuple) -> tuple | None:
        (hidden,) = args
        captured.hidden, captured.weight = hidden, module.weight
        return (hidden[..., :0, :],) if bypass else None

    handles = [linear.register_forward_pre_hook(take_input) for linear in _head_linears(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def chunked_unsupported(model: nn.Module, strategy: L.pytorch.strategies.Strategy | None) -> str | None:
    """Why the head's weight cannot be used outside its own forward here, or None when it can."""
    head = model.get_output_embeddings()
    if any(hasattr(m, "lora_A") for m in head.modules()):
        return "lm_head carries LoRA adapters (model.lora_target_modules), which only its own forward applies"
    linears = _head_linears(model)
    if not linears or not all(m.weight.is_floating_point() and m.bias is None for m in linears):
        return "lm_head is quantized or has a bias"
    if isinstance(strategy, FSDPStrategy):
        # FSDP1 flattens the root unit's parameters and may free the gathered ones right after its forward.
        return "Lightning's FSDPStrategy shards lm_head into flat parameters (FSDP2, ModelParallelStrategy, works)"
    if is_zero3(strategy):
        return "DeepSpeed ZeRO-3 gathers lm_head's weight only inside its own forward"
    return None


def liger_unavailable(device: torch.device) -> str | None:
    """Why Liger's kernels cannot run here, or None when they can."""
    if device.type != "cuda":
        return f"Liger's kernels are Triton GPU kernels and the model is on {device.type}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install pandallm[liger])"
    return None


def resolve_loss_impl(
    requested: LossImpl, model: nn.Module, strategy: L.pytorch.strategies.Strategy | None, device: torch.device
) -> tuple[str, str | None]:
    """The loss path to use and, where it is not the one asked for (or `auto` settles below liger), why not."""
    unsupported = chunked_unsupported(model, strategy)
    if requested == "full":
        return "full", None
    if requested == "liger":
        reason = liger_unavailable(device) or unsupported
        if reason is not None:
            raise ConfigError(f"model.loss_impl: liger cannot run: {reason}; use chunked or auto")
        return "liger", None
    if unsupported is not None:
        return "full", f"the full logits are used: {unsupported}"
    if requested == "auto" and liger_unavailable(device) is None:
        return "liger", None
    return "chunked", None
