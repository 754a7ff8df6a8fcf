"""Liger's Triton kernels on GPU (`pip install pandallm[liger]`): the fused linear cross-entropy (`model.loss_impl:
liger`) and the fused RMSNorm, RoPE and SwiGLU of the decoder layers (`model.liger_kernels`).

Liger is used rather than written here: its kernels are maintained against each transformers release and tested
for equality with the eager modules. They need a CUDA GPU; on the CPU both options are refused with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from pandallm.errors import ConfigError
from pandallm.model.chunked_loss import trained_positions
from pandallm.model.head import liger_unavailable


def apply_liger_kernels(model: nn.Module, device: torch.device) -> None:
    """Swap the RMSNorm, rotary embedding and SwiGLU MLP of `model` (plain or under peft) for Liger's, in place."""
    reason = liger_unavailable(device)
    if reason is not None:
        raise ConfigError(f"model.liger_kernels: {reason}; set model.liger_kernels: false")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The loss is pandallm's choice (`model.loss_impl`), not a patched forward: Liger's own would bypass it.
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=base
    )


def liger_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss_sum` by Liger's fused linear cross-entropy, over the trained positions only."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    trained_hidden, targets, _ = trained_positions(hidden, labels)
    loss_sum = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, trained_hidden, targets)
    return loss_sum.float(), torch.tensor(len(targets), device=labels.device)
