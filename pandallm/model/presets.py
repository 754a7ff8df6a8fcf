"""Architecture presets: LLaMA's published dimensions, and tiny ones for CPU runs and tests.

A preset is a plain dict of `LlamaConfig` fields; `vocab_size` is set from the tokenizer when the model is built.
"""

from __future__ import annotations

from typing import Any

from pandallm.errors import ModelError

# Common to every LLaMA (v1) size: no biases, untied embeddings, RMSNorm eps 1e-6, RoPE base 10000.
_LLAMA = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}


def llama_7b() -> dict[str, Any]:
    return {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    }


def llama_13b() -> dict[str, Any]:
    return {
        **_LLAMA,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    }


def llama_33b() -> dict[str, Any]:
    return {
        **_LLAMA,
        "hidden_size": 6656,
        "intermediate_size": 17920,
        "num_hidden_layers": 60,
        "num_attention_heads": 52,
    }


def llama_65b() -> dict[str, Any]:
    return {
        **_LLAMA,
        "hidden_size": 8192,
        "intermediate_size": 22016,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    }


def llama_tiny() -> dict[str, Any]:
    """For tests: a forward and backward pass in milliseconds."""
    return {
        **_LLAMA,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }


def llama_mini() -> dict[str, Any]:
    """For the CPU demo recipe: 4.4M parameters with the demo tokenizer's 3,000 pieces (1.5M of them in the untied
    embeddings), a few minutes of training on two cores for the sample data."""
    return {
        **_LLAMA,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }


PRESETS = {
    "llama-7b": llama_7b,
    "llama-13b": llama_13b,
    "llama-33b": llama_33b,
    "llama-65b": llama_65b,
    "llama-tiny": llama_tiny,
    "llama-mini": llama_mini,
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ModelError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
