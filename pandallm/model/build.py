"""Building the Hugging Face model: from a preset (random init) or from a checkpoint (a local dir or hub id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from pandallm.errors import ModelError
from pandallm.model.presets import PRESETS, preset


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS


def model_config(name_or_path: str, vocab_size: int, overrides: dict[str, Any] | None) -> LlamaConfig:
    """The config of the model to build; `overrides` replace any `LlamaConfig` field (e.g. `num_hidden_layers`)."""
    overrides = dict(overrides or {})
    if is_preset(name_or_path):
        config = LlamaConfig(**{**preset(name_or_path), "vocab_size": vocab_size})
    else:
        config = _checkpoint_config(name_or_path)
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise ModelError(f"model.config_overrides: unknown LlamaConfig field(s) {unknown}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _checkpoint_config(name_or_path: str) -> LlamaConfig:
    path = Path(name_or_path)
    if (name_or_path.startswith((".", "/")) or path.exists()) and not (path / "config.json").is_file():
        raise ModelError(
            f"model.model_name_or_path '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) "
            "nor a Hugging Face checkpoint directory (no config.json)"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise ModelError(f"model.model_name_or_path '{name_or_path}' could not be loaded: {e}") from e
    if config.model_type != "llama":
        raise ModelError(
            f"model.model_name_or_path '{name_or_path}' is a '{config.model_type}' model; pandallm trains the "
            "LLaMA architecture (model_type 'llama')"
        )
    return config


def build_model(
    name_or_path: str,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A preset with fresh weights (seeded by the caller), or a checkpoint's weights.

    When the tokenizer has more tokens than the checkpoint's embeddings, the embeddings grow and the new rows
    start at the mean of the old ones (transformers' `mean_resizing`), which keeps the first losses sane.
    """
    config = model_config(name_or_path, vocab_size, overrides)
    config._attn_implementation = attn_implementation
    if is_preset(name_or_path):
        return LlamaForCausalLM(config)
    model = LlamaForCausalLM.from_pretrained(name_or_path, config=config, attn_implementation=attn_implementation)
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return model


def num_parameters(config: LlamaConfig) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
