"""Rollouts: completions sampled from the policy inside the training step, as training rows.

Each rank generates every completion of its own prompts (all `num_generations` of a prompt on the rank that holds it),
so that a prompt's group, and its advantages, never span ranks. The sampling is seeded from the run seed, the
optimizer step, the rank and the prompts' row numbers, never from the training RNG: a run resumed after a kill
generates the same completions as the uninterrupted run, and generation never moves the RNG that dropout draws from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pandallm.data.encode import IGNORE_INDEX
from pandallm.generate.options import GenerationOptions, generate

STAGES = {"train": 0, "val": 1, "test": 2}


def rollout_seed(seed: int, stage: str, step: int, rank: int, rows: list[int]) -> int:
    """A seed of its own for each batch of prompts: from the run seed, the stage, the optimizer step, the rank and the
    prompts' row numbers (which tell the micro-batches of an accumulated step apart)."""
    entropy = [seed % (1 << 63), STAGES[stage], step, rank, *rows]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


@dataclass
class Rollout:
    """`num_generations` completions of each prompt (prompt-major: a prompt's completions are consecutive), as
    right-padded rows `prompt + completion` with the completion's tokens as labels."""

    input_ids: torch.Tensor  # (N, T)
    position_ids: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T): the completion tokens, -100 elsewhere
    attention_mask: torch.Tensor  # (N, T)
    completions: list[str]
    lengths: torch.Tensor  # (N,): completion tokens, EOS included
    truncated: torch.Tensor  # (N,): ended at the token limit without EOS


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_generations: int,
    options: GenerationOptions,
    max_new_tokens: int,
) -> torch.Tensor:
    """The new tokens of `num_generations` samples of each left-padded prompt, (prompts x num_generations, L); the model
    generates in eval mode (no dropout), and is put back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        return generate(
            model,
            tokenizer,
            input_ids.repeat_interleave(num_generations, dim=0),
            attention_mask.repeat_interleave(num_generations, dim=0),
            options,
            max_new_tokens,
        )
    finally:
        model.train(training)


def completion_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    num_generations: int,
    eos_id: int,
    pad_id: int,
    tokenizer,
) -> Rollout:
    """Rollout rows from left-padded prompts (P, S) and the generated tokens (P x G, L): each completion cut after
    its first EOS (generate pads finished rows, with the EOS id itself when it is the padding id), the prompt's
    padding removed, the rows right-padded, as `PandaLLM.forward` reads them (no attention mask: causal attention
    never sees the padding at the end)."""
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    is_eos = new_tokens == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, new_tokens.shape[1], dtype=torch.long)
    )
    lengths = torch.where(has_eos, first_eos + 1, first_eos)
    prompts = [row[mask.bool()] for row, mask in zip(prompt_ids, prompt_mask, strict=True)]
    completions = [row[:n] for row, n in zip(new_tokens, lengths.tolist(), strict=True)]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=new_tokens.device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :p] = prompt
        input_ids[i, p:n] = completion
        labels[i, p:n] = completion
        attention_mask[i, :n] = 1
    position_ids = torch.arange(width, device=new_tokens.device).expand(rows, width).contiguous()
    return Rollout(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        attention_mask=attention_mask,
        completions=tokenizer.batch_decode([c.tolist() for c in completions], skip_special_tokens=True),
        lengths=lengths,
        truncated=~has_eos,
    )
