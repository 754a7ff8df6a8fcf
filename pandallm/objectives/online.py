"""What the online RL objectives (GRPO, PPO) share: prompts in, completions sampled from the policy inside the
training step, scored by the rewards, trained on for one or more optimizer steps.

- Rollouts (`pandallm.rl.rollout`): `num_generations` completions of each prompt, on the prompt's own rank, seeded
  from the run seed, the step, the rank and the prompts' rows (a resumed run samples the same ones).
- Rewards (`pandallm.rl.rewards`): Python functions and reward models, weighted and summed; every reward's mean and
  standard deviation logged, and every `log_samples_every_n_steps` steps the prompts, completions and rewards written
  to `rollouts.jsonl` (and a wandb table: `pandallm.rl.samples`).
- Passes (`passes_option`: PPO's `ppo_epochs`, GRPO's `num_iterations`): the optimizer steps taken over each rollout.
  The data repeats every optimizer step's rows that many times (`data.rollout_passes`), the first pass samples and
  scores, and the later ones take the rollout from `PandaLLM.rollouts` (`pandallm.rl.buffer`), with the first pass's
  log-probabilities as the old policy's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pandallm.data.encode import IGNORE_INDEX
from pandallm.errors import ConfigError
from pandallm.generate.options import GenerationOptions
from pandallm.model.chunked_loss import chunked_token_logps_and_entropies, shifted_labels
from pandallm.model.head import head_bypassed
from pandallm.objectives.base import Objective, Stage, Terms
from pandallm.objectives.logps import token_logps
from pandallm.rl.buffer import Entry, position
from pandallm.rl.rewards import Rewards, record_fields
from pandallm.rl.rollout import Rollout, completion_rows, rollout_seed, sample
from pandallm.rl.samples import log_samples
from pandallm.tokenizer import padding_id

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

OPTION = "model.objective.init_args"
# Sums over completions of a rollout, kept with it for the passes that train on it again.
ROLLOUT_METRICS = ("reward", "reward_sq", "completion_length", "truncated")
METRIC = "metric/"  # the prefix of a kept rollout's metric sums in its buffer entry


def check_options(checks: tuple[tuple[str, Any, bool, str], ...]) -> None:
    """`(option, value, valid, what valid means)`: a `ConfigError` naming the first invalid option."""
    for key, value, ok, valid in checks:
        if not ok:
            raise ConfigError(f"{OPTION}.{key} must be {valid}, got {value}")


class OnlineRL(Objective):
    """The shared part of `GRPO` and `PPO` (see the module docstring); its subclasses call `_set_sampling`."""

    rows = "prompts"
    reference = "live"  # the reference is scored as it trains (`pandallm.objectives.reference`), never precomputed

    def _set_sampling(
        self,
        rewards: list[dict[str, Any]],
        num_generations: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        log_samples_every_n_steps: int,
        passes: int,
    ) -> None:
        check_options(
            (
                (self.passes_option or "passes", passes, passes >= 1, ">= 1"),
                ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
                ("log_samples_every_n_steps", log_samples_every_n_steps, log_samples_every_n_steps >= 0, ">= 0"),
            )
        )
        # Checked here as `pandallm predict` checks its own (`generation.*`), with this option's name.
        try:
            GenerationOptions(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        except ConfigError as error:
            raise ConfigError(str(error).replace("generation.", f"{OPTION}.")) from None
        self.rewards = [dict(entry) for entry in rewards]
        self._rewards = Rewards(self.rewards)  # imports the functions: a bad path fails as the config is read
        self.num_generations = num_generations
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.log_samples_every_n_steps = log_samples_every_n_steps

    def _set_metrics(self, per_completion: tuple[str, ...], per_token: tuple[str, ...]) -> None:
        """The metrics (per instance: the rewards' names are metrics too), averaged over the completions or over the
        completion tokens, each reward's mean and square among the former."""
        named = tuple(f"rewards/{name}{suffix}" for name in self._rewards.names for suffix in ("", "_sq"))
        self.metric_names = (*per_completion, *named, *per_token, "completions", "tokens")
        self.metric_counts = {
            **{name: "completions" for name in (*per_completion, *named)},
            **{name: "tokens" for name in per_token},
        }

    # ---- a step ----------------------------------------------------------------------------------------------

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        slot, entry = self.kept(module, batch, stage)
        first = entry is None
        if first:
            entry = self.sampled(module, batch, stage)
        terms = self.trained(module, entry)
        if first:  # `trained` completed the entry with what the first pass over it measured
            self.keep(module, batch, slot, entry)
        return terms

    def sampled(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Entry:
        """A new rollout of the batch's prompts, scored: its rows, its metric sums, what the objective keeps of its
        rewards (`from_rewards`) and, with a KL term, the reference's log-probabilities: what `trained` takes."""
        step = self.step_of(module)
        rollout = self.rollout(module, batch, stage, step)
        rewards, metrics = self.score(module, batch, rollout, stage, step)
        kept = self.from_rewards(rewards, metrics)
        entry = self.rollout_entry(rollout, metrics, **kept)
        if self.uses_reference:
            entry["ref_logps"] = module.reference_scores.token_scores(module, entry, self.temperature)
        return entry

    def from_rewards(self, rewards: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the objective keeps of a rollout's weighted rewards (N,): GRPO's advantages, PPO's scores; its own
        metric sums are added to `metrics`."""
        raise NotImplementedError

    def trained(self, module: PandaLLM, entry: Entry) -> Terms:
        """The loss of a rollout under the policy now, and its metrics."""
        raise NotImplementedError

    # ---- rollouts --------------------------------------------------------------------------------------------

    def rollout(self, module: PandaLLM, batch: dict[str, Any], stage: Stage, step: int) -> Rollout:
        """`num_generations` completions of each prompt of the batch, sampled from the policy, as training rows."""
        from pandallm.model.parallel import shards_parameters  # here: pandallm.model imports the objectives

        if module._trainer is not None and shards_parameters(module.trainer.strategy):
            raise ConfigError(
                f"model.objective {type(self).__name__} samples with Hugging Face `generate`, which needs the whole "
                "model on each rank; FSDP and DeepSpeed ZeRO-3 shard it: use trainer.strategy ddp or "
                "deepspeed_stage_2 (with LoRA for large models)"
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

    def score(
        self, module: PandaLLM, batch: dict[str, Any], rollout: Rollout, stage: Stage, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted reward of each completion (N,) in fp64, and the rollout's metric sums (`ROLLOUT_METRICS`,
        each reward's); the samples go to the loggers on the steps that show them."""
        num = self.num_generations
        prompts = [prompt for prompt in batch["prompt"] for _ in range(num)]
        where = [place for place in batch["where"] for _ in range(num)]
        rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask}
        fields = record_fields(batch["record"], batch["reference"], num)
        per_reward = self._rewards.score(prompts, rollout.completions, fields, where, rows, len(module.tokenizer))
        rewards = per_reward @ self._rewards.weights()
        trainer = module._trainer
        # Shown when the rollout trains a step that is a multiple of N (its first step, with one pass per rollout).
        every = self.log_samples_every_n_steps
        if stage == "train" and every and (-step) % every < self.passes:
            shown = []
            for i, completion in enumerate(rollout.completions):
                scores = {name: per_reward[i, j].item() for j, name in enumerate(self._rewards.names)}
                shown.append({"prompt": prompts[i], "completion": completion, "reward": rewards[i].item(), **scores})
            log_samples(trainer, step, shown)
        metrics = {
            "reward": rewards.sum(),
            "reward_sq": (rewards**2).sum(),
            "completion_length": rollout.lengths.sum(),
            "truncated": rollout.truncated.sum(),
            "completions": torch.tensor(len(rollout.lengths)),
        }
        for j, name in enumerate(self._rewards.names):
            metrics[f"rewards/{name}"] = per_reward[:, j].sum()
            metrics[f"rewards/{name}_sq"] = (per_reward[:, j] ** 2).sum()
        device = rollout.input_ids.device
        return rewards.to(device), {name: torch.as_tensor(v).double().to(device) for name, v in metrics.items()}

    # ---- passes over a rollout (pandallm.rl.buffer) ---------------------------------------------------------------

    @staticmethod
    def step_of(module: PandaLLM) -> int:
        trainer = module._trainer
        return trainer.global_step if trainer is not None else 0

    def kept(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> tuple[int | None, Entry | None]:
        """`(slot, rollout)`: the kept rollout this micro-batch trains on again, or None when it must sample one
        (then `slot` is where `keep` puts it, None when nothing is kept: one pass per rollout, or evaluation)."""
        if stage != "train" or self.passes == 1:
            return None, None
        rollout_pass, slot = position(module.trainer, self.passes)
        if rollout_pass == 0:
            return slot, None
        return slot, module.rollouts.get(slot, batch["index"], self.step_of(module))

    @staticmethod
    def keep(module: PandaLLM, batch: dict[str, Any], slot: int | None, entry: Entry) -> None:
        if slot is not None:
            module.rollouts.put(slot, batch["index"], entry)

    @staticmethod
    def rollout_entry(rollout: Rollout, metrics: dict[str, torch.Tensor], **tensors: torch.Tensor) -> Entry:
        """What later passes need of a rollout: its rows, its metric sums and the objective's own `tensors`."""
        rows = {"input_ids": rollout.input_ids, "position_ids": rollout.position_ids, "labels": rollout.labels}
        return {**rows, **{METRIC + name: value for name, value in metrics.items()}, **tensors}

    @staticmethod
    def entry_metrics(entry: Entry) -> dict[str, torch.Tensor]:
        return {name[len(METRIC) :]: value for name, value in entry.items() if name.startswith(METRIC)}

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


@dataclass
class Scored:
    """The policy on a rollout's rows: what the online objectives' losses and metrics read."""

    logps: torch.Tensor  # (N, T): each completion token's log-probability at the sampling temperature, with gradient
    mask: torch.Tensor  # (N, T): whether position t holds a completion token's log-probability
    entropy: torch.Tensor  # the summed entropy of the distributions at those positions (fp64, no gradient)
    hidden: torch.Tensor  # (N, T, hidden): the decoder's final (normed) states, with gradient (PPO's value head)


def policy_scores(module: PandaLLM, entry: Entry, temperature: float) -> Scored:
    """The policy's scores of a rollout's rows along `module.loss_path` (`model.loss_impl`): from the full logits, or
    a chunk of completion tokens at a time without the batch x seq x vocab logits (as DPO scores pairs). The
    temperature divides the logits, or the hidden states before the projection: the same logits, linear in them."""
    ids, positions, labels = entry["input_ids"], entry["position_ids"], entry["labels"]
    if module.loss_path == "full":
        with head_bypassed(module.model, bypass=False) as head:
            logits = module(ids, positions)
        if temperature != 1.0:
            logits = logits / temperature
        logps, mask = token_logps(logits, labels)
        return Scored(logps, mask, entropy_sum(logits.detach(), mask), head.hidden)
    hidden, weight = module.head_input(ids, positions)
    scaled = hidden / temperature if temperature != 1.0 else hidden
    chunk = module.hparams.loss_chunk_tokens
    logps, entropies = chunked_token_logps_and_entropies(scaled, weight, labels, chunk)
    mask = shifted_labels(labels) != IGNORE_INDEX
    return Scored(logps, mask, entropies.sum().double(), hidden)


def entropy_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The summed entropy of the policy's next-token distributions at the trained positions (a row at a time: one
    row's softmax more in memory, not the batch's)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    with torch.no_grad():
        for row, row_mask in zip(logits, mask, strict=True):
            logp = torch.log_softmax(row[row_mask].float(), dim=-1)
            total += -(logp.exp() * logp).sum().double()
    return total
