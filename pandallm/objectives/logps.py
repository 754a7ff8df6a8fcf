"""Log-probabilities of sequences under a causal LM: what preference objectives compare."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pandallm.data.encode import IGNORE_INDEX
from pandallm.model.chunked_loss import chunked_token_logps, shifted_labels

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its trained tokens (labels not -100) and their number.

    Shapes: logits (rows, seq, vocab), labels (rows, seq) -> (rows,), (rows,). As in `causal_lm_loss_sum`, the
    labels are shifted rather than the logits, which would copy the largest tensor of the step.
    """
    logps, trained = token_logps(logits, labels)
    return logps.sum(-1), trained.sum(-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the log-probability of each trained token (labels not -100) given the tokens before it, and
    whether it is trained; what online RL objectives weigh token by token.

    Shapes: logits (rows, seq, vocab), labels (rows, seq) -> (rows, seq) each, position t holding the log-probability
    of token t + 1 (0 where that token is not trained), as `sequence_logps` shifts.
    """
    next_labels = shifted_labels(labels)
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(logits, next_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return logps.view(labels.shape), next_labels != IGNORE_INDEX


def policy_sequence_logps(module: PandaLLM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the module's model on `batch` (rows: 2B for pairs), without the full logits unless the
    module's `loss_path` is `full`. Liger has no per-row variant: its path takes the chunked one here."""
    input_ids, position_ids, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    if module.loss_path == "full":
        return sequence_logps(module(input_ids, position_ids), labels)
    hidden, weight = module.head_input(input_ids, position_ids)
    token_logps = chunked_token_logps(hidden, weight, labels, module.hparams.loss_chunk_tokens)
    trained = shifted_labels(labels) != IGNORE_INDEX
    return token_logps.sum(-1), trained.sum(-1)
