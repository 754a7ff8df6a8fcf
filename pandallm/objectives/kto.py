"""KTO (Ethayarajh et al. 2024): preference tuning from completions judged one at a time, desirable or not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from pandallm.errors import ConfigError
from pandallm.objectives.base import Stage, Terms
from pandallm.objectives.preference import PairObjective

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM


class KTO(PairObjective):
    """Kahneman-Tversky Optimization, against a reference model (as DPO's: the LoRA base, or the starting model
    scored once before training).

    Each record is a prompt and one completion with a label. A batch holds every record's own sequence and a
    mismatched one (its prompt with another record's completion: `pandallm.data.pairs`), whose mean log-ratio to the
    reference, clamped at 0 and without gradient, estimates the KL divergence z (over all ranks). The loss of a
    desirable completion is `desirable_weight * (1 - sigmoid(beta (r - z)))`, of an undesirable one
    `undesirable_weight * (1 - sigmoid(beta (z - r)))`, r being its log-ratio; the unit is the record. Logged:
    `rewards/chosen` and `rewards/rejected` (beta r of the desirable and of the undesirable completions, each over its
    own records) and `kl`.
    """

    rows = "unpaired"
    uses_reference = True
    metric_names = ("rewards/chosen", "desirable", "rewards/rejected", "undesirable", "kl")
    metric_counts = {"rewards/chosen": "desirable", "rewards/rejected": "undesirable"}

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: Literal["precompute", "live"] = "precompute",
    ) -> None:
        """
        Args:
            beta: Strength of the KL penalty to the reference.
            desirable_weight: Weight of the desirable completions' losses (raise it when they are fewer).
            undesirable_weight: Weight of the undesirable completions' losses.
            reference: `precompute` the reference log-probabilities once before training, or score `live`.
        """
        if not beta > 0:
            raise ConfigError(f"model.objective.init_args.beta of KTO must be positive, got {beta}")
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ConfigError("model.objective.init_args: KTO's desirable_weight and undesirable_weight must be >= 0")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.reference = reference

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        logps, _ = self.policy_logps(module, batch)
        ratios = logps - module.reference_logps(batch, stage).to(logps.dtype)
        ratio, mismatched = ratios.chunk(2)
        # z: the mean log-ratio of the mismatched sequences over the batch of every rank, clamped, no gradient.
        kl = torch.stack([mismatched.detach().sum(), torch.tensor(float(len(mismatched)), device=logps.device)])
        if module._trainer is not None and module.trainer.world_size > 1:
            kl = module.trainer.strategy.reduce(kl, reduce_op="sum")
        z = (kl[0] / kl[1]).clamp(min=0)
        desirable = batch["desirable"].bool()
        loss = torch.where(
            desirable,
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - ratio))),
        )
        rewards = self.beta * ratio.detach()
        metrics = {
            "rewards/chosen": rewards[desirable].sum(),
            "desirable": desirable.sum().to(rewards.dtype),
            "rewards/rejected": rewards[~desirable].sum(),
            "undesirable": (~desirable).sum().to(rewards.dtype),
            "kl": z.detach() * len(ratio),  # per record, so that its mean over records is z
        }
        return Terms(loss.sum(), torch.tensor(len(ratio), device=loss.device), metrics)
