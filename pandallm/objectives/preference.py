"""Preference objectives on pairs: DPO (and IPO, hinge, cDPO) against a reference model; SimPO and ORPO without one.

A batch holds B pairs as 2B sequences (the B chosen, then the B rejected: `pandallm.data.pairs.collate_pairs`),
scored in one forward. The unit is the pair: the loss is a sum over pairs, and `PandaLLM` divides it by the pairs of
the whole accumulated batch of every rank. Metrics (TRL's names, so curves compare): `rewards/chosen`,
`rewards/rejected` (the implicit rewards), `rewards/accuracies` (chosen's reward above rejected's), `rewards/margins`,
`logps/chosen`, `logps/rejected` (summed over each completion's tokens, or averaged where the objective averages).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from pandallm.errors import ConfigError
from pandallm.objectives.base import Objective, Stage, Terms
from pandallm.objectives.logps import policy_sequence_logps

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PairObjective(Objective):
    """What the objectives on pairs share: the forward over both sides and the reward metrics."""

    rows = "pairs"
    metric_names = REWARD_METRICS

    @staticmethod
    def policy_logps(module: PandaLLM, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of each side's trained tokens, and their numbers: (2B,), (2B,)."""
        return policy_sequence_logps(module, batch)

    @staticmethod
    def reward_terms(
        loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor | None = None
    ) -> Terms:
        """Per-pair losses and rewards (B,), and the policy's log-probabilities shown (2B,), as sums over pairs."""
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
        }
        if logps is not None:
            logps_chosen, logps_rejected = logps.detach().chunk(2)
            metrics.update({"logps/chosen": logps_chosen.sum(), "logps/rejected": logps_rejected.sum()})
        return Terms(loss.sum(), torch.tensor(loss.numel(), device=loss.device), metrics)


def _check_beta(beta: float, name: str) -> None:
    if not beta > 0:
        raise ConfigError(f"model.objective.init_args.beta of {name} must be positive, got {beta}")


def _check_smoothing(label_smoothing: float, name: str) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"model.objective.init_args.label_smoothing of {name} must be in [0, 0.5), got {label_smoothing}"
        )


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with a share `label_smoothing` of the pairs taken as flipped (cDPO, Mitchell 2023)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


class DPO(PairObjective):
    """Direct Preference Optimization (Rafailov et al. 2023) and its variants, against a reference model.

    With LoRA the reference is the base with the adapters disabled; otherwise it is the model training starts from.
    Either way `reference: precompute` (the default) scores every training and validation pair with it once, before
    the first step, and keeps the log-probabilities with the run (checkpoints included): no second model, no second
    forward per step. `live` scores each batch as it trains (the LoRA base, or a frozen copy of the starting model
    beside the trained one).
    """

    uses_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        reference: Literal["precompute", "live"] = "precompute",
    ) -> None:
        """
        Args:
            beta: Strength of the KL penalty to the reference (DPO's beta; IPO's tau).
            loss_type: `sigmoid` (DPO), `ipo` (IPO, Azar et al. 2023: squared loss on the log-ratio difference, each
                side's log-ratio averaged over its tokens, as TRL does), or `hinge` (SLiC's hinge on the same logits).
            label_smoothing: The share of pairs assumed mislabelled (conservative DPO, cDPO); `sigmoid` only.
            reference: `precompute` the reference log-probabilities once before training, or score `live`.
        """
        _check_beta(beta, "DPO")
        _check_smoothing(label_smoothing, "DPO")
        if label_smoothing and loss_type != "sigmoid":
            raise ConfigError(
                f"model.objective.init_args.label_smoothing applies to loss_type sigmoid, not {loss_type}"
            )
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference = reference

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        logps, tokens = self.policy_logps(module, batch)
        ratios = logps - module.reference_logps(batch, stage)
        chosen_ratio, rejected_ratio = ratios.chunk(2)
        if self.loss_type == "sigmoid":
            loss = _smoothed_sigmoid_loss(self.beta * (chosen_ratio - rejected_ratio), self.label_smoothing)
        elif self.loss_type == "hinge":
            loss = torch.relu(1 - self.beta * (chosen_ratio - rejected_ratio))
        else:  # ipo
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            loss = (delta - 1 / (2 * self.beta)) ** 2
        return self.reward_terms(loss, self.beta * chosen_ratio, self.beta * rejected_ratio, logps)


class SimPO(PairObjective):
    """Simple Preference Optimization (Meng et al. 2024): reference-free, on each side's log-probability averaged
    over its tokens, with a target margin `gamma`. Rewards are `beta` times those averages."""

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        """
        Args:
            beta: Scale of the length-normalised rewards.
            gamma: Target reward margin between chosen and rejected.
            label_smoothing: The share of pairs assumed mislabelled.
        """
        _check_beta(beta, "SimPO")
        _check_smoothing(label_smoothing, "SimPO")
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        logps, tokens = self.policy_logps(module, batch)
        average = logps / tokens.clamp(min=1)
        chosen, rejected = (self.beta * average).chunk(2)
        loss = _smoothed_sigmoid_loss(chosen - rejected - self.gamma, self.label_smoothing)
        return self.reward_terms(loss, chosen, rejected, average)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)  # a side whose every token has probability 1 would give log(0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO(PairObjective):
    """Odds Ratio Preference Optimization (Hong et al. 2024): reference-free; the chosen side's SFT loss plus `beta`
    (the paper's lambda) times the odds-ratio loss, both per pair as in the paper: the SFT loss is the mean over the
    chosen completion's tokens (TRL's trainer also trains the prompt's tokens there). Rewards are `beta` times each
    side's average log-probability."""

    metric_names = (*REWARD_METRICS, "nll_loss", "log_odds_ratio")

    def __init__(self, beta: float = 0.1) -> None:
        """
        Args:
            beta: Weight of the odds-ratio term (the paper's lambda; TRL's beta).
        """
        _check_beta(beta, "ORPO")
        self.beta = beta

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        logps, tokens = self.policy_logps(module, batch)
        average = logps / tokens.clamp(min=1)
        chosen, rejected = average.chunk(2)
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen
        terms = self.reward_terms(nll - self.beta * ratio, self.beta * chosen, self.beta * rejected, average)
        terms.metrics["nll_loss"] = nll.detach().sum()
        terms.metrics["log_odds_ratio"] = ratio.detach().sum()
        return terms
