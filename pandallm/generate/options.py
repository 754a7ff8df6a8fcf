"""Sampling options, and batched generation with them.

One `GenerationOptions` serves `pandallm predict` (`generation.*` in the config), `pandallm chat` and the
generation metrics of `validate`, `test` and `fit` (`pandallm.callbacks.generation_metrics`). The number of new
tokens is `model.max_new_tokens`, a model setting that existed before these options.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from pandallm.errors import ConfigError

# Where a seeded batch draws from: `seed + SEED_STRIDE * rank + batch index`, so that ranks and batches never share
# a stream (and a rank's streams do not depend on how many batches the others have).
SEED_STRIDE = 1_000_003


class GenerationOptions:
    def __init__(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            do_sample: Sample the next token; false: greedy (or beam search with `num_beams` > 1).
            temperature: Divides the logits before sampling (with `do_sample`); lower is more deterministic.
            top_p: Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p`.
            top_k: Sample from the `top_k` most likely tokens; 0: no limit.
            repetition_penalty: Penalty on tokens already in the prompt or the output (1.0: none; CTRL's rule).
            num_beams: Beam search width; 1: no beam search.
            seed: Seed of the sampling: with it, the same prompts in the same batches give the same outputs on any
                run. Each batch draws from its own stream, so that generation never moves the training RNG.
                Default: the run's RNG state (`seed_everything`).
        """
        checks = (
            ("temperature", temperature, temperature > 0, "> 0"),
            ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
            ("top_k", top_k, top_k >= 0, ">= 0"),
            ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0"),
            ("num_beams", num_beams, num_beams >= 1, ">= 1"),
        )
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"generation.{key} must be {valid}, got {value}")
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty
        self.num_beams = num_beams
        self.seed = seed

    def config(self, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
        """transformers' `GenerationConfig` of these options. It replaces the model's own `generation_config`
        whole, so that the options given here are all that decides (a checkpoint's saved sampling defaults do not
        creep in). Sampling parameters are passed only when sampling, as transformers expects."""
        sampling: dict[str, Any] = {}
        if self.do_sample:
            sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **sampling,
        )


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    options: GenerationOptions,
    max_new_tokens: int,
    stream: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """The new tokens of each left-padded row (`pandallm.data.collate.collate_prompts`), shape (rows, new tokens).

    The RNG is forked: generating never changes the RNG state of the caller (a `fit` that generates at each
    validation trains exactly as one that does not). With `options.seed`, the batch draws from stream
    `seed + stream` (see `SEED_STRIDE`); without one, from the caller's state, which stays where it was.
    `kwargs` go to `generate` (a streamer, `synced_gpus`).
    """
    device = input_ids.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if options.seed is not None:
            torch.manual_seed(options.seed + stream)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=options.config(tokenizer, max_new_tokens),
            **kwargs,
        )
    return generated[:, input_ids.shape[1] :]


def decode(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor) -> list[str]:
    """The text of each row's new tokens, up to its EOS (special tokens and the padding after EOS left out)."""
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
