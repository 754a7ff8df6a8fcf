"""GRPO (Shao et al. 2024, DeepSeekMath): online RL from rewards, with advantages normalised within each prompt's group
of sampled completions instead of a learned value function.

Each training step, for each prompt of the micro-batch, the policy samples `num_generations` completions
(`pandallm.rl.rollout`: on the prompt's own rank, seeded so that a resumed run samples the same ones); the rewards
(`pandallm.rl.rewards`) of a group give each completion its advantage `A = (r - mean) / (std + 1e-4)` (without the
division when `scale_rewards` is false, as Dr. GRPO has it); and the loss of each completion token is

    -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL,    ratio = pi(t) / pi_old(t)

with `KL = exp(ref - logp) - (ref - logp) - 1` (Schulman's k3 estimator) to the reference model: the base with its
LoRA adapters disabled, or a frozen copy of the starting model (`beta: 0` needs none). pi_old is the policy that
sampled the completions: with `num_iterations: 1` (TRL's default) they are generated and trained in the same step, so
pi_old is the policy itself (detached), the ratio is 1 and its gradient the policy gradient; with `num_iterations: k`,
k optimizer steps train on each rollout (`pandallm.objectives.online`), the later ones against the first one's
log-probabilities, where `epsilon` clips.

The unit of the loss, over which `PandaLLM` averages the accumulated window of every rank, depends on `loss_type`
(TRL's names):

- `grpo`: the completion; each completion's loss is the mean over its tokens (the paper; favours short correct
  and long wrong answers, Liu et al. 2025);
- `dr_grpo`: the completion; each completion's loss is its token sum divided by `max_new_tokens` (Dr. GRPO: no length
  bias);
- `dapo`: the completion token; every token of the window weighs the same (DAPO's token-level loss, TRL's default).

Logged (train/ and val/): `reward` and `reward_std` (over the window's completions), `rewards/<name>` and
`rewards/<name>_std` per reward, `completion_length` (tokens, EOS included), `truncated` (share of completions that
hit `max_new_tokens` without EOS), `frac_reward_zero_std` (share of completions in groups whose rewards are all equal,
which teach nothing), `clip_ratio`, `entropy` (mean per-token entropy of the policy) and, with `beta`, `kl`. Every
`log_samples_every_n_steps` steps, the step's prompts, completions and rewards go to `rollouts.jsonl` in the log
directory (and to a wandb table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from pandallm.errors import ConfigError
from pandallm.objectives.base import Terms
from pandallm.objectives.online import ROLLOUT_METRICS, OnlineRL, Scored, check_options, policy_scores

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

LossType = Literal["grpo", "dr_grpo", "dapo"]
PER_COMPLETION = (*ROLLOUT_METRICS, "frac_reward_zero_std")
PER_TOKEN = ("clip_ratio", "entropy")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool) -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's standard deviation (Bessel-corrected,
    + 1e-4) with `scale`; groups are `num_generations` consecutive completions. Shapes (N,) -> (N,)."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per token (N, T): the clipped surrogate loss plus `beta` times the k3 KL estimate; the KL (None without a
    reference); and whether the ratio was clipped where clipping bites (above 1 + epsilon with A > 0, below
    1 - epsilon with A < 0)."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, kl, clipped


def loss_sum(
    losses: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss over the batch's units and their number (see the module's docstring for the units)."""
    mask = mask.to(losses.dtype)
    per_token = losses * mask
    completions = torch.tensor(losses.shape[0], device=losses.device)
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), completions
    if loss_type == "dr_grpo":
        return per_token.sum() / max_new_tokens, completions
    return per_token.sum(), mask.sum().long()


class GRPO(OnlineRL):
    """Group Relative Policy Optimization on prompt rows (`data.rows: prompts`, linked), see the module docstring."""

    passes_option = "num_iterations"

    def __init__(
        self,
        rewards: list[dict[str, Any]],
        num_generations: int = 8,
        loss_type: LossType = "grpo",
        beta: float = 0.0,
        epsilon: float = 0.2,
        num_iterations: int = 1,
        scale_rewards: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        log_samples_every_n_steps: int = 50,
    ) -> None:
        """
        Args:
            rewards: The rewards, summed with their weights: `{function: 'module:name', weight, kwargs}` (a Python
                callable) or `{model: directory, weight}` (a sequence-classification reward model); see
                pandallm.rl.rewards and the ready-made pandallm.rewards.
            num_generations: Completions sampled per prompt (the group size; at least 2).
            loss_type: `grpo` (per-completion token mean), `dr_grpo` (token sum / max_new_tokens) or `dapo`
                (token-level over the window).
            beta: Weight of the KL penalty to the reference model (0: no reference needed, none is kept).
            epsilon: Clipping range of the probability ratio.
            num_iterations: Optimizer steps over each rollout (TRL's name; PPO's epochs): above 1, the later steps
                train on the same completions against the first step's probabilities, clipped by `epsilon`.
            scale_rewards: Divide the advantages by their group's standard deviation (false: Dr. GRPO's choice).
            temperature: Sampling temperature of the rollouts.
            top_p: Nucleus sampling of the rollouts (1.0: the whole distribution).
            max_new_tokens: Longest completion, in tokens.
            seed: Seed of the rollouts' sampling; default: the run's `seed_everything`.
            log_samples_every_n_steps: Write the prompts, completions and rewards of every N-th optimizer step to
                `rollouts.jsonl` in the log directory (and a wandb table); 0: never.
        """
        if num_generations < 2:
            raise ConfigError(
                f"model.objective.init_args.num_generations must be at least 2 (a group's advantages compare its "
                f"completions), got {num_generations}"
            )
        check_options((("beta", beta, beta >= 0, ">= 0"), ("epsilon", epsilon, epsilon > 0, "> 0")))
        self._set_sampling(
            rewards,
            num_generations,
            temperature,
            top_p,
            max_new_tokens,
            seed,
            log_samples_every_n_steps,
            num_iterations,
        )
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon = epsilon
        self.num_iterations = num_iterations
        self.scale_rewards = scale_rewards
        # A reference is kept only with a KL term.
        self.uses_reference = beta > 0
        self._set_metrics(PER_COMPLETION, (*PER_TOKEN, *(("kl",) if beta > 0 else ())))

    # ---- a step ----------------------------------------------------------------------------------------------

    def trained(self, module: PandaLLM, entry: dict[str, torch.Tensor]) -> Terms:
        """The loss of a rollout (`sampled`, or kept from an earlier pass) under the policy now, and its metrics; the
        first pass adds the policy's log-probabilities to `entry` as the old policy's."""
        # At the sampling temperature: the probabilities the completions were sampled from (TRL scores so too).
        scored = policy_scores(module, entry, self.temperature)
        if "old_logps" not in entry:
            # The first pass over the rollout: the policy that sampled it is this one (see the module docstring).
            entry["old_logps"] = scored.logps.detach()
        terms = self.policy_terms(scored, entry["old_logps"], entry["advantages"], entry.get("ref_logps"))
        device = terms.loss_sum.device
        terms.metrics.update({name: value.to(device) for name, value in self.entry_metrics(entry).items()})
        return terms

    def from_rewards(self, rewards: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each completion's advantage within its group; the share of completions in groups that teach nothing."""
        num = self.num_generations
        grouped = rewards.view(-1, num)
        zero_std = (grouped.max(dim=1).values == grouped.min(dim=1).values).repeat_interleave(num)
        metrics["frac_reward_zero_std"] = zero_std.sum().double()
        return {"advantages": group_advantages(rewards, num, self.scale_rewards).float()}

    def policy_terms(
        self,
        scored: Scored,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        ref_logps: torch.Tensor | None,
    ) -> Terms:
        """The loss of a rollout's completions with their advantages (N,), and the metrics of the policy on them."""
        logps, mask = scored.logps, scored.mask
        losses, kl, clipped = token_losses(
            logps,
            old_logps,
            advantages.to(device=logps.device, dtype=logps.dtype),
            self.epsilon,
            self.beta,
            ref_logps,
        )
        loss, units = loss_sum(losses, mask, self.loss_type, self.max_new_tokens)
        maskf = mask.to(logps.dtype)
        metrics = {"clip_ratio": (clipped * maskf).sum(), "entropy": scored.entropy, "tokens": mask.sum()}
        if kl is not None:
            metrics["kl"] = (kl.detach() * maskf).sum()
        metrics = {name: torch.as_tensor(value).to(logps.device).double() for name, value in metrics.items()}
        return Terms(loss, units.to(logps.device), metrics)
