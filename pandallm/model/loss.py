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
    shifted = labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (shifted != IGNORE_INDEX).sum()
