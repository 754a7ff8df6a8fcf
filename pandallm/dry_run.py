"""`pandallm fit --dry_run`: everything a run would resolve, read and check, then the figures, and no training.

The config is parsed and every class instantiated as for a run; the data is read, checked and tokenized (the cache
entry is built, and reused by the run after); the model is built on the meta device (no weights are read or
allocated). Printed: the optimizer steps, tokens per optimizer step, the parameters and those that train, and the
memory estimate per device.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaForCausalLM

from pandallm.model.peft import apply_lora
from pandallm.optim.schedules import run_steps
from pandallm.tools.estimate import estimate_memory


@dataclass(frozen=True)
class Plan:
    steps: int
    rows_per_step: int
    tokens_per_step: float
    parameters: int
    trainable: int
    memory: str


def parameter_counts(module: Any) -> tuple[int, int]:
    """(all parameters, trainable ones) of the model `module` (a `PandaLLM`) builds, counted on the meta device: its
    architecture, with LoRA adapters and `modules_to_save` where configured (the base's quantization changes no
    count), and the objective's own trained modules."""
    h = module.hparams
    with torch.device("meta"):
        model = LlamaForCausalLM(module.config)
        if h.use_lora:
            model = apply_lora(model, module.lora)
        heads = module.objective.trained_modules(module.config)  # trained fully beside the model: PPO's value head
    parameters = [*model.parameters(), *(p for head in heads.values() for p in head.parameters())]
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def plan(trainer: Any, module: Any, datamodule: Any, config: Any) -> Plan:
    """Read and check the data as `fit` does, and work out the run's figures (nothing is trained). `config`: the
    parsed `fit` config, whose run `pandallm estimate` counts the memory of."""
    datamodule.trainer = trainer  # as `fit` attaches it: the ranks, and the stage
    datamodule.prepare_data()
    datamodule.setup("fit")
    steps = run_steps(trainer, datamodule)
    rows_per_step = datamodule.train_batch_size * trainer.world_size * trainer.accumulate_grad_batches
    if datamodule.streaming:
        tokens_per_row = float(datamodule.max_seq_length)  # streamed blocks are full
    else:
        order = datamodule.training_order
        notes = datamodule.data_notes.get("groups", {})
        per_source = [notes.get(f"train_{i}", {}) for i in range(len(order.sizes))]
        epoch_tokens = sum(
            count * note.get("tokens", 0) / note["rows"]
            for count, note in zip(order.source_counts(0), per_source, strict=True)
            if note.get("rows")
        )
        tokens_per_row = epoch_tokens / order.length if order.length else 0.0
    parameters, trainable = parameter_counts(module)
    memory = estimate_memory(config, devices=trainer.num_devices).report()
    if datamodule.rows == "prompts":
        # Online RL trains each prompt's completions (`num_generations` rows of the prompt and up to
        # `max_new_tokens` sampled ones): the prompts alone undercount a step by far.
        objective = module.objective
        tokens_per_row = objective.num_generations * (tokens_per_row + objective.max_new_tokens)
    return Plan(steps, rows_per_step, rows_per_step * tokens_per_row, parameters, trainable, memory)


def report(result: Plan, trainer: Any, module: Any, datamodule: Any) -> str:
    padded = "" if datamodule.packing or datamodule.streaming else ", before padding"
    per_epoch = datamodule.num_train_batches(trainer.world_size)
    epochs = "" if math.isinf(per_epoch) else f"; {math.ceil(per_epoch / trainer.accumulate_grad_batches)} per epoch"
    checked = "the config, the data and the model check out"
    if datamodule.streaming:
        # A streamed corpus is read only as training reaches it (it may be larger than a dry run should read): saying
        # that the data checks out would promise what a malformed record hours into the run then breaks.
        checked = (
            "the config and the model check out, and the streamed files were found; their records are read only as "
            "training reaches them (`pandallm data check DIR` checks every one first)"
        )
    accumulated = trainer.accumulate_grad_batches
    layout = f"{datamodule.train_batch_size} x {trainer.world_size} device(s) x {accumulated} accumulated"
    if datamodule.rows == "prompts":
        objective = module.objective
        tokens = (
            f"  tokens per optimizer step: at most about {result.tokens_per_step:,.0f} ({result.rows_per_step} prompts "
            f"of {layout}, each sampled {objective.num_generations} times, its tokens and up to "
            f"{objective.max_new_tokens} new ones per completion)"
        )
        if objective.passes > 1:
            epochs += f"; {objective.passes} per rollout"
    else:
        tokens = (
            f"  tokens per optimizer step: about {result.tokens_per_step:,.0f} ({result.rows_per_step} rows of "
            f"{layout}, at most {datamodule.max_seq_length} tokens each{padded})"
        )
    return "\n".join(
        [
            f"pandallm fit --dry_run: {checked}; nothing was trained",
            f"  optimizer steps: {result.steps:,}{epochs}",
            tokens,
            f"  parameters: {result.parameters:,}, trainable: {result.trainable:,} "
            f"({result.trainable / max(result.parameters, 1):.2%})",
            "  memory per device, as `pandallm estimate` counts it:",
            textwrap.indent(result.memory, "  "),
        ]
    )
