"""Lightning checkpoints of adapter runs: the trainable weights only, and a check that they fit on restore.

A LoRA run's checkpoint would otherwise hold the whole frozen base (Lightning #19149): 130 GB for a 65B model in
bf16, to save a few hundred MB of adapters. The base is rebuilt from its source instead, so the checkpoint also
records a small sample of the frozen base's embeddings: restoring adapters onto another base (LLaMA-1 and
LLaMA-2 7B have the same shapes) fails with a clear error instead of silently computing something else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pandallm.errors import ModelError

CHECKPOINT_KEY = "pandallm_frozen_base"
_SAMPLE_ROWS, _SAMPLE_COLUMNS = 4, 16


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def frozen_base_sample(module: nn.Module) -> list[list[float]] | None:
    """A few values of the frozen input embeddings, or None where they are not materialized (meta, sharded)."""
    for name, param in module.named_parameters():
        if param.requires_grad or "embed_tokens" not in name:
            continue
        if param.device.type == "meta" or param.ndim != 2 or param.shape[0] < _SAMPLE_ROWS:
            return None
        return param.detach()[:_SAMPLE_ROWS, :_SAMPLE_COLUMNS].float().cpu().tolist()
    return None


def keep_trainable(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Drop the frozen weights from `checkpoint["state_dict"]` and record the frozen base's sample."""
    keys = trainable_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
    checkpoint[CHECKPOINT_KEY] = frozen_base_sample(module)


def check_restorable(checkpoint: dict[str, Any], module: nn.Module, where: str) -> None:
    """Raise a ModelError unless `checkpoint` holds exactly the trainable weights of `module`, in the same shapes,
    saved on the same frozen base. `where` names the checkpoint in the message.
    """
    state = checkpoint.get("state_dict", {})
    expected = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{where} does not hold this model's trainable weights: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} not trainable here (e.g. {unexpected[:3]}). Was it saved by a run "
            "with other settings of model.use_lora, lora_target_modules or modules_to_save?"
        )
    mismatched = [
        f"{name} {list(state[name].shape)} in the checkpoint vs {list(p.shape)} here"
        for name, p in expected.items()
        if tuple(state[name].shape) != tuple(p.shape)
    ]
    if mismatched:
        raise ModelError(
            f"{where} was saved with adapters of other shapes (another base model or model.lora_r): "
            + "; ".join(mismatched[:5])
        )
    saved, current = checkpoint.get(CHECKPOINT_KEY), frozen_base_sample(module)
    # A loose tolerance: the base may be loaded in another dtype (bf16 on the GPU, fp32 for an export on CPU).
    if (
        saved is not None
        and current is not None
        and not torch.allclose(torch.tensor(saved), torch.tensor(current), rtol=2e-2, atol=1e-3)
    ):
        raise ModelError(
            f"{where} holds adapters trained on another base model: the frozen embeddings of "
            "model.model_name_or_path differ from those the run was trained on"
        )
