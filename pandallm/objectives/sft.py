"""Supervised fine-tuning and pretraining: next-token cross-entropy over the trained tokens."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pandallm.model.loss import lm_loss_sum
from pandallm.objectives.base import Objective, Stage, Terms

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM


class SFT(Objective):
    """Instruction tuning and continual pretraining (the default objective): the mean cross-entropy of every trained
    token (labels not -100) of the accumulated batch. The unit is the target token."""

    rows = "sequences"

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        loss_sum, count = lm_loss_sum(module, batch)
        return Terms(loss_sum, count)

    def evaluation_logs(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        # Token-weighted over the whole set: the perplexity is exp of the true mean loss.
        return {"ppl": math.exp(min(loss, 700.0))}
