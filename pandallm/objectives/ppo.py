"""PPO (Schulman et al. 2017) for language models, as RLHF trains them (Ziegler et al. 2019, Ouyang et al. 2022;
LLMBox's run_ppo.sh with TRL's PPOTrainer): a policy with a value head on its last hidden states, rewards from code
or a reward model, a per-token KL penalty to the reference, GAE and several optimizer steps per rollout.

Each rollout (`pandallm.objectives.online`): the policy samples `num_generations` completions of each prompt; a
completion's reward is its score (the weighted rewards) at its last token, minus `kl_coef * (log pi_old - log
pi_ref)` at every token (the KL penalty to the reference: the base with LoRA's adapters disabled, or a frozen copy of
the starting model; `kl_coef: 0` keeps none; with `kl_target`, the weight adapts after each rollout, Ziegler et al.'s
controller, `train/kl_coef`); the value head's predictions V_old and the rewards give the advantages
by GAE (`gamma`, `lam`), whitened over the micro-batch's tokens (`whiten_advantages`), and the returns `A + V_old`.
Then `ppo_epochs` optimizer steps train on that rollout (the data repeats their rows: `data.rollout_passes`), each
token's loss

    max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange))
      + vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old - cliprange_value, V_old + cliprange_value) - R)^2)

with `ratio = pi / pi_old`, pi_old the policy that sampled the rollout (its log-probabilities from the first step's
forward pass). The loss's unit is the completion token: `PandaLLM` averages it over the accumulated window's tokens
of every rank.

The value head is a linear layer, initialized to 0 (V = 0 before training), trained with the model (its weights are
in the checkpoints, also of LoRA runs) and not exported: the export is the policy, a plain causal LM.

Logged (train/ and val/): `reward`, `reward_std`, `rewards/<name>` and `_std`, `completion_length`, `truncated`,
`kl` (per token, with `kl_coef`), `policy_loss`, `value_loss`, `clip_ratio` (tokens where the policy's clipped term
won), `value_clip_ratio` (likewise for the values), `entropy`, and `value` (the mean prediction of the value head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pandallm.objectives.base import Terms
from pandallm.objectives.online import METRIC, ROLLOUT_METRICS, OnlineRL, check_options, policy_scores
from pandallm.rl.advantages import gae, whiten
from pandallm.rl.buffer import position

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

PER_TOKEN = ("policy_loss", "value_loss", "clip_ratio", "value_clip_ratio", "entropy", "value")
VALUE_HEAD = "value"


def value_head(hidden_size: int) -> nn.Linear:
    """The value head: hidden state -> value, starting at 0 everywhere (no initial bias toward any return)."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per token (N, T): `-kl_coef * kl` at every action, plus each completion's score (N,) at its last action."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token (N, T): the clipped policy loss, the clipped value loss (with its 0.5), and where each clipped term
    was the larger (the clip fractions)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    policy = torch.max(unclipped, clipped)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_errors, value_errors_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    value = 0.5 * torch.max(value_errors, value_errors_clipped)
    return policy, value, clipped > unclipped, value_errors_clipped > value_errors


def adapted_kl_coef(coefficient: float, kl: float, completions: float, target: float, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019): the weight times `1 + e * completions / horizon`, with `e` the
    relative error of the measured KL per completion to the target, clipped to [-0.2, 0.2]."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coefficient * (1.0 + error * completions / horizon)


class PPO(OnlineRL):
    """Proximal Policy Optimization with a value head on prompt rows (`data.rows: prompts`, linked), see the module
    docstring."""

    passes_option = "ppo_epochs"

    def __init__(
        self,
        rewards: list[dict[str, Any]],
        ppo_epochs: int = 4,
        num_generations: int = 1,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        whiten_advantages: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        log_samples_every_n_steps: int = 50,
    ) -> None:
        """
        Args:
            rewards: The rewards, summed with their weights: `{function: 'module:name', weight, kwargs}` (a Python
                callable) or `{model: directory, weight}` (a sequence-classification reward model, e.g. the export of
                a pandallm `RewardModel` run); see pandallm.rl.rewards and the ready-made pandallm.rewards.
            ppo_epochs: Optimizer steps over each rollout (each step: the rollout's micro-batches of every rank).
            num_generations: Completions sampled per prompt.
            kl_coef: Weight of the per-token KL penalty to the reference in the rewards (0: no reference kept); with
                `kl_target`, its initial value.
            kl_target: Adapt the KL weight after each rollout toward this KL per completion (nats, summed over its
                tokens), as Ziegler et al. 2019 and TRL's `adap_kl_ctrl` do; null: a fixed weight.
            kl_horizon: Completions over which the adaptive weight moves by at most 20 % (the controller's horizon).
            gamma: Discount of GAE (1.0: none, as in RLHF).
            lam: GAE's lambda (bias-variance trade-off of the advantages).
            cliprange: Clipping range of the policy's probability ratio.
            cliprange_value: Clipping range of the value predictions around the rollout's.
            vf_coef: Weight of the value loss.
            whiten_advantages: Shift and scale the advantages to mean 0 and variance 1 over the micro-batch's tokens.
            temperature: Sampling temperature of the rollouts (the policy is scored at the same temperature).
            top_p: Nucleus sampling of the rollouts (1.0: the whole distribution).
            max_new_tokens: Longest completion, in tokens.
            seed: Seed of the rollouts' sampling; default: the run's `seed_everything`.
            log_samples_every_n_steps: Write the prompts, completions and rewards of every N-th optimizer step to
                `rollouts.jsonl` in the log directory (and a wandb table); 0: never.
        """
        check_options(
            (
                ("num_generations", num_generations, num_generations >= 1, ">= 1"),
                ("kl_coef", kl_coef, kl_coef >= 0, ">= 0"),
                ("kl_coef", kl_coef, kl_target is None or kl_coef > 0, "> 0 with kl_target (it adapts by factors)"),
                ("kl_target", kl_target, kl_target is None or kl_target > 0, "> 0, or null"),
                ("kl_horizon", kl_horizon, kl_horizon >= 1, ">= 1"),
                ("gamma", gamma, 0 <= gamma <= 1, "in [0, 1]"),
                ("lam", lam, 0 <= lam <= 1, "in [0, 1]"),
                ("cliprange", cliprange, cliprange > 0, "> 0"),
                ("cliprange_value", cliprange_value, cliprange_value > 0, "> 0"),
                ("vf_coef", vf_coef, vf_coef >= 0, ">= 0"),
            )
        )
        self._set_sampling(
            rewards, num_generations, temperature, top_p, max_new_tokens, seed, log_samples_every_n_steps, ppo_epochs
        )
        self.ppo_epochs = ppo_epochs
        self.kl_coef = kl_coef
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.gamma = gamma
        self.lam = lam
        self.cliprange = cliprange
        self.cliprange_value = cliprange_value
        self.vf_coef = vf_coef
        self.whiten_advantages = whiten_advantages
        self.uses_reference = kl_coef > 0
        self._set_metrics(ROLLOUT_METRICS, (*PER_TOKEN, *(("kl",) if kl_coef > 0 else ())))

    def trained_modules(self, config: Any) -> dict[str, nn.Module]:
        return {VALUE_HEAD: value_head(config.hidden_size)}

    # ---- a step ----------------------------------------------------------------------------------------------

    def trained(self, module: PandaLLM, entry: dict[str, torch.Tensor]) -> Terms:
        """The loss of a rollout (`sampled`, or kept from an earlier pass) under the policy and value head now, and
        its metrics; the first pass adds the old log-probabilities, values, advantages and returns to `entry`."""
        scored = policy_scores(module, entry, self.temperature)  # at the temperature the completions were sampled at
        logps, mask = scored.logps, scored.mask
        values = module.heads[VALUE_HEAD](scored.hidden).squeeze(-1).float()
        if "advantages" not in entry:
            # The first pass over the rollout: this policy sampled it, its values are the rollout's.
            self.estimate(entry, logps.detach(), values.detach(), mask, self.kl_coefficient(module))
        policy, value, clipped, value_clipped = token_losses(
            logps,
            entry["old_logps"],
            entry["advantages"],
            values,
            entry["old_values"],
            entry["returns"],
            self.cliprange,
            self.cliprange_value,
        )
        maskf = mask.to(policy.dtype)
        loss_sum = ((policy + self.vf_coef * value) * maskf).sum()
        metrics = {
            "policy_loss": (policy.detach() * maskf).sum(),
            "value_loss": (value.detach() * maskf).sum(),
            "clip_ratio": (clipped * maskf).sum(),
            "value_clip_ratio": (value_clipped * maskf).sum(),
            "entropy": scored.entropy,
            "value": (values.detach() * maskf).sum(),
            "tokens": mask.sum(),
            **self.entry_metrics(entry),
        }
        device = loss_sum.device
        return Terms(loss_sum, mask.sum(), {name: total.to(device).double() for name, total in metrics.items()})

    def from_rewards(self, rewards: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each completion's score, rewarded at its last token (`estimate`)."""
        return {"scores": rewards.float()}

    def estimate(
        self,
        entry: dict[str, torch.Tensor],
        logps: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        coefficient: float,
    ) -> None:
        """The rollout's old log-probabilities and values, KL penalty, advantages and returns, into `entry`."""
        kl = (logps - entry["ref_logps"]) * mask if "ref_logps" in entry else torch.zeros_like(logps)
        rewards = token_rewards(entry["scores"], kl, mask, coefficient)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        entry.update(old_logps=logps, old_values=values, advantages=advantages, returns=returns)
        if self.kl_coef > 0:
            entry[METRIC + "kl"] = kl.sum().double()

    # ---- the adaptive KL coefficient ---------------------------------------------------------------------------

    def kl_coefficient(self, module: PandaLLM) -> float:
        """The KL weight of the rewards of the rollouts sampled now: as configured, or as adapted so far from the same
        configured start (a run resumed with another `kl_coef`, or without `kl_target`, takes its own)."""
        adapted = module.rollouts.kl_coef
        if self.kl_target is None or adapted is None or adapted[0] != self.kl_coef:
            return self.kl_coef
        return adapted[1]

    def on_window(self, module: PandaLLM, totals: dict[str, torch.Tensor]) -> None:
        """At the last step over a rollout (its KL measured over every rank), the adaptive controller's update: the
        next rollouts' rewards take the new weight, every step over a rollout logs the weight its rewards had."""
        if self.kl_target is None:
            return
        module.log("train/kl_coef", self.kl_coefficient(module), on_step=True)  # the weight this step's rollout has
        if position(module.trainer, self.passes)[0] == self.passes - 1:  # the rollout's last step: the next samples
            coefficient = adapted_kl_coef(
                self.kl_coefficient(module),
                float(totals["kl"] / totals["completions"].clamp(min=1)),
                float(totals["completions"]),
                self.kl_target,
                self.kl_horizon,
            )
            module.rollouts.kl_coef = [self.kl_coef, coefficient]
