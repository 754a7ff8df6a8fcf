"""Reward models: a LLaMA with one score per sequence (`LlamaForSequenceClassification`, one label), trained on
preference pairs with the Bradley-Terry loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F

from pandallm.objectives.base import Stage, Terms
from pandallm.objectives.preference import REWARD_METRICS, PairObjective
from pandallm.tokenizer import padding_id

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM


class RewardModel(PairObjective):
    """-log sigmoid(r(chosen) - r(rejected)) per pair (Bradley and Terry 1952; Ouyang et al. 2022), plus an optional
    `center_rewards_coefficient` times (r(chosen) + r(rejected))^2, which keeps the rewards centred on 0 (Eisenstein et
    al. 2023; TRL's option of the same name).

    The score of a sequence is read at its last token that is not the padding id, as transformers'
    `LlamaForSequenceClassification` reads it, so the export (`AutoModelForSequenceClassification`) scores a pair's
    tokens exactly as training did. `rewards/accuracies` is the validation pair accuracy.
    """

    head = "score"
    metric_names = REWARD_METRICS[:4]  # the rewards and the pair accuracy; there are no log-probabilities

    def __init__(self, center_rewards_coefficient: float = 0.0) -> None:
        """
        Args:
            center_rewards_coefficient: Weight of the penalty on the sum of a pair's two rewards (0: none).
        """
        self.center_rewards_coefficient = center_rewards_coefficient

    def config_updates(self, tokenizer: Any) -> dict[str, Any]:
        return {"num_labels": 1, "pad_token_id": padding_id(tokenizer)}

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        rewards = module(batch["input_ids"], batch["position_ids"]).squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return self.reward_terms(loss, chosen, rejected)
