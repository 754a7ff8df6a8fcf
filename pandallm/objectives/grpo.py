"""GRPO (Shao et al. 2024, DeepSeekMath): online RL from rewards, with advantages normalised within each prompt's group
of sampled completions instead of a learned value function.

Each training step, for each prompt of the micro-batch, the policy samples `num_generations` completions
(`pandallm.rl.rollout`: on the prompt's own rank, seeded so that a resumed run samples the same ones); the rewards
(`pandallm.rl.rewards`) of a group give each completion its advantage `A = (r - mean) / (std + 1e-4)` (without the
division when `scale_rewards` is false, as Dr. GRPO has it); and the loss of each completion token is

    -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL,    ratio = pi(t) / pi_old(t)

with `KL = exp(ref - logp) - (ref - logp) - 1` (Schulman's k3 estimator) to the reference model: the base with its
LoRA adapters disabled, or a frozen copy of the starting model (`beta: 0` needs none). Completions are generated and
trained in the same step, so pi_old is the policy itself (detached): the ratio is 1 and its gradient the policy
gradient, as in TRL with one iteration per generation (`num_iterations: 1`, its default); `epsilon` is kept in the
loss for that reason, and its clip fraction logged.

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

import math
import os
from typing import TYPE_CHECKING, Any, Literal

import torch

from pandallm.errors import ConfigError
from pandallm.generate.options import GenerationOptions
from pandallm.objectives.base import Objective, Stage, Terms
from pandallm.objectives.logps import token_logps
from pandallm.rl.rewards import Rewards, record_fields
from pandallm.rl.rollout import Rollout, completion_rows, rollout_seed, sample
from pandallm.rl.samples import log_samples
from pandallm.tokenizer import padding_id

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

LossType = Literal["grpo", "dr_grpo", "dapo"]
PER_COMPLETION = ("reward", "reward_sq", "completion_length", "truncated", "frac_reward_zero_std")
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


def entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The summed entropy of the policy's next-token distributions at the trained positions (a row at a time: one
    row's softmax more in memory, not the batch's)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    with torch.no_grad():
        for row, row_mask in zip(logits, mask, strict=True):
            logp = torch.log_softmax(row[row_mask].float(), dim=-1)
            total += -(logp.exp() * logp).sum().double()
    return total


class GRPO(Objective):
    """Group Relative Policy Optimization on prompt rows (`data.rows: prompts`, linked), see the module docstring."""

    rows = "prompts"
    reference = "live"  # the reference is scored as it trains (`pandallm.objectives.reference`), never precomputed

    def __init__(
        self,
        rewards: list[dict[str, Any]],
        num_generations: int = 8,
        loss_type: LossType = "grpo",
        beta: float = 0.0,
        epsilon: float = 0.2,
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
        checks = (
            ("beta", beta, beta >= 0, ">= 0"),
            ("epsilon", epsilon, epsilon > 0, "> 0"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
            ("log_samples_every_n_steps", log_samples_every_n_steps, log_samples_every_n_steps >= 0, ">= 0"),
        )
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"model.objective.init_args.{key} must be {valid}, got {value}")
        # Checked here as `pandallm predict` checks its own (`generation.*`), with this option's name.
        try:
            GenerationOptions(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        except ConfigError as error:
            raise ConfigError(str(error).replace("generation.", "model.objective.init_args.")) from None
        self.rewards = [dict(entry) for entry in rewards]
        self._rewards = Rewards(self.rewards)  # imports the functions: a bad path fails as the config is read
        self.num_generations = num_generations
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon = epsilon
        self.scale_rewards = scale_rewards
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.log_samples_every_n_steps = log_samples_every_n_steps
        # Per instance: the rewards' names are metrics too. `uses_reference`: a reference is kept only with a KL term.
        self.uses_reference = beta > 0
        named = [f"rewards/{name}{suffix}" for name in self._rewards.names for suffix in ("", "_sq")]
        kl = ("kl",) if beta > 0 else ()
        self.metric_names = (*PER_COMPLETION, *named, *PER_TOKEN, *kl, "completions", "tokens")
        self.metric_counts = {
            **{name: "completions" for name in (*PER_COMPLETION, *named)},
            **{name: "tokens" for name in (*PER_TOKEN, *kl)},
        }

    # ---- a step ----------------------------------------------------------------------------------------------

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        trainer = module._trainer
        step = trainer.global_step if trainer is not None else 0
        num = self.num_generations
        rollout = self.rollout(module, batch, stage, step)
        prompts = [prompt for prompt in batch["prompt"] for _ in range(num)]
        where = [place for place in batch["where"] for _ in range(num)]
        rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask}
        fields = record_fields(batch["record"], batch["reference"], num)
        per_reward = self._rewards.score(prompts, rollout.completions, fields, where, rows, len(module.tokenizer))
        rewards = per_reward @ self._rewards.weights()
        if stage == "train" and self.log_samples_every_n_steps and step % self.log_samples_every_n_steps == 0:
            shown = []
            for i, completion in enumerate(rollout.completions):
                scores = {name: per_reward[i, j].item() for j, name in enumerate(self._rewards.names)}
                shown.append({"prompt": prompts[i], "completion": completion, "reward": rewards[i].item(), **scores})
            log_samples(trainer, step, shown)
        terms = self.policy_terms(module, rollout, group_advantages(rewards, num, self.scale_rewards))
        grouped = rewards.view(-1, num)
        zero_std = (grouped.max(dim=1).values == grouped.min(dim=1).values).repeat_interleave(num)
        metrics = {
            "reward": rewards.sum(),
            "reward_sq": (rewards**2).sum(),
            "frac_reward_zero_std": zero_std.sum(),
        }
        for j, name in enumerate(self._rewards.names):
            metrics[f"rewards/{name}"] = per_reward[:, j].sum()
            metrics[f"rewards/{name}_sq"] = (per_reward[:, j] ** 2).sum()
        device = terms.loss_sum.device
        terms.metrics.update({name: value.to(device).double() for name, value in metrics.items()})
        return terms

    def rollout(self, module: PandaLLM, batch: dict[str, Any], stage: Stage, step: int) -> Rollout:
        """`num_generations` completions of each prompt of the batch, sampled from the policy, as training rows."""
        from pandallm.model.parallel import shards_parameters  # here: pandallm.model imports the objectives

        if module._trainer is not None and shards_parameters(module.trainer.strategy):
            raise ConfigError(
                "model.objective GRPO samples with Hugging Face `generate`, which needs the whole model on each rank; "
                "FSDP and DeepSpeed ZeRO-3 shard it: use trainer.strategy ddp or deepspeed_stage_2 (with LoRA for "
                "large models)"
            )
        tokenizer = module.tokenizer
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        options = GenerationOptions(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            seed=rollout_seed(seed, stage, step, module.global_rank, batch["index"].tolist()),
        )
        num = self.num_generations
        prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        new_tokens = sample(module.model, tokenizer, prompt_ids, prompt_mask, num, options, self.max_new_tokens)
        eos, pad = tokenizer.eos_token_id, padding_id(tokenizer)
        return completion_rows(prompt_ids, prompt_mask, new_tokens, num, eos, pad, tokenizer)

    def policy_terms(self, module: PandaLLM, rollout: Rollout, advantages: torch.Tensor) -> Terms:
        """The loss of a rollout's completions with their advantages (N,), and the metrics of the policy on them."""
        ref_logps = None
        if self.beta > 0:
            scored = {"input_ids": rollout.input_ids, "position_ids": rollout.position_ids, "labels": rollout.labels}
            ref_logps = module.reference_scores.token_scores(module, scored, self.temperature)
        logits = module(rollout.input_ids, rollout.position_ids)
        if self.temperature != 1.0:
            # The probabilities the completions were sampled from (TRL scores at the sampling temperature too).
            logits = logits / self.temperature
        logps, mask = token_logps(logits, rollout.labels)
        losses, kl, clipped = token_losses(
            logps,
            logps.detach(),  # generated by this very policy: pi_old is pi (see the module docstring)
            advantages.to(device=logps.device, dtype=logps.dtype),
            self.epsilon,
            self.beta,
            ref_logps,
        )
        loss, units = loss_sum(losses, mask, self.loss_type, self.max_new_tokens)
        maskf = mask.to(logps.dtype)
        metrics = {
            "completion_length": rollout.lengths.sum(),
            "truncated": rollout.truncated.sum(),
            "clip_ratio": (clipped * maskf).sum(),
            "entropy": entropy_sum(logits.detach(), mask),
            "completions": torch.tensor(len(rollout.lengths)),
            "tokens": mask.sum(),
        }
        if kl is not None:
            metrics["kl"] = (kl.detach() * maskf).sum()
        metrics = {name: torch.as_tensor(value).to(logps.device).double() for name, value in metrics.items()}
        return Terms(loss, units.to(logps.device), metrics)

    # ---- the logs ----------------------------------------------------------------------------------------------

    def means(self, units: Any, totals: list) -> dict[str, Any]:
        """The metrics' means, with each `_sq` sum turned into the standard deviation over the same completions."""
        means = super().means(units, totals)
        for name in [n for n in means if n.endswith("_sq")]:
            mean_sq, mean = means.pop(name), means[name[: -len("_sq")]]
            variance = mean_sq - mean * mean
            std_name = name[: -len("_sq")] + "_std"
            if isinstance(variance, torch.Tensor):
                means[std_name] = variance.clamp(min=0).sqrt()
            else:
                means[std_name] = math.sqrt(max(variance, 0.0))
        return means
