"""The causal language-modelling loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pandallm.data.encode import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the trained positions, and their count.

    Returning the sum and the count (rather than a mean) lets callers average over any set of batches by
    token, e.g. the whole validation set, so that perplexity is exp of the true per-token loss.
    Shapes: logits (batch, seq, vocab), labels (batch, seq); label -100 is not trained.
    """
    # The labels are shifted, not the logits: position t is scored against token t + 1 and the last position
    # against nothing. Slicing the logits instead would copy the largest tensor of the step (batch x seq x vocab).
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    # At least fp32 for the softmax (bf16 / fp16 logits lose the loss's low bits), and never below the logits' own.
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits, next_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (next_labels != IGNORE_INDEX).sum()
