"""`model.compile`: torch.compile, one decoder layer at a time.

Per layer rather than the whole model: every LLaMA decoder layer runs the same code, so one compiled graph serves
all of them (compile time does not grow with depth), and the parts that do not compile into one graph (the
embedding lookup, the loss, peft's and bitsandbytes' wrappers around the layers) stay eager instead of splitting the
model's graph. `Module.compile` compiles in place: the layers keep their class, so FSDP's wrap policies, FSDP2's
sharding and activation checkpointing still find them.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of `model` (plain, LoRA-wrapped or sharded) in place; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)
