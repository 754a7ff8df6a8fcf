"""Building the Hugging Face model from a starting point: a preset (random init), a checkpoint (a local dir or
hub id), a GGUF file, or PandaLLM-style delta weights on top of a base checkpoint; optionally quantized.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pandallm.errors import ModelError
from pandallm.model.delta import DEFAULT_REPLACED, apply_delta
from pandallm.model.presets import PRESETS, preset
from pandallm.model.quantize import QuantBits, bnb_config

log = logging.getLogger(__name__)


# What the model ends in: the language-model head (every objective that generates), or one score per sequence
# (a reward model: `LlamaForSequenceClassification` with one label, read at the last token that is not padding).
Head = Literal["causal_lm", "score"]
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "causal_lm": LlamaForCausalLM,
    "score": LlamaForSequenceClassification,
}


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.endswith(".gguf")


def gguf_location(path: str, key: str = "model.model_name_or_path") -> tuple[str, str]:
    """(directory, file name) of a GGUF file, as `from_pretrained(directory, gguf_file=name)` takes them."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"{key} '{path}': no such GGUF file")
    return str(file.parent), file.name


def model_config(name_or_path: str, vocab_size: int, overrides: dict[str, Any] | None) -> LlamaConfig:
    """The config of the model to build; `overrides` replace any `LlamaConfig` field (e.g. `num_hidden_layers`,
    `rope_scaling`)."""
    if is_preset(name_or_path):
        config = LlamaConfig(**{**preset(name_or_path), "vocab_size": vocab_size})
    else:
        config = _checkpoint_config(name_or_path)
    if not overrides:
        return config
    unknown = [key for key in overrides if not hasattr(config, key) and key not in ROPE_FIELDS]
    if unknown:
        raise ModelError(f"model.config_overrides: unknown LlamaConfig field(s) {unknown}")
    # The config is built again with the overrides, not patched: its `__init__` derives fields from others
    # (`rope_parameters` from `rope_scaling` and `rope_theta`, `head_dim` from the hidden size and heads), and a
    # field set afterwards leaves those stale (a `rope_scaling` set on a built config crashed in the rotary
    # embedding's init; a `hidden_size` kept the old `head_dim`).
    try:
        config = type(config)(**overridden_fields(config, overrides))
    except (TypeError, ValueError, KeyError, StrictDataclassError) as e:
        raise ModelError(f"model.config_overrides {overrides}: not a valid LlamaConfig: {e}") from e
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        # transformers only logs this; the model would then fail to build with a bare KeyError.
        raise ModelError(
            f"model.config_overrides: unknown RoPE type '{rope_type}'; transformers knows default, "
            f"{', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    return config


ROPE_FIELDS = ("rope_scaling", "rope_theta", "rope_parameters")


def overridden_fields(config: LlamaConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """`config`'s fields with `overrides` applied, for `LlamaConfig(**fields)`."""
    fields = config.to_dict()
    overrides = copy.deepcopy(overrides)  # transformers' rope standardisation writes into the dicts it is given
    heads = overrides.get("num_attention_heads", config.num_attention_heads)
    if "head_dim" not in overrides and config.head_dim == config.hidden_size // config.num_attention_heads:
        # Derived, not chosen: derive it again from the new dimensions.
        fields["head_dim"] = overrides.get("hidden_size", config.hidden_size) // heads
    if any(key in overrides for key in ROPE_FIELDS):
        rope = {key: overrides.pop(key) for key in ROPE_FIELDS if key in overrides}
        fields["rope_parameters"] = rope_parameters(config, rope)
        fields.pop("rope_scaling", None)
        fields.pop("rope_theta", None)
    return {**fields, **overrides}


def rope_parameters(config: LlamaConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of `config` under overrides of `rope_parameters`, `rope_scaling` (the field's name
    before transformers 5) and `rope_theta`. A scaling override keeps the checkpoint's base frequency: transformers
    would take its default (10000) when `rope_scaling` comes without one, silently changing a Llama 3 model's."""
    current = dict(getattr(config, "rope_parameters", None) or {})
    theta = current.get("rope_theta", 10000.0)
    if "rope_parameters" in overrides or "rope_scaling" in overrides:
        scaling = overrides.get("rope_parameters", overrides.get("rope_scaling")) or {}
        current = {("rope_type" if key == "type" else key): value for key, value in scaling.items()}
        current.setdefault("rope_type", "default")
        current.setdefault("rope_theta", theta)
    if "rope_theta" in overrides:
        current["rope_theta"] = overrides["rope_theta"]
    return current


def _checkpoint_config(name_or_path: str) -> LlamaConfig:
    path = Path(name_or_path)
    if is_gguf(name_or_path):
        directory, file = gguf_location(name_or_path)
        config = AutoConfig.from_pretrained(directory, gguf_file=file, trust_remote_code=False)
    else:
        if (name_or_path.startswith((".", "/")) or path.exists()) and not (path / "config.json").is_file():
            raise ModelError(
                f"model.model_name_or_path '{name_or_path}' is neither a preset ({', '.join(PRESETS)}), a GGUF file "
                "(*.gguf) nor a Hugging Face checkpoint directory (no config.json)"
            )
        try:
            # Never a checkpoint's own code (`auto_map`): see `pandallm.tokenizer.load_tokenizer`.
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.model_name_or_path '{name_or_path}' could not be loaded: {e}") from e
    if config.model_type != "llama":
        raise ModelError(
            f"model.model_name_or_path '{name_or_path}' is a '{config.model_type}' model; pandallm trains the "
            "LLaMA architecture (model_type 'llama')"
        )
    return config


def _from_pretrained(
    name_or_path: str, config: LlamaConfig, head: Head = "causal_lm", **kwargs: Any
) -> PreTrainedModel:
    model_class = MODEL_CLASSES[head]
    if not is_gguf(name_or_path):
        return model_class.from_pretrained(name_or_path, config=config, **kwargs)
    directory, file = gguf_location(name_or_path)
    try:  # transformers >= 5.x can keep GGUF blocks packed (with `kernels`); LoRA needs plain nn.Linear weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantize
        pass
    model = model_class.from_pretrained(directory, gguf_file=file, config=config, **kwargs)
    # The weights are dense now, but the model still carries the GGUF "quantizer", which makes save_pretrained
    # refuse ("quantized with gguf and is not serializable") and peft treat the model as quantized.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    _name(model, name_or_path)  # the file, not its directory: adapters record it as their base
    return model


def _name(model: LlamaForCausalLM, name_or_path: str) -> None:
    model.name_or_path = model.config.name_or_path = name_or_path


def load_model(
    name_or_path: str,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    quant_bits: QuantBits | None = None,
    delta_from: str | None = None,
    delta_replaces: tuple[str, ...] | list[str] = DEFAULT_REPLACED,
    device: torch.device | str | None = None,
    head: Head = "causal_lm",
) -> PreTrainedModel:
    """The model at its starting point, with the vocabulary it was saved with (see `grow_embeddings`), ending in
    `head` (a checkpoint's language-model head is left out of a `score` model, whose score starts fresh).

    A preset gets fresh weights (seeded by the caller); `delta_from` names the base checkpoint that the delta
    weights in `name_or_path` were made from. `quant_bits` loads the linear layers with bitsandbytes (4-bit NF4 or
    8-bit); `device` is where they are quantized (a GPU, or the CPU).
    """
    config = model_config(name_or_path, vocab_size, overrides)
    config._attn_implementation = attn_implementation
    if delta_from is not None and is_preset(name_or_path):
        raise ModelError(f"model.delta_from is set, but model.model_name_or_path '{name_or_path}' is a preset")
    if delta_from is not None and head != "causal_lm":
        raise ModelError("model.delta_from: delta weights are applied to language models, not to a reward model")
    plain_checkpoint = not (is_preset(name_or_path) or is_gguf(name_or_path) or delta_from)
    if quant_bits is not None and plain_checkpoint:
        device_map = {"": torch.device(device)} if device is not None else None
        return _from_pretrained(
            name_or_path,
            config,
            head,
            attn_implementation=attn_implementation,
            quantization_config=bnb_config(quant_bits),
            device_map=device_map,
        )
    if is_preset(name_or_path):
        model = MODEL_CLASSES[head](config)
    else:
        model = _from_pretrained(name_or_path, config, head, attn_implementation=attn_implementation)
        if delta_from is not None:
            apply_delta(model, delta_from, name_or_path, delta_replaces)
    if quant_bits is None:
        return model
    # bitsandbytes quantizes while `from_pretrained` loads, so a model that exists only in memory (a preset, a
    # dequantized GGUF, base + delta) is written as safetensors once and loaded back quantized.
    with tempfile.TemporaryDirectory(prefix="pandallm-quantize-") as scratch:
        model.save_pretrained(scratch)
        del model
        model = load_model(scratch, vocab_size, None, attn_implementation, quant_bits, device=device, head=head)
    _name(model, name_or_path)  # not the scratch directory: adapters record it as their base
    return model


def grow_embeddings(model: LlamaForCausalLM, vocab_size: int) -> int:
    """Grow the embeddings to a larger tokenizer; returns the number of rows added.

    The new rows start at the mean of the old ones (transformers' `mean_resizing`), which keeps the first losses
    sane. This must happen before LoRA wraps the model, or the new rows are neither trained nor saved.
    """
    added = vocab_size - model.get_input_embeddings().num_embeddings
    if added <= 0:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=True)
    log.info("pandallm: the tokenizer has %d tokens more than the checkpoint; the embeddings grew to match", added)
    return added


def build_model(
    name_or_path: str,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    **kwargs: Any,
) -> LlamaForCausalLM:
    """`load_model`, with the embeddings grown to the tokenizer's vocabulary."""
    model = load_model(name_or_path, vocab_size, overrides, attn_implementation, **kwargs)
    grow_embeddings(model, vocab_size)
    return model


def num_parameters(config: LlamaConfig, head: Head = "causal_lm") -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[head](config)
    return sum(p.numel() for p in model.parameters())
