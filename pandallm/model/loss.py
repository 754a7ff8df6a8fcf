"""The causal language-modelling loss: from the logits (`causal_lm_loss_sum`), or by the path `model.loss_impl`
chose for a module's batch (`lm_loss_sum`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pandallm.data.encode import IGNORE_INDEX
from pandallm.model.chunked_loss import chunked_loss_sum, shifted_labels

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the trained positions, and their count.

    Returning the sum and the count (rather than a mean) lets callers average over any set of batches by
    token, e.g. the whole validation set, so that perplexity is exp of the true per-token loss.
    Shapes: logits (batch, seq, vocab), labels (batch, seq); label -100 is not trained.
    """
    next_labels = shifted_labels(labels)
    # At least fp32 for the softmax (bf16 / fp16 logits lose the loss's low bits), and never below the logits' own.
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits, next_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (next_labels != IGNORE_INDEX).sum()


def lm_loss_sum(module: PandaLLM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss_sum` of the module's model on `batch`, by the module's `loss_path` (the same loss and
    gradients on each, to fp32 rounding; only the memory and time differ)."""
    input_ids, position_ids, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    if module.loss_path == "full":
        return causal_lm_loss_sum(module(input_ids, position_ids), labels)
    hidden, weight = module.head_input(input_ids, position_ids)
    if module.loss_path == "liger":
        from pandallm.model.liger import liger_loss_sum

        return liger_loss_sum(hidden, weight, labels)
    return chunked_loss_sum(hidden, weight, labels, module.hparams.loss_chunk_tokens)
