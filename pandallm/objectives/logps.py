"""Log-probabilities of sequences under a causal LM: what preference objectives compare."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pandallm.data.encode import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its trained tokens (labels not -100) and their number.

    Shapes: logits (rows, seq, vocab), labels (rows, seq) -> (rows,), (rows,). As in `causal_lm_loss_sum`, the
    labels are shifted rather than the logits, which would copy the largest tensor of the step.
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    # Ignored positions give 0.
    token_logps = -F.cross_entropy(logits, next_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    trained = next_labels != IGNORE_INDEX
    return token_logps.view(labels.shape).sum(-1), trained.sum(-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the log-probability of each trained token (labels not -100) given the tokens before it, and
    whether it is trained; what online RL objectives weigh token by token.

    Shapes: logits (rows, seq, vocab), labels (rows, seq) -> (rows, seq) each, position t holding the log-probability
    of token t + 1 (0 where that token is not trained), as `sequence_logps` shifts.
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(logits, next_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return logps.view(labels.shape), next_labels != IGNORE_INDEX
