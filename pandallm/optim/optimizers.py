"""The optimizers a recipe can name (`model.optimizer`).

- `adamw`: torch's AdamW, fused (one kernel for all parameters) on CUDA and on the CPU. Under DeepSpeed ZeRO with
  the optimizer offloaded to CPU memory (`offload_optimizer` in configs/deepspeed/), DeepSpeed's CPUAdam instead:
  the same AdamW update, multi-threaded and SIMD-vectorised over DeepSpeed's flat fp32 partitions (DeepSpeed
  refuses other optimizers there unless told not to; it builds the op on first use, which takes a minute once).
- `adamw_8bit`: bitsandbytes' AdamW8bit, moments kept in 8 bits (block-wise quantized): ~75% less optimizer
  memory. PandaLLM's `bit_training` switched its AdamW to this one. Tensors under 4096 elements keep 32-bit state.
- `paged_adamw`, `paged_adamw_8bit`: bitsandbytes' paged AdamW (32- / 8-bit state): the state lives in CUDA
  unified memory and is paged out to CPU memory under GPU memory pressure, as QLoRA does. On the CPU,
  bitsandbytes runs them unpaged (it warns once), so they behave as `adamw` / `adamw_8bit` there.
- `lamb`: LAMB (You et al., 2020) from pytorch-optimizer: the AdamW direction scaled per tensor by the trust
  ratio ||w|| / ||update||, without bias correction (the paper's version 3).
- `nvlamb`: NVIDIA's LAMB (see `pandallm.optim.nvlamb`): global gradient pre-normalisation, bias correction,
  trust ratio on every tensor.

bitsandbytes' LAMB8bit, which PandaLLM paired with `bit_training`, is not offered: its trust ratio is a clip of
the update to max_unorm * ||w||, so a tensor at zero (every LoRA B matrix at the start) never moves. Both LAMBs
above use a ratio of 1 for a zero tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch

from pandallm.optim.nvlamb import NVLamb

log = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "lamb", "nvlamb"]

_BITSANDBYTES = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def decay_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, keep_empty: bool = True
) -> list[dict]:
    """The trainable parameters in two groups: matrices with `weight_decay`, norms and biases without; an empty
    group is left out unless `keep_empty`.

    By name, not by `ndim`: FSDP flattens parameters and ZeRO-3 empties them before the optimizer is built, so their
    shapes no longer tell a norm from a matrix.
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            # Anywhere in the path: peft nests a trained copy of a norm as `...norm.modules_to_save.default.weight`.
            (no_decay if "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"] or keep_empty]


def build_optimizer(
    name: OptimizerName,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    cpu_offload: bool = False,
    fused: bool = True,
) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter `groups` (each with its own `weight_decay`); `cpu_offload`: DeepSpeed
    steps it on the CPU (ZeRO-Offload); `fused`: AdamW may run as one fused kernel."""
    betas = tuple(betas)
    if name == "adamw" and cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if cpu_offload:
        raise ValueError(
            f"model.optimizer: '{name}' cannot run under DeepSpeed's optimizer offload; use adamw (DeepSpeed's "
            "CPUAdam) or a DeepSpeed config without offload_optimizer"
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused and device.type in ("cuda", "cpu"))
    if name in _BITSANDBYTES:
        import bitsandbytes as bnb

        if name.startswith("paged") and device.type != "cuda":
            log.info("pandallm: %s pages its state only on CUDA; on %s it runs unpaged", name, device.type)
        return getattr(bnb.optim, _BITSANDBYTES[name])(groups, lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        from pytorch_optimizer import Lamb

        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "nvlamb":
        return NVLamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"model.optimizer: unknown optimizer '{name}'; one of {', '.join(OptimizerName.__args__)}")
